"""Seeds trained together as one network (``--seeds A-B --batched``): each member is the same seed
trained alone, stops alone, and a killed batch resumes exactly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest

from mnistlab.cli import main
from mnistlab.config import TrainConfig
from mnistlab.errors import UsageError
from mnistlab.kernels import build
from mnistlab.lab.seeds import train_seeds
from mnistlab.run.batch import BATCH, train_batch
from mnistlab.run.checkpoint import STAGED, STATE, read_state, read_weights, write_state
from mnistlab.run.driver import train_run
from mnistlab.train import batched_engine

pytestmark = pytest.mark.skipif(not build.available(), reason="the members are compared with the kernel engine's runs")


def _distance(a: dict, b: dict) -> float:
    """The largest difference of any trained weight, relative to that tensor's largest value."""
    return max(float(np.max(np.abs(a[k] - b[k])) / np.max(np.abs(a[k]))) for k in a if k.endswith("weight"))


@pytest.mark.parametrize("model, extra", [("fastcnn", {"augment": "affine", "ema": 0.9}),
                                          ("widecnn", {"subsample": 0.9})])
def test_each_member_is_its_seed_trained_alone(tmp_path, small_dir, model, extra):
    """FastCNN models (BatchNorm in every layer), with augmentation and weight averaging, or each
    member on its own subset: every member (fp32, what the preset's precision "auto" comes to in a
    batch) against the kernel engine's fp32 run of its seed. The two add
    in other orders, and training amplifies the rounding (BatchNorm divides by the spread of
    channels that barely vary): up to about 1e-2 of a tensor's scale after 10 steps here, where
    another seed's run (other weights, order, augmentation, subset) is about 2 away."""
    config = TrainConfig.from_preset("fast", model=model, epochs=2, batch_size=128, lr=0.02, data_dir=str(small_dir),
                                     device="cpu", **extra)
    seeds = [0, 1, 2]
    summary = train_seeds(config, seeds, tmp_path / "batch", batched=True)
    assert [r["seed"] for r in summary["runs"]] == seeds and summary["stopped"] == {}
    alone = {s: train_run(replace(config, seed=s, precision="fp32"), tmp_path / f"alone-{s}") for s in seeds}
    for s in seeds:
        member = tmp_path / "batch" / f"seed-{s}"
        ours, theirs = read_weights(member), read_weights(alone[s].run_dir)
        assert ours.keys() == theirs.keys()
        other = read_weights(alone[(s + 1) % 3].run_dir)
        assert _distance(theirs, ours) < 0.05 < 0.5 < _distance(other, ours), (s, _distance(theirs, ours))
        for k in ours:  # the BatchNorm counters, exactly
            if k.endswith("num_batches_tracked"):
                assert ours[k] == theirs[k]
        summary = json.loads((member / "summary.json").read_text())
        assert summary["engine"] == "batched" and summary["batch"] == seeds
        assert summary["valid_loss"] == pytest.approx(alone[s].summary["valid_loss"], rel=5e-3)
        recorded = json.loads((member / "config.json").read_text())
        assert recorded["seed"] == s and recorded["precision"] == "fp32"
        for name in ("model.safetensors", "metrics.csv", "loss.png", "predictions.png", "example.png"):
            assert (member / name).is_file(), name


def test_a_member_that_diverges_stops_alone(tmp_path, small_dir, monkeypatch):
    """Seed 1's loss becomes NaN in epoch 2 (its weights poisoned): it stops with its epoch-1
    checkpoint and one line; seeds 0 and 2 finish as in a batch without it."""
    real = batched_engine.BatchedEngine.train_epoch

    def poisoned(self, epoch, on_batch=None):
        if epoch == 2:
            with batched_engine.torch.no_grad():
                self.state["head.weight"][1].fill_(float("nan"))
        return real(self, epoch, on_batch)

    config = TrainConfig.from_preset("fast", epochs=3, batch_size=128, lr=0.02, data_dir=str(small_dir), device="cpu")
    stops = []
    clean = train_batch(config, [0, 2], tmp_path / "clean")
    monkeypatch.setattr(batched_engine.BatchedEngine, "train_epoch", poisoned)
    results = train_batch(config, [0, 1, 2], tmp_path / "batch", on_stop=lambda s, m: stops.append((s, m)))
    assert sorted(results) == [0, 2] and [s for s, _ in stops] == [1]
    assert "training diverged: the loss became nan in epoch 2" in stops[0][1]
    sick = tmp_path / "batch" / "seed-1"
    assert not (sick / "summary.json").exists() and read_state(sick, arrays=False)[0]["epoch"] == 1
    assert json.loads((tmp_path / "batch" / BATCH).read_text())["stopped"]["1"] == stops[0][1]
    for s in (0, 2):
        ours, theirs = read_weights(results[s].run_dir), read_weights(clean[s].run_dir)
        assert _distance(theirs, ours) < 1e-4 and np.isfinite(ours["head.weight"]).all()


