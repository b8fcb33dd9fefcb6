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
