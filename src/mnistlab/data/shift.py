"""Images moved by whole pixels, for test-time augmentation. NumPy arrays or torch tensors alike."""

from __future__ import annotations

# Test-time augmentation: the image itself and its 8 shifts by one pixel, as (dy, dx).
TTA_SHIFTS = tuple((dy, dx) for dy in (0, -1, 1) for dx in (0, -1, 1))


def shift_images(x, dy: int, dx: int):
    """Images (N, 784) or (N, 28, 28) moved ``dy`` rows down and ``dx`` columns right; blank (0) fills in."""
    images = x.reshape(-1, 28, 28)
    out = images * 0  # zeros of the same kind, dtype and device
    out[:, max(dy, 0) : 28 + min(dy, 0), max(dx, 0) : 28 + min(dx, 0)] = \
        images[:, max(-dy, 0) : 28 + min(-dy, 0), max(-dx, 0) : 28 + min(-dx, 0)]
    return out.reshape(x.shape)
