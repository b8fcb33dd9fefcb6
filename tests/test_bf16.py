"""The kernels' bf16 convolutions (AVX512-BF16): each of conv1's, conv2's and conv3's products against
the same product computed exactly (float64) from the bf16-rounded operands, and training with them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mnistlab.kernels import build, calls, fastcnn

pytestmark = pytest.mark.skipif(not calls.bf16_available(),
                                reason="no bf16 kernels here: the CPU lacks AVX512-BF16, or MNISTLAB_BF16=0")


def _bf16(a) -> torch.Tensor:
    """float32 values rounded to bf16 (nearest, ties to even), back in float64."""
    return torch.as_tensor(np.ascontiguousarray(a)).to(torch.bfloat16).double()


def _grid(a, n, side, c) -> torch.Tensor:
    return torch.as_tensor(a).reshape(n, side, side, c).permute(0, 3, 1, 2)


def _bn_relu(z, n, side, c, mean, var, gamma, beta, front, back) -> np.ndarray:
    """BatchNorm (batch statistics) and ReLU of z (n, side * side, c) in float32 as the kernels compute
    it (multiply-adds rounded once), in zero-bordered grids (front and back rows and columns of zeros),
    channels last."""
    f64 = np.float64
    scale = (gamma / np.sqrt(var + np.float32(1e-5))).astype(np.float32)
    shift = (beta.astype(f64) - mean.astype(f64) * scale).astype(np.float32)
    h = np.maximum((z.reshape(n, side, side, c).astype(f64) * scale + shift).astype(np.float32), 0)
    return np.pad(h, ((0, 0), (front, back), (front, back), (0, 0))).reshape(n, -1)


def _bn_back(g, z, mean, var, gamma) -> torch.Tensor:
    """BatchNorm's backward in training mode (batch statistics) in float64: the gradient at its input
    given g at its output; channels on axis 1."""
    shape = (1, -1, 1, 1)
    mean, var, gamma = (torch.as_tensor(np.asarray(v, np.float64)).reshape(shape) for v in (mean, var, gamma))
    inv = 1 / torch.sqrt(var + 1e-5)
    xhat = (z.double() - mean) * inv
    dims = (0, 2, 3)
    return gamma * inv * (g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("widths", [(16, 32, 64), (32, 64, 128), (16, 48, 32)])
def test_every_bf16_product_is_the_exact_one_of_the_rounded_operands(mnist, widths):
    """Forward (conv1, conv2, conv3 outputs), the three weights' gradients and both 3x3 convs' inputs' gradients:
    the kernels' sums of bf16 products equal float64 sums of the same rounded operands to fp32
    summation rounding (1e-5), where the fp32 kernels differ by bf16's rounding (1e-3)."""
    n = 37  # not a multiple of the images in flight, nor of the image pairs
    x = (mnist.images[:n].reshape(n, 784).astype(np.float32) / 256)
    y = mnist.labels[:n].astype(np.int64)
    state = fastcnn.init_state(3, 10, widths)
    params = [np.ascontiguousarray(state[k]) for k in fastcnn.PARAMS]
    c1, c2, c3 = widths
    runs = {}
    for bf16 in (False, True):
        stats = np.zeros((6, calls.MAX_WIDTH), np.float32)
        feats, saved = calls.fastcnn_forward(x, params[:9], stats, False, bf16=bf16)
        _, gfeat, _, _ = calls.fastcnn_head(feats, params[9], params[10], y, 0.1)
        grads = [np.empty_like(p) for p in params[:9]]
        scratch = [np.empty((n, size), np.float32) for size in calls.fast_scratch(widths)]
        calls.fastcnn_backward(params[:9], saved, stats, gfeat, grads, scratch, bf16=bf16)
        runs[bf16] = ([s.copy() for s in saved], grads, scratch, stats)
    saved, grads, scratch, stats = runs[True]
    xp, z1, h1, z2, h2, z3, _ = saved
    # with bf16, h1 and h2 are not saved: the convs' inputs are BatchNorm and ReLU of z1 and z2
    h1 = _bn_relu(z1, n, 14, c1, stats[0, :c1], stats[1, :c1], params[1], params[2], front=1, back=0)
    h2 = _bn_relu(z2, n, 7, c2, stats[2, :c2], stats[3, :c2], params[4], params[5], front=1, back=1)
    gy3, gy2, gy1 = scratch[0], scratch[2], scratch[4]
    # conv1 on the standardised input in its zero-bordered 31x31 grid
    w1r = _bf16(params[0]).requires_grad_()
    z1x = F.conv2d(_bf16(_grid(xp, n, 31, 1)), w1r, stride=2)
    assert _rel(_grid(z1, n, 14, c1), z1x.detach()) < 1e-5
    z1x.backward(_bf16(_grid(gy1, n, 14, c1)))
    assert _rel(grads[0], w1r.grad) < 1e-5
    w2, w3 = _bf16(params[3]), _bf16(params[6])
    # forward: the 15x15 and 9x9 grids hold the zero padding conv2 and conv3 read
    h1g, h2g = _bf16(_grid(h1, n, 15, c1)).requires_grad_(), _bf16(_grid(h2, n, 9, c2)).requires_grad_()
    w2r, w3r = w2.clone().requires_grad_(), w3.clone().requires_grad_()
    z2x, z3x = F.conv2d(h1g, w2r, stride=2), F.conv2d(h2g, w3r, stride=2)
    assert _rel(_grid(z2, n, 7, c2), z2x.detach()) < 1e-5 and _rel(_grid(z3, n, 4, c3), z3x.detach()) < 1e-5
    # backward: the gradients at the convs' outputs (BatchNorm's backward applied), rounded
    z3x.backward(_bf16(_grid(gy3, n, 4, c3)))
    z2x.backward(_bf16(_grid(gy2, n, 7, c2)))
    assert _rel(grads[6], w3r.grad) < 1e-5 and _rel(grads[3], w2r.grad) < 1e-5
    # the inputs' gradients as the next BatchNorm backward receives them: masked by the ReLU, then through it
    h1r, h2r = _grid(h1, n, 15, c1)[:, :, 1:, 1:], _grid(h2, n, 9, c2)[:, :, 1:8, 1:8]
    gz2 = _bn_back(h2g.grad[:, :, 1:8, 1:8] * (h2r > 0), _grid(z2, n, 7, c2), stats[2, :c2], stats[3, :c2], params[4])
    gz1 = _bn_back(h1g.grad[:, :, 1:, 1:] * (h1r > 0), _grid(z1, n, 14, c1), stats[0, :c1], stats[1, :c1], params[1])
    assert _rel(_grid(gy2, n, 7, c2), gz2) < 1e-5 and _rel(_grid(gy1, n, 14, c1), gz1) < 1e-5
    # and the fp32 kernels' results differ from them by bf16's rounding, no more
    fp32_saved, fp32_grads = runs[False][:2]
    assert 1e-4 < _rel(fp32_saved[3], z2) < 2e-2 and 1e-4 < _rel(fp32_grads[6], grads[6]) < 0.1
    assert 1e-4 < _rel(fp32_saved[1], z1) < 2e-2 and 1e-4 < _rel(fp32_grads[0], grads[0]) < 0.1


