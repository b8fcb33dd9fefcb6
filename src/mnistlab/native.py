"""Compiled forward and backward passes for the seed's CNN and the fast preset's model on the CPU.

At the seed's batch of 64, oneDNN's kernels for these three small convolutions spend most of
a training step on per-call overhead (about 11% of this CPU's arithmetic peak). The C file
beside this module (``csrc/seedcnn.c``) computes the whole network, forward and backward,
in a few loops over 16-channel vectors. It is compiled once per machine with the system's C
compiler (``cc -O3 -march=native``) into a cache folder and loaded with ctypes; without a
compiler, or where it fails, :func:`available` is False and training keeps PyTorch's
convolutions. ``MNISTLAB_NATIVE=0`` turns it off.

The arithmetic is the same as PyTorch's up to the order of the additions (float32
throughout), so results agree to rounding, not bit for bit (``tests/test_native.py``).
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

import torch

from . import data

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "seedcnn.c", CSRC / "fastcnn.c"]
HEADERS = [CSRC / "kernels.h"]
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC"]
# OpenMP where the compiler has it: the library then shares PyTorch's OpenMP runtime (libgomp.so.1,
# already loaded by torch) and its thread count; without it, the kernels run on one thread.
OPENMP = ["-fopenmp"]
MAX_CLASSES = 16

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
            for extra in (OPENMP, []):
                command = [compiler, *FLAGS, *extra, "-o", tmp, *map(str, SOURCES), "-lm"]
                done = subprocess.run(command, capture_output=True, text=True)
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
    lib.fastcnn_forward.argtypes = [ctypes.c_int, ctypes.c_int] + [f] * 19
    lib.fastcnn_backward.argtypes = [ctypes.c_int] + [f] * 29
    for fn in (lib.seedcnn_forward, lib.seedcnn_backward, lib.fastcnn_forward, lib.fastcnn_backward):
        fn.restype = None
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


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


class SeedCNNFunction(torch.autograd.Function):
    """logits = CNN(x) for the seed's CNN, with the compiled kernels; differentiable in the weights."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, w3, b3):
        lib = library()
        n, classes = x.shape[0], w3.shape[0]
        x = x.reshape(n, 784).contiguous()
        weights = [t.detach().contiguous() for t in (w1, b1, w2, b2, w3, b3)]
        a1 = torch.empty(n, 225, 16)
        a2 = torch.empty(n, 81, 16)
        a3 = torch.empty(n, 16, 16)
        out = torch.empty(n, classes)
        wp = [_ptr(t) for t in weights]

        lib.seedcnn_forward(n, classes, _ptr(x), *wp, _ptr(a1), _ptr(a2), _ptr(a3), _ptr(out))
        ctx.save_for_backward(x, *weights, a1, a2, a3)
        return out

    @staticmethod
    def backward(ctx, gout):
        lib = library()
        x, w1, b1, w2, b2, w3, b3, a1, a2, a3 = ctx.saved_tensors
        gout = gout.contiguous()
        weights = (w1, b1, w2, b2, w3, b3)
        grads = [torch.empty_like(t) for t in weights]
        lib.seedcnn_backward(x.shape[0], w3.shape[0], _ptr(x), *[_ptr(t) for t in weights], _ptr(a1), _ptr(a2),
                             _ptr(a3), _ptr(gout), *[_ptr(g) for g in grads])
        return (None, *grads)


