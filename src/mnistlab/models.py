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

from .config import FASTCNN_WIDTHS
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

    kernel = "seedcnn"  # the compiled kernels compute this class (not its subclasses) on the CPU

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


class StandardizedNet(nn.Module):
    """Base of the nets that standardise their input: ``head(features((x - mean) / std))``.

    Inputs are pixels in [0, 1); the standardisation lives in the model, so a saved model
    needs no outside preprocessing. Subclasses set ``features`` and ``head``.
    """

    MEAN, STD = 0.1307, 0.3081  # MNIST's training pixels
    features: nn.Module
    head: nn.Module

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        xb = (xb.reshape(-1, 1, 28, 28) - self.MEAN) * (1 / self.STD)
        return self.head(self.features(xb))


class FastCNN(StandardizedNet):
    """A small BatchNorm CNN chosen for time to accuracy on a CPU (``--preset fast``).

    28x28x1 -> conv 5x5 stride 2 -> 14x14x16 -> conv 3x3 stride 2 -> 7x7x32 -> conv 3x3
    stride 2 -> 4x4x64 -> linear -> C; each conv followed by BatchNorm and ReLU. About
    0.6 million multiply-adds and 33,000 parameters per image.
    """

    kernel = "fastcnn"  # the compiled kernels compute this class (not its subclasses) on the CPU

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        c1, c2, c3 = widths
        self.features = nn.Sequential(
            *_conv_bn(1, c1, 5, 2), *_conv_bn(c1, c2, 3, 2), *_conv_bn(c2, c3, 3, 2), nn.Flatten()
        )
        self.head = nn.Linear(4 * 4 * c3, num_classes)


class BNCNN(StandardizedNet):
    """A BatchNorm CNN for accuracy (``--preset best``): three conv stages with max-pooling.

    28x28x1 -> conv 5x5 -> 28x28x32 -> pool -> conv 3x3 -> 14x14x64 -> pool -> conv 3x3
    -> 7x7x128 -> pool -> 3x3x128 -> dropout -> linear -> C. About 8 million multiply-adds
    per image.
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128), dropout: float = 0.25):
        super().__init__()
        c1, c2, c3 = widths
        self.features = nn.Sequential(
            *_conv_bn(1, c1, 5), nn.MaxPool2d(2), *_conv_bn(c1, c2, 3), nn.MaxPool2d(2),
            *_conv_bn(c2, c3, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(dropout),
        )
        self.head = nn.Linear(3 * 3 * c3, num_classes)


class PoolCNN(StandardizedNet):
    """:class:`BNCNN`'s layers with each max-pool moved up to follow its convolution directly (``poolcnn``).

    conv -> pool -> BatchNorm -> ReLU instead of conv -> BatchNorm -> ReLU -> pool: the same
    convolutions, a quarter of the normalisation and activation work, which takes about
    half of BNCNN's training step on a CPU (the ordering of D. Page's fast CIFAR-10 ResNet).
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128), dropout: float = 0.25):
        super().__init__()
        c1, c2, c3 = widths
        self.features = nn.Sequential(
            *_conv_bn(1, c1, 5, pool=True), *_conv_bn(c1, c2, 3, pool=True), *_conv_bn(c2, c3, 3, pool=True),
            nn.Flatten(), nn.Dropout(dropout),
        )
        self.head = nn.Linear(3 * 3 * c3, num_classes)


