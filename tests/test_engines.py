"""The two engines behind one driver: the rule that picks one, what the kernel engine writes, and
that every command reads its runs as the PyTorch engine's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

import mnistlab
from mnistlab.cli import main
from mnistlab.config import AUGMENT_NAMES, FASTCNN_WIDTHS, MODEL_NAMES, TrainConfig
from mnistlab.errors import MnistlabError, UsageError
from mnistlab.kernels import build, fastcnn
from mnistlab.run import checkpoint
from mnistlab.run.checkpoint import STAGED
from mnistlab.run.rundir import RUN_FILES
from mnistlab.train import choose, device, engine
from mnistlab.train.augment import AUGMENTS
from mnistlab.use.classifier import evaluate_run


@pytest.fixture(autouse=True)
def _kernels():
    if not build.available():
        pytest.skip(f"no compiled kernels: {build.why_unavailable()}")


def test_the_rule_picks_the_kernel_engine_for_fastcnn_models_on_the_cpu(monkeypatch):
    for preset in ("fast", "best"):
        assert choose.choose_engine(TrainConfig.from_preset(preset), "cpu") == engine.KERNELS
    for name in FASTCNN_WIDTHS:
        for extra in ({}, {"augment": "affine"}, {"ema": 0.99}, {"tta": True}):
            assert choose.choose_engine(TrainConfig(model=name, **extra), "cpu") == engine.KERNELS
        assert choose.choose_engine(TrainConfig(model=name), "cuda") == engine.AUTOGRAD
    for name in set(MODEL_NAMES) - set(FASTCNN_WIDTHS):
        assert choose.choose_engine(TrainConfig(model=name), "cpu") == engine.AUTOGRAD
    monkeypatch.setattr(build, "available", lambda: False)
    assert choose.choose_engine(TrainConfig.from_preset("fast"), "cpu") == engine.AUTOGRAD


def test_the_precision_rule(monkeypatch):
    """auto: bf16 only where the kernel engine trains in one process and the bf16 kernels are here;
    fp32 and bf16 as given; the presets fast and best ask for auto, plain models for fp32."""
    from mnistlab.config import PRESETS
    from mnistlab.kernels import calls

    here = "bf16" if calls.bf16_available() else "fp32"
    fast = TrainConfig.from_preset("fast")
    assert fast.precision == PRESETS["best"]["precision"] == "auto" and TrainConfig().precision == "fp32"
    assert choose.resolve_precision(fast, "cpu").precision == here
    assert choose.resolve_precision(TrainConfig.from_preset("best"), "cpu").precision == here
    assert choose.resolve_precision(fast, "cuda").precision == "fp32"
    assert choose.resolve_precision(replace(fast, nproc=2), "cpu").precision == "fp32"
    assert choose.resolve_precision(replace(fast, model="cnn"), "cpu").precision == "fp32"
    for given in ("fp32", "bf16"):
        assert choose.resolve_precision(replace(fast, precision=given), "cuda").precision == given
    monkeypatch.setenv("MNISTLAB_BF16", "0")  # as on a CPU without AVX512-BF16
    assert choose.resolve_precision(fast, "cpu").precision == "fp32"


def test_the_device_rule(monkeypatch):
    assert device.resolve_device("cpu") == "cpu"
    monkeypatch.setattr(device, "gpu_visible", lambda: False)
    assert device.resolve_device("auto") == "cpu"
    with pytest.raises(UsageError, match="expected one of: auto, cpu, cuda"):
        device.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available here"):
            device.resolve_device("cuda")
        monkeypatch.setattr(device, "gpu_visible", lambda: True)  # a GPU PyTorch cannot use: the CPU
        assert device.resolve_device("auto") == "cpu"


def test_names_the_command_line_offers_are_the_registries():
    assert set(MODEL_NAMES) == set(mnistlab.list_models())  # the built-in models, no test registers more
    assert set(AUGMENT_NAMES) == set(AUGMENTS)


@pytest.mark.parametrize("name", ["fastcnn", "widecnn"])
def test_initial_weights_have_pytorchs_layout_and_distributions(name):
    widths = FASTCNN_WIDTHS[name]
    state = fastcnn.init_state(0, 10, widths)
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
    assert np.array_equal(fastcnn.init_state(0, 10, widths)["head.weight"], state["head.weight"])  # repeatable
    assert not np.array_equal(fastcnn.init_state(1, 10, widths)["head.weight"], state["head.weight"])
    model = mnistlab.create_model(name)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})  # strict: every key, every shape


def test_evaluation_matches_pytorchs(mnist, monkeypatch):
    state = fastcnn.init_state(3, 10, FASTCNN_WIDTHS["fastcnn"])
    rng = np.random.default_rng(0)
    for k in ("features.1.running_mean", "features.4.running_var", "features.7.bias"):
        state[k] = state[k] + rng.uniform(0.1, 0.5, state[k].shape).astype(np.float32)
    model = mnistlab.create_model("fastcnn")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    x, y = mnist.images[50000:50700], mnist.labels[50000:50700]
    ours = fastcnn.evaluate(state, x, y, batch_size=128)
    monkeypatch.setattr("mnistlab.evaluation.forward_for", lambda model, x: model)  # PyTorch's own layers
    theirs = mnistlab.evaluate(model, x, y, batch_size=128, keep_proba=True)
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    assert ours["acc"] == theirs["acc"]
    assert ours["spread"] == pytest.approx(theirs["spread"], rel=1e-4) and ours["spread"] > 0.1
    np.testing.assert_allclose(ours["proba"], theirs["proba"], atol=1e-5)


def test_a_run_writes_what_pytorchs_runs_write_and_reads_back_the_same(tmp_path, small_dir):
    config = TrainConfig.from_preset("fast", epochs=2, batch_size=32, lr=0.05, data_dir=str(small_dir))
    result = mnistlab.train_run(config, tmp_path / "run")
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == set(RUN_FILES) - {"report.html", STAGED}  # STAGED: batches only
    summary = json.loads((run / "summary.json").read_text())
    assert summary["engine"] == "kernels" and summary["epochs"] == 2 and summary["num_parameters"] == 33914
    assert summary["valid_acc"] > 0.5  # 600 images, 2 gentle epochs: it learned
    assert isinstance(result.model, torch.nn.Module)  # the API hands back the trained model as usual
    evaluated = evaluate_run(run)
    assert evaluated["valid_acc"] == summary["valid_acc"]
    assert evaluated["valid_loss"] == pytest.approx(summary["valid_loss"], rel=1e-5)
    again = mnistlab.train_run(config, tmp_path / "again")
    assert again.summary["valid_loss"] == summary["valid_loss"]  # repeatable under a seed
    other = mnistlab.train_run(TrainConfig.from_preset("fast", epochs=2, batch_size=32, data_dir=str(small_dir),
                                                       seed=1), tmp_path / "other")
    assert other.summary["valid_loss"] != summary["valid_loss"]


def test_augmentation_averaging_and_tta_on_the_kernel_engine(tmp_path, small_dir):
    """What --preset best asks of it: repeatable, the final weights the average, TTA scored as evaluate does."""
    config = TrainConfig.from_preset("best", epochs=2, lr=0.05, ema=0.9, split="seed", data_dir=str(small_dir))
    first = mnistlab.train_run(config, tmp_path / "a")
    mnistlab.train_run(config, tmp_path / "b")
    assert first.summary["engine"] == "kernels" and first.summary["tta"] is True
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    no_aug = mnistlab.train_run(TrainConfig.from_dict({**config.to_dict(), "augment": "none"}), tmp_path / "c")
    assert no_aug.summary["train_loss"] != first.summary["train_loss"]  # the maps changed the batches
    meta, arrays = checkpoint.read_state(tmp_path / "a")
    weights = checkpoint.read_weights(tmp_path / "a")
    for k, v in weights.items():  # model.safetensors holds the weight average, not the last step's weights
        np.testing.assert_array_equal(v, arrays[f"ema.{k}"])
    assert any(not np.array_equal(arrays[f"model.{k}"], arrays[f"ema.{k}"]) for k in fastcnn.PARAMS)
    evaluated = evaluate_run(tmp_path / "a")  # PyTorch's layers, TTA as the run was configured
    assert evaluated["tta"] and evaluated["valid_acc"] == pytest.approx(first.summary["valid_acc"], abs=1 / 229)
    assert evaluated["valid_loss"] == pytest.approx(first.summary["valid_loss"], rel=1e-4)


def test_the_command_line_trains_fastcnn_without_importing_torch(tmp_path, small_dir):
    code = ("import sys; from mnistlab.cli import main; "
            f"code = main(['train', '--preset', 'fast', '--epochs', '1', '--data-dir', {str(small_dir)!r}, "
            f"'--out', {str(tmp_path / 'run')!r}]); print(code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.split()[-2:] == ["0", "False"], done.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["engine"] == "kernels"


def test_a_pytorch_run_of_fastcnn_resumes_through_pytorch(tmp_path, small_dir, monkeypatch):
    """A FastCNN run made where the kernels were off keeps PyTorch's checkpoint; --resume continues it there."""
    run = tmp_path / "run"
    monkeypatch.setattr(choose, "choose_engine", lambda config, device: engine.AUTOGRAD)
    args = ["train", "--model", "fastcnn", "--epochs", "1", "--data-dir", str(small_dir), "--out", str(run)]
    assert main(args) == 0
    assert json.loads((run / "summary.json").read_text())["engine"] == "autograd"
    assert checkpoint.read_state(run, arrays=False)[0]["engine"] == "autograd"
    monkeypatch.undo()
    (run / "summary.json").unlink()
    assert main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["engine"] == "autograd"


