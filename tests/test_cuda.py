"""The CUDA path: every preset and model on the GPU, resume after SIGKILL there, and a GPU-trained run
used on the CPU. Marked ``cuda``; skipped where PyTorch sees no GPU (benchmarks/gpu_check.sh runs them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import mnistlab
from mnistlab.cli import main
from mnistlab.config import MODEL_NAMES, PRESETS

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (benchmarks/gpu_check.sh)")]

CPU_ONLY = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def _summary(run):
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_learns_in_one_epoch_on_the_gpu(tmp_path, preset):
    """One epoch of every preset on the full training part: far above chance (10%), as on the CPU."""
    run = tmp_path / preset
    assert main(["train", "--preset", preset, "--epochs", "1", "--device", "cuda", "--out", str(run)]) == 0
    s = _summary(run)
    assert s["device"] == "cuda" and s["engine"] == "autograd" and s["valid_acc"] > 0.9, s["valid_acc"]


def _weights(run) -> dict:
    return load_file(run / "model.safetensors")


def _identical(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args", [["--model", "cnn", "--epochs", "2"],
                                  ["--model", "bncnn", "--epochs", "1", "--augment", "affine"],
                                  ["--preset", "fast", "--epochs", "2", "--augment", "affine", "--drop-last"]])
def test_two_runs_of_a_seed_are_bit_identical_on_the_gpu(tmp_path, small_dir, args):
    """Deterministic algorithms by default: convolutions, pooling, BatchNorm, dropout and augmentation
    drawn on the GPU give the same weights twice."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        assert main(["train", *args, "--device", "cuda", "--data-dir", str(small_dir), "--out", str(run)]) == 0
    assert _identical(_weights(runs[0]), _weights(runs[1]))
    assert json.loads((runs[0] / "config.json").read_text())["deterministic"] is True


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_every_model_trains_on_the_gpu_with_device_auto(tmp_path, small_dir, model):
    run = tmp_path / model
    assert main(["train", "--model", model, "--epochs", "1", "--data-dir", str(small_dir), "--out", str(run)]) == 0
    assert _summary(run)["device"] == "cuda"
    assert json.loads((run / "config.json").read_text())["resolved_device"] == "cuda"


@pytest.mark.parametrize("args", [["--model", "cnn"], ["--preset", "fast", "--drop-last"]], ids=["eager", "graphed"])
def test_resume_after_sigkill_on_the_gpu(tmp_path, mnist, args):
    """A run killed after two epochs and resumed ends with the uninterrupted run's weights, bit for bit
    (graphed: the resumed run's first steps are eager again)."""
    def cmd(out):
        return [sys.executable, "-m", "mnistlab", "train", *args, "--epochs", "6", "--device", "cuda",
                "--out", str(out)]

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(cmd(whole), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = killed / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()
    assert main(["train", "--resume", str(killed)]) == 0
    assert _identical(_weights(whole), _weights(killed))
    assert _summary(killed)["valid_acc"] == _summary(whole)["valid_acc"]


def test_drop_last_captures_the_step_as_a_cuda_graph(small_dir, monkeypatch):
    """With every batch full the step runs as a replayed CUDA graph, and learns as the eager loop does."""
    from mnistlab.data.mnist import load_dataset
    from mnistlab.run.rundir import load_split
    from mnistlab.train.autograd_engine import AutogradEngine

    config = mnistlab.TrainConfig.from_preset("fast", epochs=2, batch_size=64, drop_last=True,
                                              data_dir=str(small_dir), device="cuda")
    ds = load_dataset(config.data_dir)
    runs = []
    for graphed in (True, False):
        if not graphed:
            monkeypatch.setattr(AutogradEngine, "_graphable", lambda self, on_batch: False)
        engine = AutogradEngine.create(config, ds.num_classes, "cuda")
        engine.set_data(*load_split(config, ds))
        losses = [engine.train_epoch(e) for e in (1, 2)]
        runs.append((engine, losses))
    assert runs[0][0].graphed.graph is not None and getattr(runs[1][0], "graphed", None) is None
    assert runs[0][1] == pytest.approx(runs[1][1], rel=1e-3)
    a, b = runs[0][0].weights(), runs[1][0].weights()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-2, atol=1e-4, err_msg=k)


def test_a_gpu_trained_run_is_used_on_the_cpu(tmp_path, mnist):
    run = tmp_path / "run"
    assert main(["train", "--preset", "fast", "--device", "cuda", "--out", str(run)]) == 0
    for args in (["evaluate", str(run), "--json"], ["predict", str(run), "--valid", "0:9", "--json"],
                 ["export", str(run), "--format", "onnx"], ["report", str(run)]):
        done = subprocess.run([sys.executable, "-m", "mnistlab", *args], capture_output=True, text=True,
                              env=CPU_ONLY, timeout=300)
        assert done.returncode == 0, (args, done.stderr)
    evaluated = json.loads(subprocess.run([sys.executable, "-m", "mnistlab", "evaluate", str(run), "--json"],
                                          capture_output=True, text=True, env=CPU_ONLY).stdout)
    assert evaluated["valid_acc"] == pytest.approx(_summary(run)["valid_acc"], abs=1e-3)
    code = ("import json, sys; from fastapi.testclient import TestClient; from mnistlab.use.serve import create_app;"
            f"c = TestClient(create_app({str(run)!r})); "
            "print(c.post('/predict', json={'pixels': [0] * 784}).status_code)")
    served = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=CPU_ONLY, timeout=300)
    assert served.stdout.strip() == "200", served.stderr
    assert mnistlab.load_run(run).predict(mnist.images[50000:50010]).shape == (10,)


def test_the_nccl_path_with_one_process(tmp_path, small_dir):
    """The only multi-process check one GPU allows: a torchrun job of one process on NCCL."""
    env = {**os.environ, "MNISTLAB_JOB_ARGV": json.dumps(["train", "--model", "bncnn", "--epochs", "1", "--device",
                                                          "cuda", "--data-dir", str(small_dir), "--out",
                                                          str(tmp_path / "run")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                           "-m", "mnistlab"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    s = _summary(tmp_path / "run")
    assert s["device"] == "cuda" and json.loads((tmp_path / "run" / "config.json").read_text())["nproc"] == 1
