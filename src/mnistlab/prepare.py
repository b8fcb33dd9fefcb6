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

from .errors import DataError

MAX_BYTES = 20 * 1024 * 1024  # an uploaded or read file larger than this is refused
MAX_PIXELS = 40_000_000  # width x height; larger images are refused before decoding (decompression bombs)
BOX = 20  # the digit's longer side, in pixels
SIDE = 28


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
    top = int(round(SIDE / 2 - 0.5 - cy))
    left = int(round(SIDE / 2 - 0.5 - cx))
    top, left = min(max(top, 0), SIDE - h), min(max(left, 0), SIDE - w)
    out = np.zeros((SIDE, SIDE), np.float32)
    out[top : top + h, left : left + w] = small
    return np.round(out).astype(np.uint8)


def prepare_image(source, name: str = "image") -> np.ndarray:
    """A path, bytes or PIL image -> MNIST-style uint8 (28, 28)."""
    image = open_image(source, name)
    return prepare_array(to_gray(image), getattr(image, "filename", None) or name)
