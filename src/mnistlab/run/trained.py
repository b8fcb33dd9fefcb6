"""A finished run's model as a ``torch.nn.Module``, rebuilt from ``model.json`` and ``model.safetensors``."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import RunError, first_line
from ..models import create_model, list_models
from .checkpoint import META, WEIGHTS, read_model_meta, read_weights


def load_model(directory: str | os.PathLike) -> nn.Module:
    """Rebuild the model saved in ``directory`` (``model.json`` + ``model.safetensors``), in eval
    mode on the CPU. Nothing is unpickled."""
    name, config = read_model_meta(directory)
    if name not in list_models():
        raise RunError(f"{directory}/{META}: unknown model {name!r}; this version knows {', '.join(list_models())}")
    model = create_model(name, **config)
    try:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in read_weights(directory).items()})
    except RuntimeError as exc:
        raise RunError(f"{directory}/{WEIGHTS}: cannot load the weights ({first_line(exc)})") from None
    return model.eval()
