"""A model on disk without pickle: weights as safetensors, registry name and config as JSON.

Anything can rebuild the model from these two files alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from .errors import RunError
from .files import write_bytes_atomic, write_json_atomic
from .models import create_model, list_models
from .rundir import META, STATE, WEIGHTS  # noqa: F401 (re-exported)


def save_model(model: nn.Module, directory: str | os.PathLike, name: str, config: dict) -> None:
    """Write ``model.safetensors`` and ``model.json`` ({"name", "config"}) into ``directory``."""
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_bytes_atomic(directory / WEIGHTS, save(state))
    write_json_atomic(directory / META, {"name": name, "config": config})


def load_model(directory: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Rebuild the model saved in ``directory``; returns ``(model, meta)`` in eval mode on the CPU."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / META).read_text())
        name, config = meta["name"], dict(meta.get("config", {}))
    except FileNotFoundError:
        raise RunError(f"{directory}: no {META}; not a finished run directory") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{directory / META}: unreadable model description ({exc})") from None
    if name not in list_models():
        raise RunError(f"{directory / META}: unknown model {name!r}; this version knows {', '.join(list_models())}")
    model = create_model(name, **config)
    try:
        state = load_file(directory / WEIGHTS)
        model.load_state_dict(state)
    except FileNotFoundError:
        raise RunError(f"{directory}: no {WEIGHTS}; not a finished run directory") from None
    except (SafetensorError, OSError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"{directory / WEIGHTS}: cannot load the weights ({first})") from None
    return model.eval(), meta


# Training state, written atomically after every epoch so that an interrupted run resumes
# exactly: weights, optimizer buffers, the weight average if any, torch's global RNG state
# (it drives the shuffling), epoch and metrics. One safetensors file; the non-tensor parts
# ride in its JSON metadata.


def save_state(directory: str | os.PathLike, model: nn.Module, opt, epoch: int, epochs: list[dict],
               average=None) -> None:
    import torch

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if average is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in average.state_dict().items()})
    opt_state = opt.state_dict()
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{index}.{key}"] = value.detach().cpu().contiguous()
    tensors["rng"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # augmentation draws on the GPU there
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_rng.{i}"] = state
    meta = {"epoch": epoch, "epochs": epochs, "param_groups": opt_state["param_groups"]}
    write_bytes_atomic(Path(directory) / STATE, save(tensors, metadata={"state": json.dumps(meta)}))


def load_state(directory: str | os.PathLike, model: nn.Module, opt, average=None) -> tuple[int, list[dict]]:
    """Restore what :func:`save_state` wrote; returns ``(epoch, per-epoch metrics)``."""
    import torch
    from safetensors import safe_open

    path = Path(directory) / STATE
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise RunError(f"{directory}: no {STATE}; no epoch finished, nothing to resume") from None
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{path}: unreadable checkpoint ({exc})") from None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if average is not None:
        average.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng"])
    cuda_keys = sorted((k for k in tensors if k.startswith("cuda_rng.")), key=lambda k: int(k.split(".")[1]))
    cuda_states = [tensors[k] for k in cuda_keys]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return int(meta["epoch"]), list(meta["epochs"])
