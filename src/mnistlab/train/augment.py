"""Data augmentation on whole batches: random affine maps (shift, rotation, scale), and
optionally elastic distortion.

One ``affine_grid`` + ``grid_sample`` per batch, on the batch's device. The elastic
distortion adds a smooth random displacement field to the affine map's sampling grid
before that one ``grid_sample``: random displacements on a coarse grid of control points
(4 x 4 by default, about 9 pixels apart), bicubically interpolated to every pixel, which
approximates Simard et al.'s Gaussian-smoothed random fields (2003) at a fraction of the
cost. Random numbers
come from torch's global generator, or one passed in, so a seeded run is repeatable and resumes exactly.
The label of every image is unchanged: the maps are small enough to keep a digit itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import config


def affine_theta(angle: torch.Tensor, zoom: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """``affine_grid``'s (B, 2, 3) matrices for 28x28 images: rotation by ``angle`` (radians),
    scaling by ``zoom``, shifts by ``dx``, ``dy`` pixels; one value of each per image.

    ``affine_grid`` maps output coordinates to input ones in [-1, 1]: the inverse map.
    """
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    return torch.stack([
        torch.stack([cos, -sin, dx * 2 / 28], dim=1),
        torch.stack([sin, cos, dy * 2 / 28], dim=1),
    ], dim=1)


@dataclass(frozen=True)
class Augment:
    """Ranges of the random maps; each drawn uniformly per image."""

    shift: float  # pixels, in x and in y independently: [-shift, shift]
    rotate: float  # degrees: [-rotate, rotate]
    scale: float  # relative: [1 - scale, 1 + scale]
    elastic: float = 0.0  # pixels: displacement at each control point, in x and y, in [-elastic, elastic]
    # (between the control points the bicubic interpolation can overshoot that range by up to 56%)
    control: int = 4  # control points per side of the elastic displacement field

    def __call__(self, xb: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``xb``: float images (B, 784) or (B, 1, 28, 28) -> augmented (B, 1, 28, 28), same dtype and device.
        Random numbers from ``generator`` (default: torch's global one)."""
        xb = xb.reshape(-1, 1, 28, 28)
        if len(xb) == 0:
            return xb
        return self.apply(xb, *self.draw(len(xb), xb.device, xb.dtype, generator))

    def draw(self, n: int, device, dtype, generator: torch.Generator | None = None) -> tuple:
        """The random numbers :meth:`apply` takes for ``n`` images, in the order :meth:`__call__` draws
        them: uniform in [-1, 1) per image for angle, zoom and shifts (n, 4), then the elastic
        field's control points (n, 2, control, control), if any."""
        r = torch.rand(n, 4, device=device, dtype=dtype, generator=generator) * 2 - 1
        if self.elastic <= 0:
            return r, None
        coarse = torch.rand(n, 2, self.control, self.control, device=device, dtype=dtype, generator=generator) * 2 - 1
        return r, coarse

    def apply(self, xb: torch.Tensor, r: torch.Tensor, coarse: torch.Tensor | None) -> torch.Tensor:
        """The maps :meth:`draw`'s numbers make, on images ``xb`` (B, 1, 28, 28): one ``grid_sample``."""
        theta = affine_theta(r[:, 0] * math.radians(self.rotate), 1 + r[:, 1] * self.scale,
                             r[:, 2] * self.shift, r[:, 3] * self.shift)
        grid = F.affine_grid(theta, list(xb.shape), align_corners=False)
        if coarse is not None:
            field = F.interpolate(coarse, size=xb.shape[-2:], mode="bicubic", align_corners=False)
            grid = grid + field.permute(0, 2, 3, 1) * (self.elastic * 2 / 28)
        return F.grid_sample(xb, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# mnistlab.config.AUGMENTS's ranges, as maps
AUGMENTS = {name: Augment(**ranges) if ranges else None for name, ranges in config.AUGMENTS.items()}