def test_training_with_bf16_convolutions_learns_as_fp32(tmp_path, mnist):
    """One epoch of the fast preset on the seed's split (50,000 images): the same accuracy to a few
    tenths of a point (98.5-98.8% here), the same loss to a few percent."""
    import mnistlab
    from mnistlab.config import TrainConfig
    from mnistlab.run.checkpoint import read_state

    results = {}
    for precision in ("fp32", "bf16"):
        config = TrainConfig.from_preset("fast", epochs=1, precision=precision, device="cpu")
        results[precision] = mnistlab.train_run(config, tmp_path / precision, dataset=mnist)
    a, b = results["fp32"].summary, results["bf16"].summary
    assert b["engine"] == "kernels" and b["precision"] == "bf16" and a["precision"] == "fp32"
    assert abs(a["valid_acc"] - b["valid_acc"]) < 0.005 and b["valid_acc"] > 0.98, (a["valid_acc"], b["valid_acc"])
    assert results["bf16"].history.epochs[-1]["train_loss"] == pytest.approx(
        results["fp32"].history.epochs[-1]["train_loss"], rel=0.05)
    assert read_state(tmp_path / "bf16", arrays=False)[0]["precision"] == "bf16"


def test_the_fp32_kernels_stay_where_bf16_is_not_asked(monkeypatch, small_dir, tmp_path):
    """MNISTLAB_BF16=0 stands for a CPU without the instructions: bf16 is refused in one line, fp32
    runs as before."""
    monkeypatch.setenv("MNISTLAB_BF16", "0")
    assert not calls.bf16_available() and build.available()
    from mnistlab.cli import main

    assert main(["train", "--preset", "fast", "--epochs", "1", "--precision", "bf16", "--data-dir", str(small_dir),
                 "--out", str(tmp_path / "r"), "--device", "cpu"]) == 2
    assert main(["train", "--preset", "fast", "--epochs", "1", "--data-dir", str(small_dir),
                 "--out", str(tmp_path / "ok"), "--device", "cpu"]) == 0
    # the preset's "auto" came to fp32 here, and the run says so
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["precision"] == "fp32"
    assert json.loads((tmp_path / "ok" / "summary.json").read_text())["precision"] == "fp32"


def test_the_presets_take_bf16_where_it_is(tmp_path, small_dir, capsys):
    """--preset fast's precision "auto" is bf16 on this CPU, and the run records bf16 (config.json, which a
    resume reads, summary.json and the checkpoint); --precision fp32 still gives fp32."""
    from mnistlab.cli import main
    from mnistlab.run.checkpoint import read_state

    args = ["train", "--preset", "fast", "--epochs", "1", "--data-dir", str(small_dir), "--device", "cpu"]
    for run, extra, precision in (("auto", [], "bf16"), ("fp32", ["--precision", "fp32"], "fp32")):
        assert main(args + extra + ["--out", str(tmp_path / run)]) == 0
        banner = capsys.readouterr().out.splitlines()[0]  # the banner says what the run computes in
        assert ("precision bf16" in banner) == (precision == "bf16") and "precision auto" not in banner
        assert json.loads((tmp_path / run / "config.json").read_text())["precision"] == precision
        assert json.loads((tmp_path / run / "summary.json").read_text())["precision"] == precision
        assert read_state(tmp_path / run, arrays=False)[0]["precision"] == precision


def test_bf16_is_refused_where_autograd_trains(tmp_path, small_dir):
    import mnistlab
    from mnistlab.config import TrainConfig
    from mnistlab.errors import UsageError

    x = np.zeros((4, 784), np.uint8)
    with pytest.raises(UsageError, match="fit trains the model it is handed with autograd, in fp32"):
        mnistlab.fit(mnistlab.create_model("fastcnn"), x, np.zeros(4, np.int64), x, np.zeros(4, np.int64), epochs=1,
                     precision="bf16")
    with pytest.raises(UsageError, match="--precision bf16 runs on the kernels engine"):
        mnistlab.train_run(TrainConfig(model="cnn", epochs=1, precision="bf16", data_dir=str(small_dir),
                                       device="cpu"), tmp_path / "r")
    assert not (tmp_path / "r").exists()
