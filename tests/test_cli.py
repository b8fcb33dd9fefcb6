import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mnistlab.cli import main
from mnistlab.data import mnist as data
from mnistlab.data.idx import encode_idx


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_dir):
    out = tmp_path_factory.mktemp("runs") / "cnn"
    assert main(["train", "--data-dir", str(small_dir), "--epochs", "2", "--out", str(out), "--device", "cpu"]) == 0
    return out


def test_train_writes_a_complete_run_directory(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "metrics.csv", "metrics.jsonl", "model.safetensors", "model.json",
            "summary.json"} <= names
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("model", "epochs", "valid_loss", "valid_acc", "train_seconds", "grid_predictions", "grid_labels"):
        assert key in summary
    assert summary["model"] == "cnn" and summary["epochs"] == 2
    assert summary["n_train"] == 571 and summary["n_valid"] == 229  # 800 rows split 5:2
    assert np.array(summary["grid_predictions"]).shape == (3, 3)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["lr"] == 0.1 and config["momentum"] == 0.9 and config["batch_size"] == 64
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert lines[0] == "epoch,train_loss,valid_loss,valid_acc,seconds" and len(lines) == 3
    assert json.loads((run_dir / "model.json").read_text()) == {"name": "cnn", "config": {"num_classes": 10}}


