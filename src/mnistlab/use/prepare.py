"""Turn any picture of a digit into an MNIST-style 28x28 image, the way MNIST's were made.

MNIST's digits were size-normalised to fit a 20x20 box keeping their aspect ratio
(anti-aliased), then placed in a 28x28 image so that their centre of mass sits at the
centre. Pictures people draw or photograph are usually dark ink on a light background,
of any size and position; :func:`prepare_image` brings them to that form.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

MAX_BYTES = 20 * 1024 * 1024  # an uploaded or read file larger than this is refused
MAX_PIXELS = 40_000_000  # width x height; larger images are refused before decoding (decompression bombs)
BOX = 20  # the digit's longer side, in pixels
SIDE = 28
# Where MNIST's digits have their centre of mass, in 0-based pixel coordinates (row and column):
# the mean over the 60,000 training images is row 13.996, column 14.007.
CENTRE = 14.0


class ImageError(DataError, ValueError):
    """A file or array that is not a usable picture of a digit (exit status 1)."""


def open_image(source, name: str = "image") -> Image.Image:
    """A PIL image from a path, bytes or a PIL image, with the size limits applied."""
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            name = str(path)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise ImageError(f"{name}: file not found") from None
            if size > MAX_BYTES:
                raise ImageError(f"{name}: {size} bytes, larger than the {MAX_BYTES} allowed")
            data = path.read_bytes()
        else:
            data = bytes(source)
        if not data:
            raise ImageError(f"{name}: empty file, expected an image (PNG, JPEG, ...)")
        if len(data) > MAX_BYTES:
            raise ImageError(f"{name}: {len(data)} bytes, larger than the {MAX_BYTES} allowed")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                _check_pixels(image, name)
                image.load()
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            if isinstance(exc, UnidentifiedImageError):
                raise ImageError(f"{name}: not an image Pillow can read (PNG, JPEG, GIF, BMP, TIFF, WebP, ...)") \
                    from None
            raise ImageError(f"{name}: too many pixels, at most {MAX_PIXELS} allowed") from None
        except (OSError, EOFError, SyntaxError, ValueError, struct.error) as exc:
            raise ImageError(f"{name}: corrupt or truncated image ({exc})") from None
    _check_pixels(image, name)
    return image


def _check_pixels(image: Image.Image, name: str) -> None:
    w, h = image.size
    if w * h > MAX_PIXELS:
        raise ImageError(f"{name}: {w}x{h} pixels, more than the {MAX_PIXELS} allowed")
    if w == 0 or h == 0:
        raise ImageError(f"{name}: the image has no pixels")


def to_gray(image: Image.Image) -> np.ndarray:
    """float32 (H, W) in [0, 255]; transparent areas count as white paper."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("L"), dtype=np.float32)


def prepare_array(gray: np.ndarray, name: str = "image") -> np.ndarray:
    """MNIST-style uint8 (28, 28) from a grayscale array of any size (ink light or dark)."""
    gray = np.asarray(gray, dtype=np.float32)
    if gray.ndim != 2:
        raise ImageError(f"{name}: expected a 2-D grayscale array, got shape {gray.shape}")
    if not np.isfinite(gray).all():
        raise ImageError(f"{name}: pixel values must be finite numbers")
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    ink = gray - background if background < 128 else background - gray  # light background: invert
    ink = np.clip(ink, 0, None)
    peak = float(ink.max())
    if peak < 16:  # less contrast than 16 gray levels: nothing drawn
        raise ImageError(f"{name}: blank image, no digit found (draw darker or bigger strokes)")
    ink = ink * (255.0 / peak)
    ink[ink < 0.05 * 255] = 0  # paper texture and JPEG noise
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = crop.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
    small = np.clip(small, 0, 255)
    return _center_of_mass_paste(small)


def _center_of_mass_paste(small: np.ndarray) -> np.ndarray:
    h, w = small.shape
    total = small.sum()
    ys, xs = np.indices(small.shape)
    cy, cx = (ys * small).sum() / total, (xs * small).sum() / total
    top = int(round(CENTRE - cy))
    left = int(round(CENTRE - cx))
    top, left = min(max(top, 0), SIDE - h), min(max(left, 0), SIDE - w)
    out = np.zeros((SIDE, SIDE), np.float32)
    out[top : top + h, left : left + w] = small
    return np.round(out).astype(np.uint8)


def prepare_image(source, name: str = "image") -> np.ndarray:
    """A path, bytes or PIL image -> MNIST-style uint8 (28, 28)."""
    image = open_image(source, name)
    return prepare_array(to_gray(image), getattr(image, "filename", None) or name)


def as_pixels(images, name: str = "images") -> np.ndarray:
    """MNIST-style images as the models take them: (N, 784), uint8 0..255 or float32 in [0, 1].

    One rule for every interface (Python, ``mnistlab serve``'s JSON): integer values are
    grayscale bytes 0..255; floating-point values are MNIST-style fractions in [0, 1] (byte / 256,
    as ``load_mnist`` gives them). ``images``: (N, 28, 28), (N, 784), one (28, 28) or one (784,).
    """
    arr = np.asarray(images)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ImageError(f"{name} must be numbers: integers 0..255 or floats in [0, 1]")
    if arr.shape[-2:] == (28, 28):
        arr = arr.reshape(-1, 784)
    if arr.ndim == 1 and arr.size == 784:
        arr = arr.reshape(1, 784)
    if arr.ndim != 2 or arr.shape[1] != 784:
        raise ImageError(f"{name} must have shape (N, 28, 28) or (N, 784), got {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ImageError(f"{name}: integer pixels are grayscale bytes and must lie in 0..255, got "
                             f"{arr.min()}..{arr.max()}")
        return arr.astype(np.uint8)
    arr = arr.astype(np.float32)
    if arr.size and not np.isfinite(arr).all():
        raise ImageError(f"{name}: pixel values must be finite numbers")
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise ImageError(f"{name}: fractional pixels are MNIST-style values in [0, 1] (byte / 256), got "
                         f"{arr.min():g}..{arr.max():g}; send whole numbers 0..255 for grayscale bytes")
    return arr
