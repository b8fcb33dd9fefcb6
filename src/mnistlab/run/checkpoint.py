"""Checkpoints and weights on disk, for both engines: safetensors files of NumPy arrays, JSON beside.

No PyTorch here (an engine converts its tensors). Files in a run directory:

    model.safetensors       the final weights, named as in the model's ``state_dict()``
    model.json              {"name": registry name, "config": the model's constructor arguments}
    checkpoint.safetensors  after every epoch: the engine's arrays (``model.*``, ``opt.*``, ``ema.*``,
                            random generators) and, in the JSON metadata "state", the epoch, the
                            per-epoch metrics, the engine's name and its settings

Nothing is unpickled: anything can rebuild the model from the first two files alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from ..errors import RunError, first_line
from ..files import write_bytes_atomic, write_json_atomic

WEIGHTS = "model.safetensors"
META = "model.json"
STATE = "checkpoint.safetensors"
STAGED = "checkpoint.next.safetensors"  # a batch's member: the next checkpoint, until the whole batch has it


def _contiguous(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, order="C") for k, v in arrays.items()}  # (ascontiguousarray makes 0-d arrays 1-d)


def write_weights(directory: str | os.PathLike, weights: dict[str, np.ndarray], name: str, config: dict) -> None:
    """Write ``model.safetensors`` (``weights``) and ``model.json`` ({"name", "config"}) into ``directory``."""
    directory = Path(directory)
    write_bytes_atomic(directory / WEIGHTS, save(_contiguous(weights)))
    write_json_atomic(directory / META, {"name": name, "config": config})


def read_model_meta(directory: str | os.PathLike) -> tuple[str, dict]:
    """``(registry name, constructor arguments)`` from ``model.json``."""
    path = Path(directory) / META
    try:
        meta = json.loads(path.read_text())
        return meta["name"], dict(meta.get("config", {}))
    except FileNotFoundError:
        raise RunError(f"{directory}: no {META}; not a finished run directory") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{path}: unreadable model description ({exc})") from None


def read_weights(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of ``model.safetensors``, by name."""
    path = Path(directory) / WEIGHTS
    try:
        with safe_open(path, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise RunError(f"{directory}: no {WEIGHTS}; not a finished run directory") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunError(f"{path}: cannot load the weights ({first_line(exc)})") from None


def write_state(directory: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict, name: str = STATE) -> None:
    """Write ``checkpoint.safetensors`` (or ``name``) atomically: ``arrays`` and the JSON-able ``meta``."""
    data = save(_contiguous(arrays), metadata={"state": json.dumps(meta)})
    write_bytes_atomic(Path(directory) / name, data)


def read_state(directory: str | os.PathLike, arrays: bool = True,
               name: str = STATE) -> tuple[dict, dict[str, np.ndarray]]:
    """What :func:`write_state` wrote: ``(meta, arrays by name)`` (``arrays=False``: the meta alone)."""
    path = Path(directory) / name
    try:
        with safe_open(path, framework="numpy") as f:
            meta = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()} if arrays else {}
    except FileNotFoundError:
        raise RunError(f"{directory}: no {name}; no epoch finished, nothing to resume") from None
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{path}: unreadable checkpoint ({first_line(exc)})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("epochs"), list):
        raise RunError(f"{path}: unreadable checkpoint (no per-epoch metrics)")
    return meta, tensors