def deskew(xb: torch.Tensor, limit: float = 1.0, width: float | None = None, stretch: float = 2.5) -> torch.Tensor:
    """Each image sheared horizontally about its centre of mass so that its ink's principal axis
    is vertical (the classic moment-based deskewing of MNIST), the centre of mass kept in place.

    ``xb``: (B, 1, H, W) non-negative pixels. The shear ``alpha = cov(row, col) / var(row)`` of each
    image's ink moves row ``r`` by ``-alpha * (r - centre row)`` pixels; ``|alpha|`` is capped at
    ``limit`` (45 degrees). ``width``: also scale each image horizontally about its centre so that
    its deskewed ink's standard deviation across the columns becomes ``width`` pixels (Cireşan et
    al.'s width normalisation, by moments instead of the bounding box), by a factor capped to
    ``[1 / stretch, stretch]``. A blank image is left as it is. One ``affine_grid`` +
    ``grid_sample`` (bilinear), so the layer exports to ONNX.
    """
    n, _, h, w = xb.shape
    rows = torch.arange(h, dtype=xb.dtype, device=xb.device)
    cols = torch.arange(w, dtype=xb.dtype, device=xb.device)
    ink = xb[:, 0]
    mass = ink.sum((1, 2))
    safe = mass.clamp_min(1e-6)
    by_row, by_col = ink.sum(2), ink.sum(1)  # (B, H), (B, W)
    cy = (by_row * rows).sum(1) / safe
    cx = (by_col * cols).sum(1) / safe
    dy, dx = rows[None, :] - cy[:, None], cols[None, :] - cx[:, None]
    var_y = (by_row * dy * dy).sum(1) / safe
    cov = (ink * dy[:, :, None] * dx[:, None, :]).sum((1, 2)) / safe
    blank = mass <= 0
    alpha = (cov / var_y.clamp_min(1e-6)).clamp(-limit, limit).masked_fill(blank, 0.0)
    squeeze = torch.ones_like(alpha)  # input columns per output column
    if width is not None:
        var_x = (by_col * dx * dx).sum(1) / safe - 2 * alpha * cov + alpha * alpha * var_y  # after the shear
        squeeze = (var_x.clamp_min(1e-6).sqrt() / width).clamp(1 / stretch, stretch).masked_fill(blank, 1.0)
    # affine_grid's coordinates are in [-1, 1] (align_corners=False). Output column c, row r samples
    # column cx + squeeze * (c - cx) + alpha * (r - cy) of row r.
    u_cx, v_cy = (2 * cx + 1) / w - 1, (2 * cy + 1) / h - 1
    shear = alpha * h / w
    one, zero = torch.ones_like(alpha), torch.zeros_like(alpha)
    theta = torch.stack([torch.stack([squeeze, shear, u_cx * (1 - squeeze) - shear * v_cy], 1),
                         torch.stack([zero, one, zero], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    return F.grid_sample(xb, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class DeskewedCNN(FastCNN):
    """:class:`FastCNN` that sees each image deskewed (:func:`deskew`) first (``deskewcnn``), and
    with ``width`` also normalised in width (``normcnn``).

    The same network on another view of the digits: its mistakes differ from those of a net
    trained on the images as written, which is what an ensemble needs from its members.
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128),
                 width: float | None = None):
        super().__init__(num_classes, widths)
        self.width = width

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        return super().forward(deskew(xb.reshape(-1, 1, 28, 28), width=self.width))


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, pool: bool = False) -> list[nn.Module]:
    """conv -> BatchNorm -> ReLU; ``pool``: conv -> 2x2 max-pool -> BatchNorm -> ReLU."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)  # BatchNorm brings the bias
    return [conv, *([nn.MaxPool2d(2)] if pool else []), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


@register_model
def linear(num_classes: int = 10) -> nn.Module:
    """The seed's linear model (``FeedForward``)."""
    return FeedForward(num_classes)


@register_model
def cnn(num_classes: int = 10) -> nn.Module:
    """The seed's three-layer CNN."""
    return CNN(num_classes)


@register_model
def fastcnn(num_classes: int = 10) -> nn.Module:
    """Small BatchNorm CNN for ``--preset fast`` (:class:`FastCNN`)."""
    return FastCNN(num_classes, widths=FASTCNN_WIDTHS["fastcnn"])


@register_model
def widecnn(num_classes: int = 10) -> nn.Module:
    """:class:`FastCNN` twice as wide (32, 64, 128 channels): about 2.3 million multiply-adds
    per image and 114,000 parameters, between ``fastcnn`` (0.6 million) and ``bncnn`` (8 million)."""
    return FastCNN(num_classes, widths=FASTCNN_WIDTHS["widecnn"])


@register_model
def deskewcnn(num_classes: int = 10) -> nn.Module:
    """``widecnn`` on deskewed images (:class:`DeskewedCNN`), for diverse ensembles; trains on PyTorch's layers."""
    return DeskewedCNN(num_classes, widths=FASTCNN_WIDTHS["widecnn"])


@register_model
def normcnn(num_classes: int = 10) -> nn.Module:
    """``widecnn`` on deskewed images scaled across to one width (a horizontal standard deviation of
    4 pixels; MNIST's digits have 1 to 6), for diverse ensembles; trains on PyTorch's layers."""
    return DeskewedCNN(num_classes, widths=FASTCNN_WIDTHS["widecnn"], width=4.0)


@register_model
def bncnn(num_classes: int = 10) -> nn.Module:
    """BatchNorm CNN for ``--preset best`` (:class:`BNCNN`)."""
    return BNCNN(num_classes)


@register_model
def poolcnn(num_classes: int = 10) -> nn.Module:
    """BNCNN with pooling before BatchNorm, about 1.2x faster per epoch (:class:`PoolCNN`)."""
    return PoolCNN(num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
