"""Read and write IDX files, the format of the original MNIST distribution.

Layout: a big-endian int32 magic number ``0x000008NN`` where ``NN`` is the number of
dimensions (MNIST uses unsigned bytes only), one big-endian int32 per dimension, then
the data. Files may be gzip-compressed; that is detected from the content.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


def read_bytes(path: str | os.PathLike) -> bytes:
    """Return the decompressed content of ``path`` (gzip or raw)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"data file is a directory, expected an IDX file: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror or exc}") from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt gzip data ({exc}); expected a gzip-compressed IDX file") from None
    return raw


def parse_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """Decode IDX bytes into a uint8 array of the shape the header gives."""
    if len(data) < 4:
        raise DataError(f"{name}: too short for an IDX header ({len(data)} bytes), expected at least 4")
    zero, dtype, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or dtype != _UBYTE or not 1 <= ndim <= 4:
        magic = int.from_bytes(data[:4], "big")
        raise DataError(
            f"{name}: wrong IDX magic number 0x{magic:08X}, expected 0x00000801 (labels) "
            "or 0x00000803 (images) of unsigned bytes"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header ({len(data)} bytes, expected {header})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(shape)  # Python ints: a hostile header cannot overflow
    got = len(data) - header
    if got < expected:
        raise DataError(
            f"{name}: truncated data, header says {'x'.join(map(str, shape))} = {expected} bytes, file has {got}"
        )
    if got > expected:
        raise DataError(f"{name}: {got - expected} bytes of trailing data after the {expected} the header declares")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip or raw) into a uint8 array."""
    return parse_idx(read_bytes(path), name=str(path))


def encode_idx(array: np.ndarray) -> bytes:
    """Encode a uint8 array (1 to 4 dimensions) as IDX bytes."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"IDX arrays must be uint8, got {array.dtype}")
    if not 1 <= array.ndim <= 4:
        raise ValueError(f"IDX arrays must have 1 to 4 dimensions, got {array.ndim}")
    header = bytes([0, 0, _UBYTE, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file; gzip it when ``compress`` or the name ends in .gz."""
    path = Path(path)
    data = encode_idx(array)
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=6, mtime=0)
    path.write_bytes(data)
    return path
