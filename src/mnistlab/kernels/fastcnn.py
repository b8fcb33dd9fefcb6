"""FastCNN's initial weights, training step and evaluation without autograd (any widths the
kernels take: ``fastcnn``, ``widecnn``): the compiled kernels (:mod:`.calls`) for the three
conv/BatchNorm/ReLU layers and the linear head with its loss, NumPy for SGD.

A step done this way skips the per-step work of PyTorch's autograd and optimizer (about a third
of a step at the fast preset's batch of 256 on 2 cores), and this module does not import
PyTorch, whose import alone takes 1.7 to 2.5 seconds here. The arithmetic is PyTorch's:
``F.cross_entropy`` with label smoothing, BatchNorm's running statistics (unbiased variance,
momentum 0.1), and ``torch.optim.SGD``'s momentum, Nesterov momentum and weight decay; results
agree with PyTorch's to float32 rounding (``tests/test_fastcnn_steps.py``).

The weights live in a dict of float32 arrays named as in ``FastCNN.state_dict()``, so they load
into :class:`mnistlab.models.FastCNN`.
"""

from __future__ import annotations

import math

import numpy as np

from ..metrics import score_logits
from . import calls

PARAMS = ("features.0.weight", "features.1.weight", "features.1.bias", "features.3.weight", "features.4.weight",
          "features.4.bias", "features.6.weight", "features.7.weight", "features.7.bias", "head.weight", "head.bias")
BATCHNORMS = ("features.1", "features.4", "features.7")
POSITIONS = (196, 49, 16)  # values per channel and image at each BatchNorm (14x14, 7x7, 4x4)
BN_MOMENTUM = 0.1


