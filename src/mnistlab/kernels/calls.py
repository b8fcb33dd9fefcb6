"""NumPy-facing calls into the compiled kernels (:mod:`.build` compiles and loads them).

The FastCNN forward and backward passes and its linear head with the loss, on float32
C-contiguous arrays; the buffer sizes they need. Nothing here imports PyTorch.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from . import build
from .build import library

# The FastCNN widths the kernels take: multiples of 16 up to MAX_WIDTH (csrc/fastcnn.c's SMAX),
# also the row length of the BatchNorm statistics (6, MAX_WIDTH).
MAX_WIDTH = 128
MAX_CLASSES = 16  # the seed's CNN: classes (its last layer's channels) csrc/seedcnn.c takes
SEEDCNN, FASTCNN = "seedcnn", "fastcnn"  # the networks the kernels compute (a model class's ``kernel``)


def applies(kernel: str | None, device: str, widths=None, classes: int | None = None) -> bool:
    """The one rule for where the compiled kernels compute a network: the seed's CNN (``kernel``
    ``"seedcnn"``, at most ``MAX_CLASSES`` ``classes``) or FastCNN (``"fastcnn"``, ``widths`` they
    take) on the CPU, where the library is available (a C compiler, ``MNISTLAB_NATIVE`` not 0)."""
    if device != "cpu":
        return False
    if kernel == SEEDCNN:
        fits = classes is None or 0 < classes <= MAX_CLASSES
    elif kernel == FASTCNN:
        fits = widths is not None and widths_supported(tuple(widths))
    else:
        fits = False
    return fits and build.available()


def fast_saved(widths: tuple[int, int, int]) -> tuple[int, ...]:
    """What FastCNN's forward pass saves for the backward pass, in floats per image (see
    csrc/fastcnn.c): the padded standardised input, and each layer's conv output and ReLU grid."""
    c1, c2, c3 = widths
    return 31 * 31, 196 * c1, 225 * c1, 49 * c2, 81 * c2, 16 * c3, 16 * c3


def fast_scratch(widths: tuple[int, int, int]) -> tuple[int, ...]:
    """The backward pass's scratch, in floats per image."""
    c1, c2, c3 = widths
    return 16 * c3, 81 * c2, 49 * c2, 225 * c1, 196 * c1


def fast_features(widths: tuple[int, int, int]) -> int:
    """Features per image at the linear head: 4 x 4 positions of the last layer's channels."""
    return 16 * widths[2]


def widths_supported(widths) -> bool:
    """Whether the kernels compute a FastCNN with these three widths."""
    return len(widths) == 3 and all(isinstance(c, int) and 0 < c <= MAX_WIDTH and c % 16 == 0 for c in widths)


def param_widths(params) -> tuple[int, int, int]:
    """The widths of a FastCNN from its nine conv/BatchNorm arrays (w1, g1, b1, w2, ...); a
    ValueError where the kernels do not take them."""
    widths = len(params[0]), len(params[3]), len(params[6])
    if not widths_supported(widths):
        raise ValueError(f"FastCNN widths {widths}: the kernels take multiples of 16 up to {MAX_WIDTH}")
    return widths


def bf16_available() -> bool:
    """Whether the kernels can compute FastCNN's convolutions with bf16 operands: the library was
    built for a CPU with AVX512-BF16 (``-march=native``), and ``MNISTLAB_BF16`` is not 0."""
    return os.environ.get("MNISTLAB_BF16", "1") != "0" and build.available() and bool(library().fastcnn_bf16())


def _p(a: np.ndarray) -> int:
    return a.ctypes.data


def fastcnn_forward(x: np.ndarray, params, stats: np.ndarray, given: bool, saved=None, feats=None, bf16: bool = False):
    """FastCNN's features for the float32 images ``x`` (n, 784) in [0, 1).

    ``params``: the nine float32 arrays w1, g1, b1, w2, g2, b2, w3, g3, b3 (conv weights,
    BatchNorm weights and biases), C-contiguous; their shapes give the widths. ``stats``
    (6, MAX_WIDTH) receives each BatchNorm's batch mean and biased variance, or (``given``) holds
    the running ones. ``saved`` and ``feats``, if given, are reused. ``bf16``: the convolutions
    with bf16 operands and fp32 sums (:func:`bf16_available`). Returns ``(feats (n, 16 * C3), saved)``.
    """
    n, widths = len(x), param_widths(params)
    if saved is None:
        saved = [np.empty((n, size), np.float32) for size in fast_saved(widths)]
    if feats is None:
        feats = np.empty((n, fast_features(widths)), np.float32)
    if library().fastcnn_forward(n, int(given), *widths, _p(x), *map(_p, params), *map(_p, saved), _p(stats),
                                 _p(feats), int(bf16)):
        raise MemoryError("the compiled kernels could not allocate their buffers")
    return feats, saved


def fastcnn_backward(params, saved, stats: np.ndarray, gfeat: np.ndarray, grads, scratch=None,
                     bf16: bool = False) -> None:
    """Gradients of the nine ``params`` into ``grads`` (same shapes), from the gradient ``gfeat``
    (n, 16 * C3) at the features and what :func:`fastcnn_forward` saved in training mode (``bf16``:
    the convolutions' gradients from bf16 operands, summed in fp32)."""
    n, widths = len(gfeat), param_widths(params)
    if scratch is None:
        scratch = [np.empty((n, size), np.float32) for size in fast_scratch(widths)]
    w1, g1, b1, w2, g2, b2, w3, g3, _ = params
    if library().fastcnn_backward(n, *widths, *map(_p, (w1, g1, b1, w2, g2, b2, w3, g3)), *map(_p, saved), _p(stats),
                                  _p(gfeat), *map(_p, scratch), *map(_p, grads), int(bf16)):
        raise MemoryError("the compiled kernels could not allocate their buffers")


def fastcnn_head(feats: np.ndarray, w: np.ndarray, b: np.ndarray, y: np.ndarray | None = None,
                 smoothing: float = 0.0, logits=None, grads=None):
    """The linear head ``feats @ w.T + b`` (float32, C-contiguous); returns the logits (n, C).

    With int64 labels ``y``: returns ``(loss, gfeat, gw, gb)`` instead, the mean cross-entropy
    with label smoothing (as ``F.cross_entropy``) and its gradients; ``grads`` (three arrays)
    and ``logits`` are reused if given. A compiled loop rather than NumPy's matrix product,
    whose OpenBLAS threads would compete for the cores with the kernels' OpenMP threads.
    """
    n, features = feats.shape
    classes = len(b)
    if logits is None:
        logits = np.empty((n, classes), np.float32)
    if y is None:
        library().fastcnn_head(n, classes, features, _p(feats), _p(w), _p(b), None, 0.0, _p(logits), None, None,
                               None, None)
        return logits
    y = np.ascontiguousarray(y, np.int64)
    if grads is None:
        grads = (np.empty_like(feats), np.empty_like(w), np.empty_like(b))
    loss = ctypes.c_double()
    library().fastcnn_head(n, classes, features, _p(feats), _p(w), _p(b), _p(y), smoothing, _p(logits),
                           *map(_p, grads), ctypes.addressof(loss))
    return (loss.value, *grads)
