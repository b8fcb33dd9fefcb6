"""Data-parallel runs through torchrun: 2 gloo processes on small slices of MNIST."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from .conftest import write_idx_dir


@pytest.fixture(scope="module")
def medium_dir(tmp_path_factory, mnist):
    """6,000 + 2,000 real images."""
    images, labels = mnist.images.reshape(-1, 28, 28), mnist.labels.astype(np.uint8)
    return write_idx_dir(tmp_path_factory.mktemp("medium") / "d", images[:6000], labels[:6000],
                         images[60000:62000], labels[60000:62000])


def _train(data_dir, out, *extra, epochs=2, nproc=2, model="cnn"):
    return [sys.executable, "-m", "mnistlab", "train", "--model", model, "--epochs", str(epochs), "--data-dir",
            str(data_dir), "--device", "cpu", "--out", str(out), "--nproc", str(nproc), *extra]


def _run(cmd, timeout=300):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _worker(out, rank: int) -> int | None:
    """The pid of the job's process of ``rank`` (found by its environment)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        job = [e for e in env if e.startswith(b"MNISTLAB_JOB_ARGV=")]
        if job and str(out).encode() in job[0] and f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def _wait_for_epochs(run, proc, n):
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= n):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)


def test_two_processes_repeat_exactly_print_once_and_score_as_one(tmp_path, small_dir):
    runs = [tmp_path / "a", tmp_path / "b"]
    outputs = [_run(_train(small_dir, run)) for run in runs]
    for done in outputs:
        assert done.returncode == 0, done.stderr[-2000:]
    out = outputs[0].stdout
    assert out.count("training cnn:") == 1 and out.count("epoch   1/2") == 1 and out.count("epoch   2/2") == 1
    assert out.count("valid_acc") == 3  # two epochs and the final line: rank 1 printed nothing
    assert (runs[0] / "model.safetensors").read_bytes() == (runs[1] / "model.safetensors").read_bytes()
    config = json.loads((runs[0] / "config.json").read_text())
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert config["nproc"] == 2 and summary["engine"] == "autograd"
    # the validation part was split between the processes and joined: one process scores it the same
    evaluated = _run([sys.executable, "-m", "mnistlab", "evaluate", str(runs[0]), "--json"])
    assert json.loads(evaluated.stdout)["valid_acc"] == summary["valid_acc"]


def test_accuracy_is_within_noise_of_one_process(tmp_path, medium_dir):
    one = _run(_train(medium_dir, tmp_path / "one", epochs=3, nproc=1, model="linear"))
    two = _run(_train(medium_dir, tmp_path / "two", epochs=3, nproc=2, model="linear"))
    assert one.returncode == two.returncode == 0, two.stderr[-2000:]
    acc = [json.loads((tmp_path / r / "summary.json").read_text())["valid_acc"] for r in ("one", "two")]
    assert acc[0] > 0.8 and abs(acc[0] - acc[1]) < 0.02, acc  # other random numbers, the same recipe


def test_a_killed_process_restarts_the_job_from_its_checkpoint_bit_for_bit(tmp_path, medium_dir):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _run(_train(medium_dir, whole, epochs=12)).returncode == 0
    proc = subprocess.Popen(_train(medium_dir, killed, "--max-restarts", "1", epochs=12),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_epochs(killed, proc, 2)
    pid = _worker(killed, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "resuming" in out  # torchrun restarted both processes, which continued the run
    assert (whole / "model.safetensors").read_bytes() == (killed / "model.safetensors").read_bytes()
    assert (whole / "metrics.csv").read_text().splitlines()[1:][0].split(",")[:4] == \
        (killed / "metrics.csv").read_text().splitlines()[1:][0].split(",")[:4]


def test_a_silent_process_ends_the_job_in_one_line(tmp_path, medium_dir):
    run = tmp_path / "run"
    proc = subprocess.Popen(_train(medium_dir, run, "--dist-timeout", "3", epochs=30), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_epochs(run, proc, 1)
    pid = _worker(run, 1)
    os.kill(pid, signal.SIGSTOP)
    try:
        _, err = proc.communicate(timeout=180)
    finally:
        if _worker(run, 1):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 1
    assert err.count("\n") == 1 and "stopped answering for longer than --dist-timeout" in err, err
    assert not (run / "summary.json").exists() and (run / "checkpoint.safetensors").exists()


def test_two_jobs_at_once_do_not_collide(tmp_path, small_dir):
    procs = [subprocess.Popen(_train(small_dir, tmp_path / f"job{i}"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    assert (tmp_path / "job0" / "model.safetensors").read_bytes() == \
        (tmp_path / "job1" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--preset", "fast", "--nproc", "2"], "trains in one process"),
    (["--model", "bncnn", "--nproc", "2", "--sync-bn"], "--sync-bn synchronises BatchNorm across GPUs"),
    (["--seeds", "0,1", "--nproc", "2"], "leave out --nproc"),
    (["--nproc", "0"], "expected a positive integer"),
    (["--max-restarts", "-1"], "expected a whole number >= 0"),
])
def test_refusals_are_one_line(tmp_path, small_dir, args, message):
    done = _run([sys.executable, "-m", "mnistlab", "train", *args, "--data-dir", str(small_dir), "--out",
                 str(tmp_path / "r")])
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not (tmp_path / "r").exists()


def test_resuming_with_another_number_of_processes_is_refused(tmp_path, small_dir):
    run = tmp_path / "run"
    assert _run(_train(small_dir, run, epochs=1)).returncode == 0
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "epochs": 2}))
    (run / "summary.json").unlink()
    env = {**os.environ, "MNISTLAB_JOB_ARGV": json.dumps(["train", "--resume", str(run)])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
                           "-m", "mnistlab"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert "trained in 2 processes; continue it with the same number (this job has 3)" in done.stderr
    resumed = _run([sys.executable, "-m", "mnistlab", "train", "--resume", str(run)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]  # the CLI starts the job with the run's own 2
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2