def init_state(seed: int, num_classes: int, widths: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """A FastCNN's initial weights with PyTorch's default initialisation (convolutions and the linear
    layer uniform in +-1/sqrt(fan_in), BatchNorm weight 1, bias 0), drawn from NumPy's generator."""
    rng = np.random.default_rng(seed)

    def uniform(shape, fan_in):
        bound = 1 / math.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    state = {}
    c1, c2, c3 = widths
    for (conv, bn), (c_out, c_in, k) in zip(((0, 1), (3, 4), (6, 7)), ((c1, 1, 5), (c2, c1, 3), (c3, c2, 3)),
                                             strict=True):
        state[f"features.{conv}.weight"] = uniform((c_out, c_in, k, k), c_in * k * k)
        state[f"features.{bn}.weight"] = np.ones(c_out, np.float32)
        state[f"features.{bn}.bias"] = np.zeros(c_out, np.float32)
        state[f"features.{bn}.running_mean"] = np.zeros(c_out, np.float32)
        state[f"features.{bn}.running_var"] = np.ones(c_out, np.float32)
        state[f"features.{bn}.num_batches_tracked"] = np.zeros((), np.int64)
    features = calls.fast_features(widths)
    state["head.weight"] = uniform((num_classes, features), features)
    state["head.bias"] = uniform((num_classes,), features)
    return state


class Buffers:
    """The arrays one batch size needs, reused from step to step; the backward pass's only with ``training``."""

    def __init__(self, n: int, classes: int, widths: tuple[int, int, int], training: bool = True):
        self.n = n
        features = calls.fast_features(widths)
        self.saved = [np.empty((n, size), np.float32) for size in calls.fast_saved(widths)]
        self.feats = np.empty((n, features), np.float32)
        self.stats = np.zeros((6, calls.MAX_WIDTH), np.float32)
        self.logits = np.empty((n, classes), np.float32)
        if training:
            self.scratch = [np.empty((n, size), np.float32) for size in calls.fast_scratch(widths)]
            self.gfeat = np.empty((n, features), np.float32)


def running_stats(state: dict) -> np.ndarray:
    """The BatchNorm layers' running means and variances as the kernels take them, (6, MAX_WIDTH)."""
    stats = np.zeros((6, calls.MAX_WIDTH), np.float32)
    for k, bn in enumerate(BATCHNORMS):
        c = len(state[f"{bn}.running_mean"])
        stats[2 * k, :c] = state[f"{bn}.running_mean"]
        stats[2 * k + 1, :c] = state[f"{bn}.running_var"]
    return stats


def update_running(state: dict, stats: np.ndarray, n: int) -> None:
    """BatchNorm's running statistics after a training step on ``n`` images, as PyTorch updates
    them (momentum 0.1, unbiased variance), from the batch's ``stats`` (6, MAX_WIDTH) the kernels return."""
    for k, bn in enumerate(BATCHNORMS):
        mean, var = state[f"{bn}.running_mean"], state[f"{bn}.running_var"]
        c, m = len(mean), POSITIONS[k] * n
        mean *= 1 - BN_MOMENTUM
        mean += BN_MOMENTUM * stats[2 * k, :c]
        var *= 1 - BN_MOMENTUM
        var += BN_MOMENTUM * (stats[2 * k + 1, :c] * (m / max(m - 1, 1)))
        state[f"{bn}.num_batches_tracked"][...] += 1


def logits(state: dict, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """FastCNN in evaluation mode (BatchNorm with its running statistics): logits (n, C) of the
    images ``x`` (n, 784) or (n, 28, 28): float pixels in [0, 1), or uint8 (divided by 256)."""
    params = [np.ascontiguousarray(state[k], np.float32) for k in PARAMS]
    stats = running_stats(state)
    out = np.empty((len(x), len(params[10])), np.float32)
    buffers = None
    for start in range(0, len(x), batch_size):
        xb = np.ascontiguousarray(x[start : start + batch_size], np.float32).reshape(-1, 784)
        if x.dtype == np.uint8:
            xb *= np.float32(1 / 256)
        if buffers is None or buffers.n != len(xb):
            buffers = Buffers(len(xb), out.shape[1], calls.param_widths(params), training=False)
        feats, _ = calls.fastcnn_forward(xb, params[:9], stats, True, buffers.saved, buffers.feats)
        out[start : start + len(xb)] = calls.fastcnn_head(feats, params[9], params[10], logits=buffers.logits)
    return out


def evaluate(state: dict, x: np.ndarray, y: np.ndarray, batch_size: int = 128) -> dict:
    """:func:`mnistlab.evaluate`'s numbers in evaluation mode: ``loss`` (the mean over batches of
    ``batch_size`` rows of each batch's mean cross-entropy, as the seed computes it), ``acc``,
    ``proba``, the class probabilities (n, C) float32, and ``spread`` (:func:`output_spread`)."""
    return score_logits(logits(state, x), y, batch_size)


class FastCNNStep:
    """SGD steps on FastCNN's weights in ``state`` (updated in place, running statistics too).

    ``buffers``: the momentum buffers, one array per name in :data:`PARAMS` (zeros before the
    first step, which makes the first update ``torch.optim.SGD``'s), or None without momentum.
    ``bf16``: the three convolutions, forward and backward, from bf16 operands summed in fp32
    (:func:`mnistlab.kernels.calls.bf16_available`); the weights, gradients and update stay fp32.
    """

    def __init__(self, state: dict, momentum_buffers: list[np.ndarray] | None, *, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, label_smoothing: float = 0.0,
                 bf16: bool = False):
        self.state = state
        self.params = [state[k] for k in PARAMS]
        for name, p in zip(PARAMS, self.params, strict=True):
            if p.dtype != np.float32 or not p.flags.c_contiguous:
                raise ValueError(f"{name}: FastCNN's weights must be C-contiguous float32 arrays")
        if momentum and momentum_buffers is None:
            raise ValueError("momentum needs momentum buffers")
        self.momentum_buffers = momentum_buffers
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay
        self.label_smoothing = label_smoothing
        self.bf16 = bf16
        self.grads = [np.empty_like(p) for p in self.params]
        self._buffers: Buffers | None = None

    def step(self, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        """One SGD step on the float32 images ``x`` (n, 784) in [0, 1) and int labels ``y``;
        returns the batch's mean loss (cross-entropy with the label smoothing)."""
        n = len(x)
        if self._buffers is None or self._buffers.n != n:
            self._buffers = Buffers(n, len(self.state["head.bias"]), calls.param_widths(self.params))
        buf = self._buffers
        x = np.ascontiguousarray(x, np.float32).reshape(n, 784)
        buf.stats.fill(0)
        feats, saved = calls.fastcnn_forward(x, self.params[:9], buf.stats, False, buf.saved, buf.feats, self.bf16)
        loss, gfeat, _, _ = calls.fastcnn_head(feats, self.params[9], self.params[10], y, self.label_smoothing,
                                                 buf.logits, (buf.gfeat, self.grads[9], self.grads[10]))
        calls.fastcnn_backward(self.params[:9], saved, buf.stats, gfeat, self.grads[:9], buf.scratch, self.bf16)
        update_running(self.state, buf.stats, n)
        self._sgd(lr)
        return loss

    def _sgd(self, lr: float) -> None:
        """``torch.optim.SGD.step()``: weight decay, (Nesterov) momentum, update."""
        bufs = self.momentum_buffers if self.momentum else [None] * len(self.params)
        for p, g, b in zip(self.params, self.grads, bufs, strict=True):
            if self.weight_decay:
                g += self.weight_decay * p
            if b is not None:
                b *= self.momentum
                b += g
                if self.nesterov:
                    g += self.momentum * b
                else:
                    g = b
            p -= lr * g
