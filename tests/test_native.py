"""The compiled kernels for the seed's CNN (mnistlab.kernels.autograd) against PyTorch's autograd."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mnistlab
from mnistlab.kernels import autograd as native
from mnistlab.kernels import build


@pytest.fixture(autouse=True)
def _kernels():
    """Built (once, into the session's cache, see conftest.py) when the first test runs, not at collection."""
    if not build.available():
        pytest.skip(f"no compiled kernels: {build.why_unavailable()}")


def _grads(model, x, y, forward):
    model.zero_grad()
    out = forward(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("n", [1, 5, 7, 64, 131])  # batch sizes around the kernels' groups of images
@pytest.mark.parametrize("classes", [10, 3, 16])
def test_forward_and_gradients_match_pytorch(n, classes):
    torch.manual_seed(n * 100 + classes)
    model = mnistlab.models.CNN(num_classes=classes)
    with torch.no_grad():  # biases away from 0 so that some ReLUs are off, some on
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.rand(n, 784)
    y = torch.randint(0, classes, (n,))
    out_t, grads_t = _grads(model, x, y, model)
    out_n, grads_n = _grads(model, x, y, lambda xb: native.seedcnn(model, xb))
    assert out_n.shape == (n, classes)
    torch.testing.assert_close(out_n, out_t, rtol=1e-5, atol=1e-6)
    for name, gn, gt in zip([k for k, _ in model.named_parameters()], grads_n, grads_t, strict=True):
        assert gn.shape == gt.shape, name
        torch.testing.assert_close(gn, gt, rtol=1e-4, atol=1e-6, msg=name)
        assert gt.abs().max() > 0, name  # the comparison has something to compare


def test_images_as_28x28_and_as_rows_give_the_same_logits():
    torch.manual_seed(0)
    model = mnistlab.models.CNN()
    x = torch.rand(9, 28, 28)
    assert torch.equal(native.seedcnn(model, x), native.seedcnn(model, x.reshape(9, 784)))


def test_the_kernels_apply_to_the_seeds_cnn_and_fastcnn_in_float32_on_the_cpu():
    from mnistlab.kernels.calls import applies

    x = torch.rand(2, 784)
    assert native.kernels_apply(mnistlab.models.CNN(), x)
    assert not native.kernels_apply(mnistlab.models.CNN(), x.double())
    assert not native.kernels_apply(mnistlab.models.CNN().double(), x)
    assert not native.kernels_apply(mnistlab.models.CNN(num_classes=17), x)  # more classes than a vector holds
    assert not native.kernels_apply(mnistlab.models.FeedForward(), x)
    for name in ("fastcnn", "widecnn"):
        assert native.kernels_apply(mnistlab.models.create_model(name), x)
    for name in ("deskewcnn", "normcnn", "bncnn"):  # FastCNN's subclasses change the forward pass
        assert not native.kernels_apply(mnistlab.models.create_model(name), x), name
    assert not native.kernels_apply(mnistlab.models.FastCNN(widths=(16, 32, 72)), x)  # widths the C code lacks
    assert not applies("fastcnn", "cuda", widths=(16, 32, 64)) and not applies("seedcnn", "cuda")


def test_fit_uses_the_kernels_and_learns_like_pytorch(mnist, monkeypatch):
    """The same seeded run, kernels on and off: the same batches, results equal up to rounding."""
    x, y = mnist.images, mnist.labels
    calls = []
    seedcnn = native.seedcnn
    monkeypatch.setattr(native, "seedcnn", lambda model, xb: calls.append(len(xb)) or seedcnn(model, xb))
    runs = []
    for use in (True, False):
        if not use:
            monkeypatch.setattr(native, "kernels_apply", lambda model, x=None: False)
        torch.manual_seed(3)
        model = mnistlab.models.CNN()
        h = mnistlab.fit(model, x[:640], y[:640], x[50000:50500], y[50000:50500], epochs=2, device="cpu")
        runs.append((h, model))
    # the first run's 10 training batches and one validation chunk per epoch, none of the second's
    assert calls == ([64] * 10 + [500]) * 2
    assert runs[0][0].valid_loss == pytest.approx(runs[1][0].valid_loss, rel=1e-3)
    for a, b in zip(runs[0][1].parameters(), runs[1][1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_turned_off_by_the_environment_variable():
    done = _python("from mnistlab.kernels import build; print(build.available(), build.why_unavailable())",
                   MNISTLAB_NATIVE="0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False turned off by MNISTLAB_NATIVE=0"


def test_without_a_working_compiler_training_falls_back_to_pytorch(tmp_path):
    code = (
        "import torch, mnistlab; from mnistlab.kernels import build\n"
        "print(build.available(), build.why_unavailable())\n"
        "torch.manual_seed(0); m = mnistlab.models.CNN(); x = torch.randint(0, 256, (64, 784), dtype=torch.uint8)\n"
        "y = torch.randint(0, 10, (64,)); h = mnistlab.fit(m, x, y, x, y, epochs=1, device='cpu')\n"
        "print(len(h.epochs))\n"
    )
    done = _python(code, CC="/bin/false", MNISTLAB_CACHE=str(tmp_path))
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first.startswith("False /bin/false failed")
    assert second == "1"
    assert not list((tmp_path / "native").glob("*.so"))  # no half-built library left behind


def test_evaluation_uses_the_kernels_with_pytorchs_numbers(mnist, monkeypatch):
    torch.manual_seed(0)
    model = mnistlab.models.CNN()
    x, y = mnist.images[50000:51000], mnist.labels[50000:51000]
    calls = []
    seedcnn = native.seedcnn
    monkeypatch.setattr(native, "seedcnn", lambda model, xb: calls.append(len(xb)) or seedcnn(model, xb))
    ours = mnistlab.evaluate(model, x, y, keep_proba=True)
    proba = mnistlab.predict_proba(model, x, batch_size=300)
    assert calls == [1000, 300, 300, 300, 100]
    monkeypatch.setattr(native, "kernels_apply", lambda model, x=None: False)
    theirs = mnistlab.evaluate(model, x, y, keep_proba=True)
    assert len(calls) == 5
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
    assert ours["acc"] == theirs["acc"]
    np.testing.assert_allclose(ours["proba"], theirs["proba"], atol=1e-6)
    np.testing.assert_allclose(proba, theirs["proba"], atol=1e-6)


def _fastcnn_pair(seed, widths=(16, 32, 64)):
    torch.manual_seed(seed)
    model = mnistlab.models.FastCNN(widths=widths)
    with torch.no_grad():  # BatchNorm weights and biases away from their initial 1 and 0
        for m in model.features:
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.add_(torch.randn_like(m.weight) * 0.2)
                m.bias.add_(torch.randn_like(m.bias) * 0.2)
    twin = mnistlab.models.FastCNN(widths=widths)
    twin.load_state_dict(model.state_dict())
    return model.train(), twin.train()


# FastCNN's widths, widecnn's, and uneven ones (any multiples of 16 up to 128 run in the kernels)
WIDTHS = [(16, 32, 64), (32, 64, 128), (48, 16, 112)]


@pytest.mark.parametrize(("n", "widths"), [(1, WIDTHS[0]), (7, WIDTHS[0]), (37, WIDTHS[0]), (100, WIDTHS[0]),
                                           (5, WIDTHS[1]), (33, WIDTHS[1]), (9, WIDTHS[2])])
def test_fastcnn_training_step_matches_pytorch(n, widths):
    """Features, logits, every gradient and the BatchNorm running statistics, two steps in a row.

    The two compute BatchNorm's output with different rounding (~1e-6), so over enough values an
    activation within that of 0 lands on the other side of a ReLU, and its gradient with it (at
    batch 256 of MNIST, about one value in a million); at these sizes none does."""
    model, twin = _fastcnn_pair(n, widths)
    for step in range(2):
        x = torch.rand(n, 784)
        y = torch.randint(0, 10, (n,))
        out_t, grads_t = _grads(model, x, y, model)
        out_n, grads_n = _grads(twin, x, y, lambda xb: native.fastcnn(twin, xb))
        torch.testing.assert_close(out_n, out_t, rtol=1e-4, atol=1e-5)
        names = [k for k, _ in model.named_parameters()]
        for name, gn, gt in zip(names, grads_n, grads_t, strict=True):
            torch.testing.assert_close(gn, gt, rtol=1e-4, atol=1e-5, msg=f"step {step}: {name}")
            assert gt.abs().max() > 0, name
        for (name, bt), bn in zip(model.named_buffers(), twin.buffers(), strict=True):
            torch.testing.assert_close(bn, bt, rtol=1e-5, atol=1e-6, msg=name)
    assert int(twin.features[1].num_batches_tracked) == 2


def test_fastcnn_kernels_only_for_the_widths_they_take():
    x = torch.rand(4, 784)
    model = mnistlab.create_model("fastcnn")
    assert native.forward_for(model.train(), x) is not model
    assert native.forward_for(model.eval(), x) is not model
    assert native.forward_for(mnistlab.create_model("widecnn").train(), x).__class__.__name__ == "function"
    for widths in [(8, 16, 32), (16, 32, 144), (16, 24, 64)]:  # not multiples of 16 up to 128
        other = mnistlab.models.FastCNN(widths=widths)
        assert native.forward_for(other.train(), x) is other, widths
    assert native.forward_for(mnistlab.create_model("bncnn"), x) is not None  # and others keep PyTorch's layers
    assert native.forward_for(mnistlab.create_model("bncnn"), x).__class__.__name__ == "BNCNN"


@pytest.mark.parametrize("widths", WIDTHS)
def test_fastcnn_evaluation_mode_matches_pytorch(widths):
    """BatchNorm with running statistics (after a few training steps moved them), in evaluation mode."""
    model, twin = _fastcnn_pair(5, widths)
    for _ in range(3):
        model(torch.rand(64, 784))  # training-mode passes update the running statistics
    model.eval()
    assert model.features[1].running_var.sub(1).abs().max() > 0.01
    x = torch.rand(50, 784)
    with torch.no_grad():
        torch.testing.assert_close(native.fastcnn_eval(model, x), model(x), rtol=1e-4, atol=1e-5)
        assert native.forward_for(model, x)(x).shape == (50, 10)


@pytest.mark.parametrize(("name", "overrides", "batches"),
                         [("fastcnn", {}, [256, 256, 256, 232]),
                          ("widecnn", {"augment": "affine", "batch_size": 128}, [128] * 7 + [104])])
def test_fit_trains_fastcnn_through_the_kernels(mnist, monkeypatch, name, overrides, batches):
    """fit (the PyTorch engine) on a FastCNN: the kernels through autograd, on and off, for one short
    epoch of the fast preset's recipe (at a gentler learning rate): equal up to rounding; for widecnn
    with augmentation too (the same random maps both times)."""
    calls = []
    fastcnn = native.fastcnn

    def counting(model, xb):
        calls.append(len(xb))
        return fastcnn(model, xb)

    monkeypatch.setattr(native, "fastcnn", counting)
    x, y = mnist.images, mnist.labels
    config = mnistlab.TrainConfig.from_preset("fast", epochs=1, lr=0.05, schedule="constant", device="cpu",
                                              **overrides)
    histories = []
    for use in (True, False):
        if not use:
            monkeypatch.setattr(native, "kernels_apply", lambda model, x=None: False)
        torch.manual_seed(0)
        model = mnistlab.create_model(name)
        histories.append(mnistlab.fit(model, x[:1000], y[:1000], x[50000:50300], y[50000:50300], config))
    assert calls == batches  # the first run's training batches; validation runs in eval mode
    # equal up to rounding (and the odd ReLU flip, see above); another batch order moves the training loss by ~7%
    assert histories[0].train_loss == pytest.approx(histories[1].train_loss, rel=1e-3)
    assert histories[0].valid_loss == pytest.approx(histories[1].valid_loss, rel=1e-2)