def test_a_run_gives_the_same_weights_on_one_thread_or_two(tmp_path, small_dir):
    """The kernels add their slices' sums in a fixed order and the rest is element-wise: bit for bit."""
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
    assert checkpoint.read_state(run, arrays=False)[0]["engine"] == "kernels"
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    monkeypatch.setattr(build, "available", lambda: False)
    monkeypatch.setattr(build, "why_unavailable", lambda: "turned off by MNISTLAB_NATIVE=0")
    assert main(["train", "--resume", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot continue here" in err and "MNISTLAB_NATIVE=0" in err, err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing lost, nothing changed


@pytest.mark.parametrize("name", ["kernels", "autograd"])
def test_validation_keeps_probabilities_only_when_asked(small_dir, name):
    from mnistlab.data.mnist import load_dataset
    from mnistlab.run.rundir import load_split

    config = TrainConfig(model="fastcnn", epochs=1, data_dir=str(small_dir), device="cpu")
    ds = load_dataset(config.data_dir)
    e = choose.create_engine(config, ds.num_classes, "cpu", name=name)
    assert e.name == name
    e.set_data(*load_split(config, ds))
    e.train_epoch(1)
    without, with_ = e.validate(keep_proba=False), e.validate(keep_proba=True)
    assert "proba" not in without and with_["proba"].shape == (len(load_split(config, ds)[3]), 10)
    assert without["loss"] == with_["loss"] and without["acc"] == with_["acc"]


def test_a_run_under_torchrun_needs_its_directory_named(monkeypatch, small_dir):
    """Rank 0 and the others must agree on one directory: without ``out`` every process refuses it."""
    for rank in ("0", "1"):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(UsageError, match="needs its run directory given"):
            mnistlab.train_run(TrainConfig(model="linear", epochs=1, data_dir=str(small_dir)))


def test_former_engine_names_resume_on_the_engines_they_name(small_dir):
    config = TrainConfig(model="fastcnn", epochs=1, data_dir=str(small_dir), device="cpu")
    assert choose.create_engine(config, 10, "cpu", name="fastpath").name == engine.KERNELS
    assert choose.create_engine(config, 10, "cpu", name="pytorch").name == engine.AUTOGRAD
    with pytest.raises(MnistlabError, match="unknown engine 'jax'"):
        choose.create_engine(config, 10, "cpu", name="jax")


def test_determinism_is_recorded_and_set_before_cuda_starts(tmp_path, small_dir):
    """``--nondeterministic`` is a setting of the run (kept by --resume); the switches it turns are set
    in a fresh process as the driver sets them on CUDA (the CPU's arithmetic is never touched)."""
    run = tmp_path / "run"
    assert main(["train", "--model", "linear", "--epochs", "1", "--nondeterministic", "--data-dir", str(small_dir),
                 "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["deterministic"] is False
    assert TrainConfig().deterministic is True
    code = ("import os, torch; from mnistlab.train.device import set_deterministic; "
            "print(torch.are_deterministic_algorithms_enabled()); set_deterministic(True); "
            "print(torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, "
            "torch.backends.cudnn.benchmark, os.environ['CUBLAS_WORKSPACE_CONFIG'], "
            "torch.utils.deterministic.fill_uninitialized_memory); set_deterministic(False); "
            "print(torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "True", "True", "False", ":4096:8", "False", "False", "True"], done.stderr


@pytest.mark.parametrize("model", ["fastcnn", "bncnn"])
def test_drop_last_makes_every_step_a_full_batch(tmp_path, small_dir, model):
    """600 training images in batches of 128: 4 full steps an epoch (the last 88 left out, others each
    epoch), where without it 5; the BatchNorm counters say how many steps ran."""
    for drop, steps in ((True, 4), (False, 5)):
        config = TrainConfig(model=model, epochs=2, batch_size=128, lr=0.05, drop_last=drop,
                             data_dir=str(small_dir), device="cpu")
        result = mnistlab.train_run(config, tmp_path / f"{model}-{drop}")
        counters = [v for k, v in checkpoint.read_weights(result.run_dir).items() if k.endswith("num_batches_tracked")]
        assert counters and all(int(c) == 2 * steps for c in counters), (drop, counters)
        assert json.loads((result.run_dir / "config.json").read_text())["drop_last"] is drop
    with pytest.raises(UsageError, match="drop_last leaves no full batch: 500 training images"):
        mnistlab.train_run(TrainConfig(model=model, epochs=1, batch_size=512, drop_last=True, split="holdout",
                                       data_dir=str(small_dir), device="cpu"), tmp_path / "none")


def test_the_graphed_step_computes_the_eager_step(small_dir, monkeypatch):
    """The step a CUDA graph captures (static rows, the learning rate as a tensor), run eagerly here:
    the eager loop's weights with augmentation and dropout drawn in the same order, to rounding."""
    from mnistlab.data.mnist import load_dataset
    from mnistlab.run.rundir import load_split
    from mnistlab.train.autograd_engine import AutogradEngine

    config = TrainConfig(model="bncnn", epochs=2, batch_size=128, lr=0.05, momentum=0.9, schedule="onecycle",
                         augment="affine", drop_last=True, data_dir=str(small_dir), device="cpu")
    ds = load_dataset(config.data_dir)
    weights = []
    for graphed in (False, True):
        monkeypatch.setattr(AutogradEngine, "_graphable", lambda self, on_batch, g=graphed: g)
        engine = AutogradEngine.create(config, ds.num_classes, "cpu")
        engine.set_data(*load_split(config, ds))
        losses = [engine.train_epoch(e) for e in (1, 2)]
        assert (getattr(engine, "graphed", None) is not None) is graphed
        weights.append((engine.weights(), losses))
    (a, la), (b, lb) = weights
    assert la == pytest.approx(lb, rel=1e-5)
    for k in a:  # 8 steps: rounding (a fused multiply-add or not) grown to a few 1e-6
        np.testing.assert_allclose(a[k], b[k], rtol=1e-3, atol=2e-5, err_msg=k)
