"""Building and loading the compiled kernels (``csrc/``), and NumPy-facing calls into them.

Nothing here imports PyTorch, so the fast preset's training (:mod:`mnistlab.fastpath`) can
run without it. The library is compiled once per machine with the system's C compiler
(``cc -O3 -march=native``) into a cache folder and loaded with ctypes; without a compiler, or
where it fails, :func:`available` is False. ``MNISTLAB_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from . import data

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "seedcnn.c", CSRC / "fastcnn.c"]
HEADERS = [CSRC / "kernels.h"]
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fPIC"]  # compiling; linking adds -shared
# OpenMP where the compiler has it: the library then shares PyTorch's OpenMP runtime (libgomp.so.1,
# already loaded by torch) and its thread count; without it, the kernels run on one thread.
OPENMP = ["-fopenmp"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_error: str | None = None


def cache_dir() -> Path:
    """Where the compiled library is kept: ``native/`` in the data cache (``mnistlab.data.cache_dir``)."""
    return data.cache_dir() / "native"


def _cpu_key() -> str:
    """What the compiled code depends on: the source, the flags, and this CPU's instruction sets."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    key = b"".join(p.read_bytes() for p in SOURCES + HEADERS) + " ".join(FLAGS + OPENMP).encode()
    key += flags.encode() + platform.machine().encode()
    return hashlib.sha256(key).hexdigest()[:16]


def _compile(compiler: str, extra: list[str], objects: Path, out: str) -> subprocess.CompletedProcess:
    """Each source into an object file, all at once (one process per core's worth of work), then
    one shared library linked from them: about half the time of one compiler call on 2 cores."""
    procs = [subprocess.Popen([compiler, *FLAGS, *extra, "-c", str(src), "-o", str(objects / f"{src.stem}.o")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for src in SOURCES]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    link = [compiler, "-shared", *extra, "-o", out, *(str(objects / f"{src.stem}.o") for src in SOURCES), "-lm"]
    return subprocess.run(link, capture_output=True, text=True)


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc) found")
    target = cache_dir() / f"kernels-{_cpu_key()}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            with tempfile.TemporaryDirectory(dir=target.parent) as objects:
                for extra in (OPENMP, []):
                    done = _compile(compiler, extra, Path(objects), tmp)
                    if done.returncode == 0:
                        break
                else:
                    raise OSError(f"{compiler} failed: {done.stderr.strip()[:300]}")
            os.replace(tmp, target)  # atomic: concurrent builds leave one whole library
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    f = ctypes.c_void_p
    lib.seedcnn_forward.argtypes = [ctypes.c_int, ctypes.c_int] + [f] * 11
    lib.seedcnn_backward.argtypes = [ctypes.c_int, ctypes.c_int] + [f] * 17
    lib.fastcnn_forward.argtypes = [ctypes.c_int] * 5 + [f] * 19
    lib.fastcnn_backward.argtypes = [ctypes.c_int] * 4 + [f] * 29
    lib.fastcnn_head.argtypes = [ctypes.c_int] * 3 + [f] * 4 + [ctypes.c_float] + [f] * 5
    for fn in (lib.seedcnn_forward, lib.seedcnn_backward, lib.fastcnn_head):
        fn.restype = None
    lib.fastcnn_forward.restype = lib.fastcnn_backward.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled library, building it on first use; None where it cannot be had."""
    global _lib, _tried, _error
    with _lock:
        if not _tried:
            _tried = True
            if os.environ.get("MNISTLAB_NATIVE", "1") == "0":
                _error = "turned off by MNISTLAB_NATIVE=0"
            elif sys.platform == "win32":
                _error = "not built on Windows"
            else:
                try:
                    _lib = _build()
                except OSError as e:
                    _error = str(e)
        return _lib


def available() -> bool:
    return library() is not None


def why_unavailable() -> str | None:
    library()
    return _error


# The FastCNN widths the kernels take: multiples of 16 up to MAX_WIDTH (csrc/fastcnn.c's SMAX),
# also the row length of the BatchNorm statistics (6, MAX_WIDTH).
MAX_WIDTH = 128


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


def _p(a: np.ndarray) -> int:
    return a.ctypes.data


def fastcnn_forward(x: np.ndarray, params, stats: np.ndarray, given: bool, saved=None, feats=None):
    """FastCNN's features for the float32 images ``x`` (n, 784) in [0, 1).

    ``params``: the nine float32 arrays w1, g1, b1, w2, g2, b2, w3, g3, b3 (conv weights,
    BatchNorm weights and biases), C-contiguous; their shapes give the widths. ``stats``
    (6, MAX_WIDTH) receives each BatchNorm's batch mean and biased variance, or (``given``) holds
    the running ones. ``saved`` and ``feats``, if given, are reused. Returns
    ``(feats (n, 16 * C3), saved)``.
    """
    n, widths = len(x), param_widths(params)
    if saved is None:
        saved = [np.empty((n, size), np.float32) for size in fast_saved(widths)]
    if feats is None:
        feats = np.empty((n, fast_features(widths)), np.float32)
    if library().fastcnn_forward(n, int(given), *widths, _p(x), *map(_p, params), *map(_p, saved), _p(stats),
                                 _p(feats)):
        raise MemoryError("the compiled kernels could not allocate their buffers")
    return feats, saved


def fastcnn_backward(params, saved, stats: np.ndarray, gfeat: np.ndarray, grads, scratch=None) -> None:
    """Gradients of the nine ``params`` into ``grads`` (same shapes), from the gradient ``gfeat``
    (n, 16 * C3) at the features and what :func:`fastcnn_forward` saved in training mode."""
    n, widths = len(gfeat), param_widths(params)
    if scratch is None:
        scratch = [np.empty((n, size), np.float32) for size in fast_scratch(widths)]
    w1, g1, _, w2, g2, _, w3, g3, _ = params
    if library().fastcnn_backward(n, *widths, *map(_p, (w1, g1, w2, g2, w3, g3)), *map(_p, saved), _p(stats),
                                  _p(gfeat), *map(_p, scratch), *map(_p, grads)):
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
