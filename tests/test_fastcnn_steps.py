"""FastCNN's steps without autograd (mnistlab.kernels.fastcnn, calls.fastcnn_head) against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mnistlab
from mnistlab.kernels import build, calls, fastcnn

from .test_native import _fastcnn_pair as _pair


@pytest.fixture(autouse=True)
def _kernels():
    if not build.available():
        pytest.skip(f"no compiled kernels: {build.why_unavailable()}")


@pytest.mark.parametrize(("n", "classes", "smoothing"), [(1, 10, 0.0), (7, 3, 0.1), (100, 10, 0.1), (64, 16, 0.3)])
def test_head_loss_and_gradients_match_pytorch(n, classes, smoothing):
    g = torch.Generator().manual_seed(n)
    feats = torch.randn(n, 1024, generator=g).relu().requires_grad_()
    head = torch.nn.Linear(1024, classes)
    y = torch.randint(0, classes, (n,), generator=g)
    logits = head(feats)
    loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
    loss.backward()
    w, b = head.weight.detach().numpy(), head.bias.detach().numpy()
    ours, gfeat, gw, gb = calls.fastcnn_head(feats.detach().numpy(), w, b, y.numpy(), smoothing)
    assert ours == pytest.approx(loss.item(), rel=1e-5)
    np.testing.assert_allclose(gfeat, feats.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(gw, head.weight.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(gb, head.bias.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(calls.fastcnn_head(feats.detach().numpy(), w, b), logits.detach().numpy(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("n", "momentum", "nesterov", "weight_decay", "smoothing", "widths"),
                         [(7, 0.9, True, 5e-4, 0.1, (16, 32, 64)), (37, 0.9, False, 0.0, 0.0, (16, 32, 64)),
                          (100, 0.0, False, 1e-3, 0.2, (16, 32, 64)), (19, 0.9, True, 5e-4, 0.1, (32, 64, 128))])
def test_sgd_steps_match_pytorch(n, momentum, nesterov, weight_decay, smoothing, widths):
    """Three steps of the step function against autograd and torch.optim.SGD: weights, momentum
    buffers, running statistics and losses."""
    model, twin = _pair(n, widths)
    reference = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum, nesterov=nesterov,
                                weight_decay=weight_decay)
    state = {k: t.numpy() for k, t in twin.state_dict().items()}  # views: the step trains twin in place
    buffers = [np.zeros_like(state[k]) for k in fastcnn.PARAMS] if momentum else None
    stepper = fastcnn.FastCNNStep(state, buffers, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                  label_smoothing=smoothing)
    for step in range(3):
        x, y = torch.rand(n, 784), torch.randint(0, 10, (n,))
        loss = F.cross_entropy(model(x), y, label_smoothing=smoothing)
        reference.zero_grad()
        loss.backward()
        reference.step()
        assert stepper.step(x.numpy(), y.numpy(), 0.05) == pytest.approx(loss.item(), rel=1e-4)
        for (name, want), got in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-6, msg=f"step {step}: {name}")
        if momentum:
            for p, b in zip(model.parameters(), buffers, strict=True):
                torch.testing.assert_close(torch.from_numpy(b), reference.state[p]["momentum_buffer"],
                                           rtol=1e-4, atol=1e-5)
    assert int(twin.features[1].num_batches_tracked) == 3
    assert not torch.equal(twin.head.weight, _pair(n, widths)[1].head.weight)  # it did train


@pytest.mark.parametrize("widths", [(16, 32, 64), (32, 64, 128)])
def test_evaluation_logits_match_pytorch(widths):
    model, _ = _pair(3, widths)
    for _ in range(3):
        model(torch.rand(64, 784))  # move the running statistics
    model.eval()
    x = torch.rand(1100, 784)  # more than one chunk, and a partial one
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    with torch.no_grad():
        np.testing.assert_allclose(fastcnn.logits(state, x.numpy()), model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_kernels_refuse_widths_they_do_not_take():
    model = mnistlab.models.FastCNN(widths=(16, 24, 64))  # 24: not a multiple of 16
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"widths \(16, 24, 64\): the kernels take multiples of 16 up to 128"):
        fastcnn.logits(state, np.zeros((2, 784), np.float32))
