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

WEIGHTS = "model.safetensors"
META = "model.json"


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
