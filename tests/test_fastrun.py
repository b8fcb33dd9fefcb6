"""FastCNN runs without PyTorch (mnistlab.fastrun): when they apply, what they write, and that
the rest of the tool reads their runs as PyTorch's."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import mnistlab
from mnistlab import fastpath, fastrun, native
from mnistlab.cli import main
from mnistlab.config import FASTCNN_WIDTHS, TrainConfig
from mnistlab.rundir import RUN_FILES


@pytest.fixture(autouse=True)
def _kernels():
    if not native.available():
        pytest.skip(f"no compiled kernels: {native.why_unavailable()}")


def test_applies_to_fastcnn_on_the_cpu_without_augmentation_averaging_or_tta():
    assert fastrun.applies(TrainConfig.from_preset("fast"))
    assert fastrun.applies(TrainConfig(model="fastcnn", device="cpu"))
    assert fastrun.applies(TrainConfig(model="widecnn", device="cpu"))
    assert not fastrun.applies(TrainConfig(model="bncnn", device="cpu"))
    assert not fastrun.applies(TrainConfig(model="cnn"))
    assert not fastrun.applies(TrainConfig.from_preset("fast", device="cuda"))
    assert not fastrun.applies(TrainConfig.from_preset("fast", augment="affine"))
    assert not fastrun.applies(TrainConfig.from_preset("fast", ema=0.99))
    assert not fastrun.applies(TrainConfig.from_preset("fast", tta=True))


@pytest.mark.parametrize("name", ["fastcnn", "widecnn"])
def test_initial_weights_have_pytorchs_layout_and_distributions(name):
    widths = FASTCNN_WIDTHS[name]
    state = fastrun.init_state(0, 10, widths)
    reference = mnistlab.create_model(name).state_dict()
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert state[key].shape == tuple(value.shape) and str(state[key].dtype) == str(value.dtype).split(".")[1], key
    for key, fan_in in (("features.0.weight", 25), ("features.3.weight", 9 * widths[0]),
                        ("features.6.weight", 9 * widths[1]), ("head.weight", 16 * widths[2]),
                        ("head.bias", 16 * widths[2])):
        bound = 1 / np.sqrt(fan_in)
        near = 0.9 if state[key].size >= 100 else 0.3  # how close the largest of that many draws comes
        assert np.abs(state[key]).max() <= bound and np.abs(state[key]).max() > near * bound, key
    assert np.array_equal(fastrun.init_state(0, 10, widths)["head.weight"], state["head.weight"])  # repeatable
    assert not np.array_equal(fastrun.init_state(1, 10, widths)["head.weight"], state["head.weight"])
    model = mnistlab.create_model(name)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})  # strict: every key, every shape


def test_evaluation_matches_pytorchs(mnist):
    state = fastrun.init_state(3, 10)
    rng = np.random.default_rng(0)
    for k in ("features.1.running_mean", "features.4.running_var", "features.7.bias"):
        state[k] = state[k] + rng.uniform(0.1, 0.5, state[k].shape).astype(np.float32)
    model = mnistlab.create_model("fastcnn")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    x, y = mnist.images[50000:50700], mnist.labels[50000:50700]
    ours = fastpath.evaluate(state, x, y, batch_size=128)
    with native_off():
        theirs = mnistlab.evaluate(model, x, y, batch_size=128, keep_proba=True)
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    assert ours["acc"] == theirs["acc"]
    np.testing.assert_allclose(ours["proba"], theirs["proba"], atol=1e-5)


class native_off:
    """PyTorch's own layers for the reference numbers."""

    def __enter__(self):
        self.patch = pytest.MonkeyPatch()
        self.patch.setattr(native, "forward_for", lambda model, x: model)

    def __exit__(self, *exc):
        self.patch.undo()