def _cmd(out, *extra):
    return [sys.executable, "-m", "mnistlab", "train", "--preset", "fast", "--epochs", "6", "--batch-size", "32",
            "--seeds", "0,1", "--batched", "--device", "cpu", *extra, "--out", str(out)]


def test_a_killed_batch_resumes_bit_identical(tmp_path, small_dir):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_cmd(whole, "--data-dir", str(small_dir)), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(_cmd(killed, "--data-dir", str(small_dir)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not ((killed / BATCH).is_file() and json.loads((killed / BATCH).read_text()).get("epoch", 0) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "seeds.json").exists()
    done = subprocess.run([sys.executable, "-m", "mnistlab", "train", "--resume", str(killed)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    for s in (0, 1):
        a, b = (read_weights(d / f"seed-{s}") for d in (whole, killed))
        assert all(np.array_equal(a[k], b[k]) for k in a), s
        assert not (killed / f"seed-{s}" / STAGED).exists() and (killed / f"seed-{s}" / STATE).exists()
    assert json.loads((killed / "seeds.json").read_text())["valid_acc"] == \
        json.loads((whole / "seeds.json").read_text())["valid_acc"]


@pytest.mark.parametrize("when", ["before the commit", "after the commit"])
def test_a_batch_killed_between_saves_settles_on_one_epoch(tmp_path, small_dir, when):
    """Killed while saving an epoch: before ``batch.json`` moved on, the staged checkpoints are dropped
    (the batch resumes from the epoch before); after, they take their place. Either way the batch
    ends as an uninterrupted one, bit for bit."""
    config = TrainConfig.from_preset("fast", epochs=3, batch_size=128, lr=0.02, data_dir=str(small_dir), device="cpu")
    whole = train_batch(config, [0, 1], tmp_path / "whole")
    out = tmp_path / "batch"

    def stop(seed, record):
        if seed == 1 and record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_batch(config, [0, 1], out, on_epoch=stop)
    assert json.loads((out / BATCH).read_text())["epoch"] == 1
    if when == "before the commit":  # seed 0's epoch 2 staged, never committed
        meta, arrays = read_state(out / "seed-0")
        write_state(out / "seed-0", arrays, {**meta, "epoch": 2}, STAGED)
    else:  # committed, not yet in place
        for s in (0, 1):
            (out / f"seed-{s}" / STATE).rename(out / f"seed-{s}" / STAGED)
    resumed = train_batch(None, None, out, mode="resume")
    for s in (0, 1):
        a, b = read_weights(whole[s].run_dir), read_weights(resumed[s].run_dir)
        assert all(np.array_equal(a[k], b[k]) for k in a), s
        assert not (out / f"seed-{s}" / STAGED).exists()


@pytest.mark.parametrize("args, message", [
    (["--batched"], "give --seeds too"),
    (["--seeds", "0,1", "--batched", "--model", "cnn"], "--batched: batched training takes fastcnn, widecnn"),
    (["--seeds", "0,1", "--batched", "--storage", "sqlite:///x.db"], "leave out --storage"),
    (["--seeds", "0,1", "--batched", "--precision", "bf16", "--preset", "fast"], "--batched trains in fp32"),
    (["--seeds", "0,1", "--batched", "--sync-bn", "--preset", "fast"], "--batched trains in fp32 in one process"),
])
def test_batched_refusals_are_one_line(tmp_path, small_dir, capsys, args, message):
    assert main(["train", *args, "--data-dir", str(small_dir), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_resuming_a_finished_batch_is_refused(tmp_path, small_dir):
    config = TrainConfig.from_preset("fast", epochs=1, batch_size=128, data_dir=str(small_dir), device="cpu")
    train_batch(config, [0, 1], tmp_path / "b")
    with pytest.raises(UsageError, match="the batch already finished"):
        train_batch(None, None, tmp_path / "b", mode="resume")


def test_a_member_is_used_as_any_run_and_resumed_only_with_its_batch(tmp_path, small_dir, capsys):
    config = TrainConfig.from_preset("fast", epochs=2, batch_size=128, data_dir=str(small_dir), device="cpu")
    out = tmp_path / "b"

    def stop(seed, record):
        if record["epoch"] == 1 and seed == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_batch(config, [0, 1], out, on_epoch=stop)
    assert main(["train", "--resume", str(out / "seed-0")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "resume the batch: mnistlab train --resume OUT" in err, err
    assert main(["train", "--resume", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out / "seed-0"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["valid_acc"] == json.loads((out / "seed-0" / "summary.json").read_text())["valid_acc"]
    assert main(["ensemble", str(out / "seed-0"), str(out / "seed-1")]) == 0


def test_a_damaged_batch_record_is_one_line(tmp_path, capsys):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / BATCH).write_text("{not json")
    assert main(["train", "--resume", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{BATCH}: unreadable" in err, err
