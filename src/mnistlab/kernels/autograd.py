"""The compiled kernels inside PyTorch models on the CPU: PyTorch's autograd over them.

At the seed's batch of 64, oneDNN's kernels for these three small convolutions spend most of
a training step on per-call overhead (about 11% of this CPU's arithmetic peak). The C files
in ``csrc/`` compute the seed's CNN and FastCNN (the fast preset's widths, ``widecnn``'s, any
multiples of 16 up to 128), forward and backward, in a few loops over 16-channel vectors.
Here they become autograd functions (:func:`seedcnn`, :func:`fastcnn`) and evaluation-mode
forwards (:func:`fastcnn_eval`); :func:`forward_for` picks what applies, by the rule of
:func:`mnistlab.kernels.calls.applies` (a model class names the network it is in its ``kernel``
attribute). Elsewhere PyTorch's layers run. ``MNISTLAB_NATIVE=0`` turns the kernels off.

The arithmetic is the same as PyTorch's up to the order of the additions (float32
throughout), so results agree to rounding, not bit for bit (``tests/test_native.py``).
"""

from __future__ import annotations

import torch

from . import calls
from .build import library
from .fastcnn import BN_MOMENTUM, running_stats, update_running


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


def kernel_of(model: torch.nn.Module) -> str | None:
    """The network the kernels would compute for ``model``: its class's own ``kernel`` (a subclass,
    which may change the forward pass, does not inherit it)."""
    return vars(type(model)).get("kernel")


def seedcnn(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` for the seed's :class:`~mnistlab.models.CNN`, computed by the compiled kernels."""
    return SeedCNNFunction.apply(x, model.conv1.weight, model.conv1.bias, model.conv2.weight, model.conv2.bias,
                                 model.conv3.weight, model.conv3.bias)


class FastCNNFeatures(torch.autograd.Function):
    """FastCNN's features in training mode (BatchNorm with the batch's statistics), with the
    compiled kernels; returns the features (n, 16 C3) and the batch statistics (6, MAX_WIDTH): mean and
    biased variance of each BatchNorm layer, for the running statistics."""

    @staticmethod
    def forward(ctx, x, w1, g1, b1, w2, g2, b2, w3, g3, b3):
        params = [t.detach().contiguous() for t in (w1, g1, b1, w2, g2, b2, w3, g3, b3)]
        stats = torch.zeros(6, calls.MAX_WIDTH)
        feats, saved = _fastcnn_forward(x, params, stats, given=False)
        ctx.save_for_backward(*params, *saved, stats)
        ctx.mark_non_differentiable(stats)
        return feats, stats

    @staticmethod
    def backward(ctx, gfeat, _gstats):
        params, saved, stats = ctx.saved_tensors[:9], ctx.saved_tensors[9:-1], ctx.saved_tensors[-1]
        grads = [torch.empty_like(t) for t in params]
        calls.fastcnn_backward([t.numpy() for t in params], [t.numpy() for t in saved], stats.numpy(),
                                 gfeat.contiguous().numpy(), [g.numpy() for g in grads])
        return (None, *grads)


def _fastcnn_forward(x, params, stats, given: bool):
    """The C forward pass: features (n, 16 C3) and the activations it saves for the backward pass.
    ``stats`` (6, MAX_WIDTH) receives the batch statistics, or (``given``) holds the running ones."""
    x = x.reshape(len(x), 784).contiguous()
    feats, saved = calls.fastcnn_forward(x.numpy(), [t.numpy() for t in params], stats.numpy(), given)
    return torch.from_numpy(feats), [torch.from_numpy(a) for a in saved]


def _conv_bn_layers(model: torch.nn.Module):
    """FastCNN's (conv, BatchNorm) pairs, in order."""
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in model.features if isinstance(m, torch.nn.BatchNorm2d)]
    return list(zip(convs, bns, strict=True))


def kernels_apply(model: torch.nn.Module, x: torch.Tensor | None = None) -> bool:
    """Whether the kernels compute ``model`` (on batches like ``x``): the rule
    (:func:`~mnistlab.kernels.calls.applies`) for its network, widths and device, and float32
    tensors and the layer settings the C code assumes."""
    kernel = kernel_of(model)
    tensors = [*([] if x is None else [x]), *model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    if not tensors or not all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors):
        return False
    if kernel == calls.SEEDCNN:
        return calls.applies(kernel, "cpu", classes=model.conv3.out_channels)
    if kernel != calls.FASTCNN:
        return False
    layers = _conv_bn_layers(model)
    bns = [b for _, b in layers]
    return (calls.applies(kernel, "cpu", widths=tuple(c.out_channels for c, _ in layers))
            and all(b.affine and b.track_running_stats and b.eps == 1e-5 and b.momentum == BN_MOMENTUM for b in bns)
            and model.MEAN == 0.1307 and model.STD == 0.3081)


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
    update_running(_arrays(model), stats.numpy(), len(x))
    return model.head(feats)


def _arrays(model: torch.nn.Module) -> dict:
    """NumPy views of the model's weights and buffers, by ``state_dict`` name (CPU tensors)."""
    return {k: t.numpy() for k, t in model.state_dict().items()}


@torch.no_grad()
def fastcnn_eval(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` for :class:`~mnistlab.models.FastCNN` in evaluation mode (BatchNorm with its
    running statistics), by the compiled kernels."""
    if len(x) == 0:
        return model(x)
    params = []
    for conv, bn in _conv_bn_layers(model):
        params += [conv.weight.contiguous(), bn.weight.contiguous(), bn.bias.contiguous()]
    stats = torch.from_numpy(running_stats(_arrays(model)))
    return model.head(_fastcnn_forward(x, params, stats, given=True)[0])


def forward_for(model: torch.nn.Module, x: torch.Tensor):
    """``model``'s forward pass for batches like ``x``: :func:`seedcnn` or :func:`fastcnn` where
    they apply, else ``model`` itself. Decided once, in the model's current mode (train/eval)."""
    if not kernels_apply(model, x[:1].float()):
        return model
    if kernel_of(model) == calls.SEEDCNN:
        return lambda xb: seedcnn(model, xb)
    if model.training:
        return lambda xb: fastcnn(model, xb)
    return lambda xb: fastcnn_eval(model, xb)