def test_a_run_writes_what_pytorchs_runs_write_and_reads_back_the_same(tmp_path, small_dir):
    config = TrainConfig.from_preset("fast", epochs=2, batch_size=32, lr=0.05, data_dir=str(small_dir))
    result = mnistlab.train_run(config, tmp_path / "run")
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == set(RUN_FILES) - {"report.html"}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["engine"] == "fastpath" and summary["epochs"] == 2 and summary["num_parameters"] == 33914
    assert summary["valid_acc"] > 0.5  # 600 images, 2 gentle epochs: it learned
    assert isinstance(result.model, torch.nn.Module)  # the API hands back the trained model as usual
    evaluated = mnistlab.runs.evaluate_run(run)
    assert evaluated["valid_acc"] == summary["valid_acc"]
    assert evaluated["valid_loss"] == pytest.approx(summary["valid_loss"], rel=1e-5)
    again = mnistlab.train_run(config, tmp_path / "again")
    assert again.summary["valid_loss"] == summary["valid_loss"]  # repeatable under a seed
    other = mnistlab.train_run(TrainConfig.from_preset("fast", epochs=2, batch_size=32, data_dir=str(small_dir),
                                                       seed=1), tmp_path / "other")
    assert other.summary["valid_loss"] != summary["valid_loss"]


def test_the_command_line_trains_fastcnn_without_importing_torch(tmp_path, small_dir):
    code = ("import sys; from mnistlab.cli import main; "
            f"code = main(['train', '--preset', 'fast', '--epochs', '1', '--data-dir', {str(small_dir)!r}, "
            f"'--out', {str(tmp_path / 'run')!r}]); print(code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.split()[-2:] == ["0", "False"], done.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["engine"] == "fastpath"


def test_a_pytorch_run_of_fastcnn_resumes_through_pytorch(tmp_path, small_dir, monkeypatch, capsys):
    """A FastCNN run made where the kernels were off keeps PyTorch's checkpoint; --resume continues it there."""
    run = tmp_path / "run"
    monkeypatch.setattr(fastrun, "applies", lambda config: False)
    args = ["train", "--model", "fastcnn", "--epochs", "1", "--data-dir", str(small_dir), "--out", str(run)]
    assert main(args) == 0
    assert json.loads((run / "summary.json").read_text())["engine"] == "pytorch"
    assert not fastrun.trained_here(run)
    (run / "summary.json").unlink()
    assert main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["engine"] == "pytorch"


def test_the_command_lines_model_names_are_the_registrys():
    from mnistlab.config import MODEL_NAMES

    assert set(MODEL_NAMES) <= set(mnistlab.list_models())
    assert set(MODEL_NAMES) == set(mnistlab.list_models())  # the built-in models, no test registers more


def test_a_run_gives_the_same_weights_on_one_thread_or_two(tmp_path, small_dir):
    """The kernels add their slices' sums in a fixed order and the rest is element-wise: bit for bit."""
    import os

    weights = []
    for threads in ("1", "2"):
        out = tmp_path / f"t{threads}"
        cmd = [sys.executable, "-m", "mnistlab", "train", "--preset", "fast", "--epochs", "1", "--batch-size", "64",
               "--data-dir", str(small_dir), "--out", str(out)]
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": threads},
                       timeout=300)
        weights.append((out / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]


def test_resuming_without_the_kernels_is_refused_in_one_line(tmp_path, small_dir, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "fastcnn", "--epochs", "2", "--data-dir", str(small_dir), "--out", str(run)]) == 0
    (run / "summary.json").unlink()
    assert fastrun.trained_here(run)
    capsys.readouterr()
    monkeypatch.setattr(fastrun.kernels, "available", lambda: False)
    monkeypatch.setattr(fastrun.kernels, "why_unavailable", lambda: "turned off by MNISTLAB_NATIVE=0")
    assert main(["train", "--resume", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compiled kernels, which are not available here" in err, err
    assert (run / "checkpoint.safetensors").exists() and (run / "model.safetensors").exists()  # nothing lost
