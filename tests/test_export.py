"""Exported models give the PyTorch model's outputs."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

import mnistlab
from mnistlab.cli import main

from .test_cli import run_cli
from .test_use import TRAINED


@pytest.fixture(scope="module")
def valid_pixels(mnist):
    return mnist.images[50000:51000].astype(np.float32) / 256  # 1,000 validation images


@pytest.fixture(scope="module")
def reference(valid_pixels):
    model = mnistlab.load_run(TRAINED).model
    with torch.no_grad():
        return model(torch.from_numpy(valid_pixels)).numpy()


def test_onnx_matches_pytorch(tmp_path, valid_pixels, reference, capsys):
    out = tmp_path / "cnn.onnx"
    assert main(["export", str(TRAINED), "--format", "onnx", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"pixels": valid_pixels})
    assert logits.shape == (1000, 10)
    assert np.abs(logits - reference).max() < 1e-5


def test_torchscript_matches_pytorch(tmp_path, valid_pixels, reference):
    out = tmp_path / "cnn.pt"
    assert main(["export", str(TRAINED), "--format", "torchscript", "--out", str(out)]) == 0
    loaded = torch.jit.load(str(out))
    with torch.no_grad():
        logits = loaded(torch.from_numpy(valid_pixels)).numpy()
    assert np.abs(logits - reference).max() < 1e-5


def test_export_refusals(tmp_path, capsys):
    assert main(["export", str(tmp_path / "none")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert run_cli(["export", str(TRAINED), "--format", "tflite"]) == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["deskewcnn", "normcnn"])
def test_models_that_deskew_inside_export_with_it(tmp_path, small_dir, mnist, name, capsys):
    run = tmp_path / name
    assert main(["train", "--model", name, "--epochs", "1", "--data-dir", str(small_dir), "--out", str(run)]) == 0
    assert '"engine": "autograd"' in (run / "summary.json").read_text()
    pixels = mnist.images[60000:60300].astype(np.float32) / 256
    model = mnistlab.load_run(run).model
    with torch.no_grad():
        reference = model(torch.from_numpy(pixels)).numpy()
        plain = mnistlab.models.FastCNN.forward(model, torch.from_numpy(pixels)).numpy()
    assert np.abs(plain - reference).max() > 1e-3  # the deskewing is part of the saved model
    assert main(["export", str(run), "--format", "onnx"]) == 0
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"pixels": pixels})
    assert np.abs(logits - reference).max() < 1e-4
    assert main(["export", str(run), "--format", "torchscript"]) == 0
    with torch.no_grad():
        assert np.abs(torch.jit.load(str(run / "model.pt"))(torch.from_numpy(pixels)).numpy() - reference).max() < 1e-4
