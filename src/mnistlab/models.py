"""The networks, in a registry keyed by name.

``FeedForward`` and ``CNN`` are the seed's two models, layer for layer, with PyTorch's
default initialisation as in the seed. Every model takes flattened images ``(B, 784)``
(or ``(B, 1, 28, 28)``) with pixels in [0, 1) and returns logits ``(B, num_classes)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: make ``fn`` available to :func:`create_model` under its name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name``; ``kwargs`` go to its constructor."""
    if name not in _REGISTRY:
        raise UsageError(f"unknown model {name!r}; expected one of: {', '.join(list_models())}")
    return _REGISTRY[name](**kwargs)


class FeedForward(nn.Module):
    """The seed's linear model: one ``nn.Linear(784, 10)``, no non-linearity."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.lin = nn.Linear(784, num_classes)

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        return self.lin(xb.reshape(-1, 784))


class CNN(nn.Module):
    """The seed's three-layer CNN: 28x28x1 -> 14x14x16 -> 7x7x16 -> 4x4xC -> avg-pool -> C."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 16, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(16, num_classes, kernel_size=3, stride=2, padding=1)

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        xb = xb.reshape(-1, 1, 28, 28)
        xb = F.relu(self.conv1(xb))
        xb = F.relu(self.conv2(xb))
        xb = F.relu(self.conv3(xb))
        xb = F.avg_pool2d(xb, 4)  # (B, C, 1, 1)
        return xb.reshape(-1, xb.size(1))


@register_model
def linear(num_classes: int = 10) -> nn.Module:
    """The seed's linear model (``FeedForward``)."""
    return FeedForward(num_classes)


@register_model
def cnn(num_classes: int = 10) -> nn.Module:
    """The seed's three-layer CNN."""
    return CNN(num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