def supports(model: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`seedcnn` can run ``model`` (the seed's CNN) on the batch ``x``."""
    from .models import CNN

    return type(model) is CNN and model.conv3.out_channels <= MAX_CLASSES and _cpu_float(model, x) and available()


def _cpu_float(model: torch.nn.Module, x: torch.Tensor) -> bool:
    tensors = [x, *model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def seedcnn(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` for the seed's :class:`~mnistlab.models.CNN`, computed by the compiled kernels."""
    return SeedCNNFunction.apply(x, model.conv1.weight, model.conv1.bias, model.conv2.weight, model.conv2.bias,
                                 model.conv3.weight, model.conv3.bias)


class FastCNNFeatures(torch.autograd.Function):
    """FastCNN's features in training mode (BatchNorm with the batch's statistics), with the
    compiled kernels; returns the features (n, 1024) and the batch statistics (6, 64): mean and
    biased variance of each BatchNorm layer, for the running statistics."""

    @staticmethod
    def forward(ctx, x, w1, g1, b1, w2, g2, b2, w3, g3, b3):
        params = [t.detach().contiguous() for t in (w1, g1, b1, w2, g2, b2, w3, g3, b3)]
        stats = torch.zeros(6, 64)
        feats, saved = _fastcnn_forward(x, params, stats, given=False)
        ctx.save_for_backward(*params, *saved, stats)
        ctx.mark_non_differentiable(stats)
        return feats, stats

    @staticmethod
    def backward(ctx, gfeat, _gstats):
        lib = library()
        w1, g1, b1, w2, g2, b2, w3, g3, b3, *saved, stats = ctx.saved_tensors
        n = saved[0].shape[0]
        gfeat = gfeat.contiguous()
        scratch = [torch.empty(n, size) for size in (16 * 64, 81 * 32, 49 * 32, 225 * 16, 196 * 16)]
        grads = [torch.empty_like(t) for t in (w1, g1, b1, w2, g2, b2, w3, g3, b3)]
        lib.fastcnn_backward(n, *[_ptr(t) for t in (w1, g1, w2, g2, w3, g3)], *[_ptr(t) for t in saved], _ptr(stats),
                             _ptr(gfeat), *[_ptr(t) for t in scratch], *[_ptr(t) for t in grads])
        return (None, *grads)


def _fastcnn_forward(x, params, stats, given: bool):
    """The C forward pass: features (n, 1024) and the activations it saves for the backward pass.
    ``stats`` (6, 64) receives the batch statistics, or (``given``) holds the running ones."""
    n = x.shape[0]
    x = x.reshape(n, 784).contiguous()
    saved = [torch.empty(n, size) for size in (31 * 31, 196 * 16, 225 * 16, 49 * 32, 81 * 32, 16 * 64, 16 * 64)]
    feats = torch.empty(n, 1024)
    library().fastcnn_forward(n, int(given), _ptr(x), *[_ptr(t) for t in params], *[_ptr(t) for t in saved],
                              _ptr(stats), _ptr(feats))
    return feats, saved


def _conv_bn_layers(model: torch.nn.Module):
    """FastCNN's (conv, BatchNorm) pairs, in order."""
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in model.features if isinstance(m, torch.nn.BatchNorm2d)]
    return list(zip(convs, bns, strict=True))


def _fast_supported(model: torch.nn.Module) -> bool:
    from .models import FastCNN

    if type(model) is not FastCNN:
        return False
    layers = _conv_bn_layers(model)
    convs, bns = [c for c, _ in layers], [b for _, b in layers]
    return (
        [c.out_channels for c in convs] == [16, 32, 64]
        and all(b.affine and b.track_running_stats and b.eps == 1e-5 and b.momentum is not None for b in bns)
        and model.MEAN == 0.1307
        and model.STD == 0.3081
    )


def fastcnn(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` for :class:`~mnistlab.models.FastCNN` in training mode, by the compiled kernels;
    updates the BatchNorm layers' running statistics as PyTorch does."""
    if len(x) == 0:
        return model(x)
    layers = _conv_bn_layers(model)
    args = [x]
    for conv, bn in layers:
        args += [conv.weight, bn.weight, bn.bias]
    feats, stats = FastCNNFeatures.apply(*args)
    count = {16: 196, 32: 49, 64: 16}
    with torch.no_grad():
        for k, (_, bn) in enumerate(layers):
            c = bn.num_features
            m = count[c] * len(x)  # values per channel in the batch
            mean, var = stats[2 * k, :c], stats[2 * k + 1, :c]
            bn.running_mean.mul_(1 - bn.momentum).add_(mean, alpha=bn.momentum)
            bn.running_var.mul_(1 - bn.momentum).add_(var * (m / max(m - 1, 1)), alpha=bn.momentum)
            bn.num_batches_tracked.add_(1)
    return model.head(feats)


@torch.no_grad()
def fastcnn_eval(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` for :class:`~mnistlab.models.FastCNN` in evaluation mode (BatchNorm with its
    running statistics), by the compiled kernels."""
    if len(x) == 0:
        return model(x)
    params = []
    stats = torch.zeros(6, 64)
    for k, (conv, bn) in enumerate(_conv_bn_layers(model)):
        params += [conv.weight.contiguous(), bn.weight.contiguous(), bn.bias.contiguous()]
        stats[2 * k, : bn.num_features] = bn.running_mean
        stats[2 * k + 1, : bn.num_features] = bn.running_var
    return model.head(_fastcnn_forward(x, params, stats, given=True)[0])


def forward_for(model: torch.nn.Module, x: torch.Tensor):
    """``model``'s forward pass for batches like ``x``: :func:`seedcnn` or :func:`fastcnn` where
    they apply, else ``model`` itself. Decided once, in the model's current mode (train/eval)."""
    if supports(model, x[:1].float()):
        return lambda xb: seedcnn(model, xb)
    if _fast_supported(model) and _cpu_float(model, x[:1].float()) and available():
        if model.training:
            return lambda xb: fastcnn(model, xb)
        return lambda xb: fastcnn_eval(model, xb)
    return model