def test_train_prints_epochs_and_the_grid(tmp_path, small_dir, capsys):
    out = tmp_path / "lin"
    assert main(["train", "--model", "linear", "--data-dir", str(small_dir), "--epochs", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SGD lr 0.5 momentum 0.0" in text
    assert "epoch   1/1  train_loss" in text and "valid_acc" in text
    grid = json.loads((out / "summary.json").read_text())["grid_predictions"]
    assert f"predicted labels of validation images 0-8:\n[{grid[0]}," in text


def test_summary_times_the_runs_phases(run_dir):
    from mnistlab.run.summary import TIMINGS

    timings = json.loads((run_dir / "summary.json").read_text())["timings"]
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert tuple(timings) == TIMINGS and all(v >= 0 for v in timings.values())
    assert timings["training"] == pytest.approx(sum(e["train_seconds"] for e in epochs))
    assert timings["training"] + timings["validation"] == pytest.approx(sum(e["seconds"] for e in epochs))
    assert timings["pictures"] > 0 and timings["checkpoints"] > 0
    assert timings["final_inference"] == 0  # no TTA: the last epoch's validation gave the final scores


@pytest.mark.parametrize("tta", [False, True])
def test_the_final_scores_reuse_the_last_validation_unless_tta(tmp_path, small_dir, monkeypatch, tta):
    from mnistlab.train import autograd_engine

    calls = []
    real = autograd_engine.AutogradEngine.predict_proba
    monkeypatch.setattr(autograd_engine.AutogradEngine, "predict_proba",
                        lambda self, *a, **k: calls.append(k) or real(self, *a, **k))
    out = tmp_path / "run"
    args = ["train", "--data-dir", str(small_dir), "--epochs", "1", "--out", str(out), "--device", "cpu"]
    assert main(args + (["--tta"] if tta else [])) == 0
    assert calls == ([{"tta": True}] if tta else [])  # without TTA the last epoch's validation gave them
    summary = json.loads((out / "summary.json").read_text())
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert (summary["timings"]["final_inference"] > 0) == tta  # a pass of its own only with TTA
    if not tta:
        assert summary["valid_acc"] == last["valid_acc"]


def test_evaluate_matches_the_summary(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["valid_acc"] == pytest.approx(summary["valid_acc"])
    assert result["valid_loss"] == pytest.approx(summary["valid_loss"], rel=1e-5)
    assert main(["evaluate", str(run_dir)]) == 0
    assert "valid_acc" in capsys.readouterr().out


def test_predict_validation_items(run_dir, capsys):
    assert main(["predict", str(run_dir), "--valid", "0:9", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["predicted"] for r in rows] == sum(summary["grid_predictions"], [])
    assert [r["label"] for r in rows] == sum(summary["grid_labels"], [])
    assert main(["predict", str(run_dir), "--valid", "5"]) == 0
    assert "correct" in capsys.readouterr().out


def test_the_console_script_runs_as_a_module(run_dir):
    out = subprocess.run([sys.executable, "-m", "mnistlab", "evaluate", str(run_dir)], capture_output=True, text=True)
    assert out.returncode == 0 and "valid_acc" in out.stdout


def _bad_idx_dir(tmp_path, small_dir, case):
    d = tmp_path / case
    d.mkdir()
    for f in small_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    target = d / "train-labels-idx1-ubyte.gz"
    if case == "magic":
        target.write_bytes(b"\x00\x00\x08\x07" + b"\x00" * 20)
    elif case == "truncated":
        target.write_bytes(encode_idx(np.zeros(600, np.uint8))[:300])
    elif case == "count":
        target.write_bytes(encode_idx(np.zeros(599, np.uint8)))
    elif case == "unreadable":
        target.unlink()
        target.mkdir()
    elif case == "missing":
        target.unlink()
    return d


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["train", "--model", "resnet"], 2, "argument --model: invalid choice: 'resnet'"),
        (["train", "--epochs", "0"], 2, "argument --epochs: expected a positive integer, got '0'"),
        (["train", "--batch-size", "-3"], 2, "argument --batch-size: expected a positive integer, got '-3'"),
        (["train", "--lr", "0"], 2, "argument --lr: expected a positive number, got '0'"),
        (["train", "--lr", "abc"], 2, "argument --lr: expected a positive number, got 'abc'"),
        (["train", "--momentum", "2"], 2, "momentum must be a number in [0, 1), got 2.0"),
        (["evaluate", "{tmp}/no-such-run"], 2, "run directory not found"),
        (["predict", "{tmp}/no-such-run"], 2, "run directory not found"),
        (["evaluate", "{tmp}"], 1, "not a run directory made by 'mnistlab train'"),
        (["train", "--data-dir", "{tmp}/nowhere", "--out", "{tmp}/r"], 1, "data directory not found"),
        (["predict", "{run}", "--valid", "9:3"], 2, "expected 0 <= START < STOP"),
        (["predict", "{run}", "--valid", "0:100000"], 2, "the validation part has 229 items"),
        (["train", "--out", "{run}", "--data-dir", "{small}"], 2, "directory exists and is not empty; pass --force"),
    ],
)
def test_bad_input_gives_one_line_and_exit_status(tmp_path, run_dir, small_dir, capsys, args, code, message):
    args = [a.format(tmp=tmp_path, run=run_dir, small=small_dir) for a in args]
    assert run_cli(args) == code
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def run_cli(args) -> int:
    """Exit status of ``mnistlab ARGS`` run in this process (argparse exits, commands return)."""
    try:
        return main(args)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize(
    "case, message",
    [
        ("magic", "wrong IDX magic number 0x00000807"),
        ("truncated", "truncated data"),
        ("count", "600 images but 599 labels"),
        ("unreadable", "data file is a directory"),
        ("missing", "missing train-labels-idx1-ubyte.gz"),
    ],
)
def test_bad_data_files_exit_1_with_one_line(tmp_path, small_dir, capsys, case, message):
    d = _bad_idx_dir(tmp_path, small_dir, case)
    assert main(["train", "--data-dir", str(d), "--epochs", "1", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()  # nothing half-made


def test_hash_mismatch_exits_1(tmp_path, monkeypatch, capsys):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for f in data.SHIPPED_DIR.iterdir():
        (shipped / f.name).write_bytes(f.read_bytes())
    (shipped / "t10k-labels-idx1-ubyte.gz").write_bytes(encode_idx(np.zeros(10000, np.uint8)))
    monkeypatch.setattr(data, "SHIPPED_DIR", shipped)
    monkeypatch.setenv("MNISTLAB_CACHE", str(tmp_path / "cache"))
    assert main(["train", "--epochs", "1", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "SHA-256" in err and "reinstall mnistlab" in err and len(err.strip().splitlines()) == 1


def test_errors_from_a_real_process_have_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "mnistlab", "train", "--epochs", "-1"], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 2
    assert out.stderr.strip() == ("mnistlab train: error: argument --epochs: expected a positive integer, "
                                  "got '-1' (see --help)")


def test_progress_bar_shows_the_running_loss(capsys):
    import time

    from mnistlab.cli import _progress

    on_batch = _progress(True)
    for b, loss in enumerate([2.0, 1.0, 0.5]):
        time.sleep(0.15)  # past tqdm's minimum refresh interval
        on_batch(b, 3, loss)
    err = capsys.readouterr().err
    assert "3/3" in err and "loss=1.1667" in err  # running mean of the batch losses
    assert _progress(False) is None  # not a terminal: one plain line per epoch instead


def test_divergence_is_one_line_and_no_finished_run(tmp_path, small_dir, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "linear", "--data-dir", str(small_dir), "--epochs", "3", "--lr", "1e38",
                 "--out", str(run)]) == 1
    err = capsys.readouterr().err
    assert "diverged" in err and "lower learning rate" in err and len(err.strip().splitlines()) == 1
    assert not (run / "summary.json").exists()


def test_a_real_process_flushes_all_its_output_before_its_quick_exit(run_dir):
    """The console script ends with os._exit; a piped stdout must still arrive whole."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered, as usual
    out = subprocess.run([sys.executable, "-m", "mnistlab", "predict", str(run_dir), "--valid", "0:229"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()  # one print per image: many small writes, the last ones still buffered
    correct = sum(row.split()[1] == row.split()[2] for row in lines[1:-1])
    assert len(lines) == 1 + 229 + 1 and lines[-1] == f"{correct}/229 correct"
    failed = subprocess.run([sys.executable, "-m", "mnistlab", "evaluate", str(run_dir / "missing")],
                            capture_output=True, text=True)
    assert failed.returncode == 2 and failed.stderr.startswith("mnistlab evaluate: error: run directory not found")


def test_a_collapsed_run_stops_in_one_line_and_keeps_the_last_good_epoch(tmp_path, small_dir, capsys):
    """Dead ReLUs: the seed's CNN at --lr 1000 gives every image the same outputs; that stops the run
    like a divergence. Resumed from a good epoch with the same learning rate, that epoch's files stay."""
    run = tmp_path / "run"
    base = ["train", "--model", "cnn", "--out", str(run)]  # all of MNIST: 50,000 images an epoch, ~1 s
    assert main([*base, "--epochs", "2", "--lr", "1000", "--data-dir", str(small_dir)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "collapsed" in err and "epoch 1" in err, err
    assert "same outputs" in err and "lower learning rate than 1000.0 (--lr)" in err
    assert not (run / "summary.json").exists()
    # a healthy epoch, then the same run resumed with the peak learning rate of its schedule raised
    assert main([*base, "--epochs", "1", "--schedule", "onecycle", "--force"]) == 0
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "epochs": 3, "lr": 1000.0}))
    (run / "summary.json").unlink()
    kept = {name: (run / name).read_bytes() for name in ("checkpoint.safetensors", "metrics.jsonl")}
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "collapsed: after epoch 2" in err, err
    assert {name: (run / name).read_bytes() for name in kept} == kept  # the last good epoch's checkpoint


@pytest.mark.parametrize("args", [["--model", "cnn", "--lr", "0.001"], ["--model", "linear", "--lr", "0.0001"],
                                  ["--preset", "fast", "--lr", "0.001"]])
def test_slow_healthy_runs_are_not_taken_for_collapsed(tmp_path, small_dir, args):
    assert main(["train", *args, "--epochs", "1", "--data-dir", str(small_dir), "--out", str(tmp_path / "r")]) == 0


def test_a_diverging_fast_run_prints_its_one_line_and_no_warnings(tmp_path, small_dir):
    out = subprocess.run([sys.executable, "-W", "default", "-m", "mnistlab", "train", "--preset", "fast", "--lr",
                          "1e30", "--data-dir", str(small_dir), "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert out.stderr.startswith("mnistlab train: error: training diverged") and out.stderr.count("\n") == 1, \
        out.stderr


def test_commands_that_only_read_run_files_do_not_import_torch(run_dir, tmp_path):
    code = ("import sys; from mnistlab.cli import main; "
            f"codes = [main(['report', {str(run_dir)!r}, '--out', {str(tmp_path / 'r.html')!r}]), "
            f"main(['compare', {str(run_dir)!r}, '--out', {str(tmp_path / 'c.png')!r}]), "
            f"main(['show', '--grid', '2', '3', '--out', {str(tmp_path / 's.png')!r}])]; "
            "print(codes, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.splitlines()[-1] == "[0, 0, 0] False", done.stdout + done.stderr
    for name in ("r.html", "c.png", "s.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_bad_config_files_and_option_combinations_are_one_line(tmp_path, capsys):
    bad_json, unknown, listed = tmp_path / "bad.json", tmp_path / "unknown.json", tmp_path / "list.json"
    bad_json.write_text("{not json")
    unknown.write_text(json.dumps({"model": "cnn", "colour": "red"}))
    listed.write_text("[1, 2]")
    for args, message in [
        (["--config", str(tmp_path / "missing.json")], "file not found"),
        (["--config", str(bad_json)], "not a JSON config"),
        (["--config", str(unknown)], "unknown setting 'colour'"),
        (["--config", str(listed)], "expected a JSON object"),
        (["--config", str(unknown), "--preset", "fast"], "give --config or --preset, not both"),
        (["--storage", "sqlite:////tmp/x.db"], "give --seeds too"),
        (["--seed", "-1"], "expected a whole number >= 0, got '-1'"),
        (["--seeds", "0,1", "--nproc", "2"], "leave out --nproc"),
    ]:
        assert run_cli(["train", *args, "--out", str(tmp_path / "r")]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (args, err)
    assert not (tmp_path / "r").exists()


def test_bad_settings_through_the_python_api_are_one_line_errors(tmp_path):
    from mnistlab.config import TrainConfig
    from mnistlab.errors import UsageError

    for values, message in [({"seed": -1}, "seed must be a whole number"), ({"seed": 1.5}, "seed must be"),
                            ({"lr": 0}, "lr must be a positive number"),
                            ({"colour": "red"}, "unknown setting 'colour'")]:
        with pytest.raises(UsageError, match=message):
            TrainConfig.from_dict(values)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TrainConfig().to_dict(), "resolved_device": "cpu"}))  # a run's config.json
    assert TrainConfig.from_file(config, epochs=3) == TrainConfig(epochs=3)
    with pytest.raises(UsageError, match="unknown setting"):
        mnistlab_fit_with_unknown_override()


def mnistlab_fit_with_unknown_override():
    import mnistlab

    x = np.zeros((4, 784), np.uint8)
    mnistlab.fit(mnistlab.create_model("linear"), x, np.zeros(4, np.int64), x, np.zeros(4, np.int64), epochs=1,
                 learning_rate=0.1)  # not a setting: refused, not silently dropped


def test_no_progress_bar_means_no_tqdm():
    code = ("import sys; from mnistlab.cli import _progress; hook = _progress(False); "
            "print(hook, 'tqdm' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["None", "False"], done.stderr


def test_search_offers_only_its_own_options():
    """Options of train alone (--precision, --drop-last, --batched) are not silently taken by search."""
    from mnistlab.cli_args import build_parser

    parser = build_parser()
    for option in ("--precision", "--drop-last", "--batched", "--nondeterministic"):
        with pytest.raises(SystemExit):
            parser.parse_args(["search", "out", option])
        assert parser.parse_args(["train", option] + (["bf16"] if option == "--precision" else []))
