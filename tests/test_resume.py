"""Interrupted training resumes exactly: SIGKILL mid-epoch, SIGINT, then --resume."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from mnistlab.cli import main

from .conftest import write_idx_dir


@pytest.fixture(scope="module")
def medium_dir(tmp_path_factory, mnist):
    """6,000 + 2,000 real images: epochs long enough to be interrupted in the middle."""
    images, labels = mnist.images.reshape(-1, 28, 28), mnist.labels.astype(np.uint8)
    return write_idx_dir(tmp_path_factory.mktemp("medium") / "d", images[:6000], labels[:6000],
                         images[60000:62000], labels[60000:62000])


# Interrupted runs are this long: with the compiled kernels an epoch of the seed's CNN on these
# 6,000 images takes about 0.1 s here, so 20 epochs leave about 2 s between the interruption and
# the run's end (6 left a few tenths, and a fast moment let the run finish first).
EPOCHS = 20


def _train_cmd(data_dir, out, epochs=EPOCHS):
    return [sys.executable, "-m", "mnistlab", "train", "--data-dir", str(data_dir), "--epochs", str(epochs),
            "--out", str(out), "--device", "cpu"]


def _metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in rows]


def _assert_same_run(a, b):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        np.testing.assert_array_equal(wa[key], wb[key])  # bit for bit
    assert _metrics(a) == _metrics(b)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert sa["valid_acc"] == sb["valid_acc"] and sa["grid_predictions"] == sb["grid_predictions"]


def _start_and_interrupt(cmd, run, sig):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.safetensors").exists():  # epoch 1 is done
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.02)
    time.sleep(0.15)  # inside epoch 2; the later epochs leave the margin (see EPOCHS)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize(("extra", "epochs"),
                         [([], EPOCHS), (["--ema", "0.99"], EPOCHS),
                          (["--model", "fastcnn", "--batch-size", "32"], 6),  # 0.45 s epochs: 6 are enough
                          (["--preset", "fast", "--batch-size", "32"], 6)],  # precision auto: bf16 where it can
                         ids=["plain", "ema", "kernels", "preset"])
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, medium_dir, extra, epochs):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(_train_cmd(medium_dir, reference, epochs) + extra, check=True, capture_output=True)
    code, _ = _start_and_interrupt(_train_cmd(medium_dir, killed, epochs) + extra, killed, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (killed / "summary.json").exists()  # an unfinished run is not passed off as complete
    done = len(_metrics(killed))
    assert 1 <= done < epochs
    assert main(["train", "--resume", str(killed)]) == 0
    _assert_same_run(reference, killed)


def test_ctrl_c_saves_and_prints_the_resume_command(tmp_path, medium_dir):
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    subprocess.run(_train_cmd(medium_dir, reference), check=True, capture_output=True)
    code, err = _start_and_interrupt(_train_cmd(medium_dir, stopped), stopped, signal.SIGINT)
    assert code == 130
    assert f"Resume with: mnistlab train --resume {stopped}" in err and "Traceback" not in err
    assert main(["train", "--resume", str(stopped)]) == 0
    _assert_same_run(reference, stopped)


def test_resume_refusals(tmp_path, small_dir, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(small_dir), "--epochs", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    assert "already finished" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    (run / "summary.json").unlink()
    (run / "checkpoint.safetensors").write_bytes(b"garbage")
    assert main(["train", "--resume", str(run)]) == 1
    assert "unreadable checkpoint" in capsys.readouterr().err


def test_a_forced_rerun_replaces_the_old_run(tmp_path, small_dir):
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(small_dir), "--epochs", "2", "--out", str(run)]) == 0
    assert main(["train", "--data-dir", str(small_dir), "--epochs", "1", "--out", str(run), "--force"]) == 0
    assert len(_metrics(run)) == 1 and json.loads((run / "summary.json").read_text())["epochs"] == 1
    assert os.path.exists(run / "checkpoint.safetensors")


def test_a_full_disk_stops_training_cleanly_and_resume_finishes(tmp_path, small_dir, monkeypatch, capsys):
    """The second epoch's checkpoint hits ENOSPC half-way through: one line, exit 1, the first
    epoch's checkpoint intact, no temporary file left, no summary; once there is room, --resume finishes."""
    from mnistlab import files

    real_mkstemp, real_fdopen = files.tempfile.mkstemp, files.os.fdopen
    state = {"prefix": "", "checkpoints": 0}

    def mkstemp(*args, **kwargs):
        state["prefix"] = kwargs.get("prefix", "")
        return real_mkstemp(*args, **kwargs)

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    def fdopen(fd, mode):
        f = real_fdopen(fd, mode)
        if state["prefix"].startswith(".checkpoint.safetensors"):
            state["checkpoints"] += 1
            if state["checkpoints"] == 2:
                return FullDisk(f)
        return f

    run = tmp_path / "run"
    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(files.os, "fdopen", fdopen)
    assert main(["train", "--data-dir", str(small_dir), "--epochs", "3", "--out", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"mnistlab train: error: No space left on device: {run / 'checkpoint.safetensors'}"
    assert not (run / "summary.json").exists()
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert len(_metrics(run)) == 1  # the metrics of the epoch whose checkpoint made it
    monkeypatch.undo()
    assert main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs"] == 3
