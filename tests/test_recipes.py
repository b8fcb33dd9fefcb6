"""Presets, augmentation, the holdout split, several seeds at once, and ensembles."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import mnistlab
from mnistlab.cli import main
from mnistlab.config import PRESETS, TrainConfig
from mnistlab.data.mnist import split
from mnistlab.data.shift import TTA_SHIFTS, shift_images
from mnistlab.errors import RunError, UsageError
from mnistlab.evaluation import evaluate, predict, predict_proba
from mnistlab.lab.ensemble import ensemble
from mnistlab.lab.seeds import spread, train_seeds
from mnistlab.run.trained import load_model
from mnistlab.train.augment import AUGMENTS, Augment
from mnistlab.use.classifier import evaluate_run
from mnistlab.use.prepare import prepare_array

from .test_cli import run_cli

TRAINED = Path(__file__).parent / "data" / "cnn-seed0"  # the seed's CNN, 96.67% (see tests/data/README.md)


def test_presets_fill_the_config_and_explicit_values_win():
    fast = TrainConfig.from_preset("fast")
    assert (fast.model, fast.schedule, fast.nesterov, fast.preset) == ("fastcnn", "onecycle", True, "fast")
    assert TrainConfig.from_preset("fast", epochs=5, lr=None).epochs == 5  # None: not given, the preset's value
    assert TrainConfig.from_preset("fast", lr=None).lr == PRESETS["fast"]["lr"]
    seed = TrainConfig.from_preset("seed")
    assert (seed.model, seed.epochs, seed.batch_size, seed.lr, seed.momentum) == ("cnn", 15, 64, 0.1, 0.9)
    assert TrainConfig.from_preset(None, model="linear").lr == 0.5
    with pytest.raises(UsageError, match="unknown preset 'quick'; expected one of: seed, fast, best"):
        TrainConfig.from_preset("quick")


@pytest.mark.parametrize("kwargs, message", [
    ({"schedule": "cosine"}, "unknown schedule 'cosine'"),
    ({"label_smoothing": 1.0}, r"label_smoothing must be a number in \[0, 1\)"),
    ({"weight_decay": -0.1}, "weight_decay must be a number >= 0"),
    ({"augment": "warp"}, "unknown augment 'warp'; expected one of: none, affine, elastic"),
    ({"nesterov": True, "momentum": 0.0}, "nesterov needs a momentum above 0"),
    ({"ema": 1.0}, r"ema must be a number in \[0, 1\)"),
    ({"ema": -0.5}, r"ema must be a number in \[0, 1\)"),
    ({"tta": "yes"}, "tta must be true or false, got 'yes'"),
    ({"split": "half"}, "expected one of: seed, standard, holdout"),
    ({"precision": "fp16"}, "unknown precision 'fp16'; expected one of: fp32, bf16, auto"),
])
def test_bad_recipe_values_are_rejected(kwargs, message):
    with pytest.raises(UsageError, match=message):
        TrainConfig(**kwargs)


def test_holdout_split_uses_training_images_only(mnist):
    x_train, y_train, x_valid, y_valid = split(mnist.images, mnist.labels, "holdout", n_train=mnist.n_train)
    assert (len(x_train), len(x_valid)) == (50000, 10000)
    np.testing.assert_array_equal(x_valid, mnist.images[50000:60000])  # never the 10,000 test images
    np.testing.assert_array_equal(y_train, mnist.labels[:50000])


@pytest.mark.parametrize("name", ["affine", "elastic"])
def test_augment_shapes_determinism_and_identity(mnist, name):
    augment = AUGMENTS[name]
    x = torch.from_numpy(mnist.images[:64]).float() / 256
    out = augment(x)
    assert out.shape == (64, 1, 28, 28) and out.dtype == torch.float32
    torch.manual_seed(3)
    a = augment(x)
    torch.manual_seed(3)
    b = augment(x)
    assert torch.equal(a, b)  # the same seed, the same maps
    assert not torch.equal(a, augment(x))
    identity = Augment(shift=0, rotate=0, scale=0)(x)
    torch.testing.assert_close(identity.reshape(64, 784), x, atol=1e-5, rtol=0)
    ink = x.sum(dim=1)
    change = {"affine": 0.35, "elastic": 0.7}[name]  # elastic fields also stretch and squeeze strokes locally
    assert torch.all((a.reshape(64, -1).sum(dim=1) / ink - 1).abs() < change)
    assert augment(x[:0]).shape == (0, 1, 28, 28)


def test_elastic_displacement_is_smooth_and_bounded():
    """A single lit pixel moves by at most the field's bound (bicubic interpolation overshoots the control
    points' range by up to 56%), and neighbouring pixels move together."""
    warp = Augment(shift=0, rotate=0, scale=0, elastic=1.5)
    x = torch.zeros(200, 28, 28)
    x[:, 14, 14] = 1.0
    torch.manual_seed(0)
    out = warp(x.reshape(200, 784))[:, 0]
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    mass = out.sum(dim=(1, 2))
    cy, cx = (out * ys).sum(dim=(1, 2)) / mass, (out * xs).sum(dim=(1, 2)) / mass
    moved = torch.maximum((cy - 14).abs(), (cx - 14).abs())
    assert moved.max() <= 1.56 * 1.5 and moved.mean() > 0.2  # displaced, within the bound
    torch.manual_seed(0)
    ramp = warp(xs.expand(200, 28, 28).reshape(200, 784) / 28)[:, 0, 8:20, 8:20] * 28  # x coordinate sampled
    step = ramp[:, :, 1:] - ramp[:, :, :-1]  # x distance between neighbouring samples: 1 px unwarped
    assert step.min() > 0 and (step - 1).abs().max() < 1  # smooth: no folds, no tears


@pytest.mark.parametrize("name", ["affine", "elastic"])
def test_augmented_digits_keep_their_labels(mnist, name):
    """Re-centred and re-scaled as MNIST's digits were (which undoes the shift and the scaling),
    augmented validation digits are classified by a trained model nearly as well as the originals:
    the maps keep each digit itself, only the rotation remains."""
    model = load_model(TRAINED)
    x, y = mnist.images[50000:51000], mnist.labels[50000:51000]
    clean = (predict(model, x) == y).mean()
    torch.manual_seed(0)
    augmented = (AUGMENTS[name](torch.from_numpy(x).float() / 256) * 256).clamp(0, 255).numpy().reshape(-1, 28, 28)
    prepared = np.stack([prepare_array(a) for a in augmented])
    moved = (predict(model, prepared) == y).mean()
    # The seed's small CNN is no judge of handwriting variations: elastic distortion costs it a few points.
    assert clean > 0.95 and moved > clean - {"affine": 0.03, "elastic": 0.08}[name], (clean, moved)


def test_training_with_augmentation_is_repeatable(small_dir):
    results = []
    for _ in range(2):
        config = TrainConfig.from_preset("fast", epochs=1, batch_size=64, augment="affine", data_dir=str(small_dir))
        ds = mnistlab.load_dataset(small_dir)
        x_train, y_train, x_valid, y_valid = split(ds.images, ds.labels, "seed", n_train=ds.n_train)
        torch.manual_seed(0)
        model = mnistlab.create_model("fastcnn")
        history = mnistlab.fit(model, x_train, y_train, x_valid, y_valid, config, device="cpu")
        results.append((history.valid_loss, model.head.weight.detach().clone()))
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])


def test_train_seeds_reports_the_spread(tmp_path, small_dir):
    config = TrainConfig(model="linear", epochs=1, data_dir=str(small_dir))
    summary = train_seeds(config, [0, 1], tmp_path / "runs")
    accs = [json.loads((tmp_path / "runs" / f"seed-{s}" / "summary.json").read_text())["valid_acc"] for s in (0, 1)]
    assert [r["valid_acc"] for r in summary["runs"]] == accs
    assert summary["valid_acc"]["mean"] == pytest.approx(sum(accs) / 2)
    assert summary["valid_acc"]["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)
    assert json.loads((tmp_path / "runs" / "seeds.json").read_text()) == summary
    assert json.loads((tmp_path / "runs" / "seed-1" / "config.json").read_text())["seed"] == 1
    with pytest.raises(UsageError, match="seeds must be distinct"):
        train_seeds(config, [1, 1], tmp_path / "other")


def test_spread_of_one_value_has_no_deviation():
    assert spread([0.5]) == {"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5, "n": 1}


def test_cli_seeds_and_ensemble(tmp_path, small_dir, capsys):
    out = tmp_path / "sweep"
    assert main(["train", "--model", "linear", "--epochs", "1", "--data-dir", str(small_dir), "--seeds", "0,1",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "seed 0: valid_acc" in text and "seed 1: valid_acc" in text and "± " in text
    assert "seed 0 epoch   1/1" in text and "seed 1 epoch   1/1" in text
    assert main(["train", "--seeds", "0,1", "--seed", "3", "--data-dir", str(small_dir)]) == 2
    assert "leave out --resume and --seed" in capsys.readouterr().err
    for bad in ("0,x", "3-1", "0,0", "-2", "1-"):
        assert run_cli(["train", "--seeds", bad]) == 2, bad
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--seeds" in err and ("0,1,2 or 0-9" in err or "distinct" in err or
                                                               "at least one" in err), err
    from mnistlab.cli_args import seed_list

    assert seed_list("0-3,7") == (0, 1, 2, 3, 7) and seed_list("5") == (5,)

    runs = [str(out / "seed-0"), str(out / "seed-1")]
    assert main(["ensemble", *runs, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    ds = mnistlab.load_dataset(small_dir)
    _, _, x_valid, y_valid = split(ds.images, ds.labels, "seed", n_train=ds.n_train)
    probas = [predict_proba(load_model(r), x_valid) for r in runs]
    expected = float(((probas[0] + probas[1]).argmax(1) == y_valid).mean())
    assert result["valid_acc"] == pytest.approx(expected)
    assert [m["valid_acc"] for m in result["members"]] == pytest.approx(
        [float((p.argmax(1) == y_valid).mean()) for p in probas])
    wrong = [p.argmax(1) != y_valid for p in probas]
    assert result["wrong_in"] == [int((wrong[0] ^ wrong[1]).sum()), int((wrong[0] & wrong[1]).sum())]
    assert result["oracle_acc"] == pytest.approx(1 - float((wrong[0] & wrong[1]).mean()))
    assert result["oracle_acc"] >= max(m["valid_acc"] for m in result["members"])
    assert main(["ensemble", *runs]) == 0
    both = result["wrong_in"][1]
    assert f"(k: images): 1: {result['wrong_in'][0]}, 2: {both}; right in at least one run:" in capsys.readouterr().out


def test_an_ensemble_of_one_run_is_that_run(mnist):
    result = ensemble([TRAINED], dataset=mnist)
    assert result["valid_acc"] == pytest.approx(0.9667, abs=1e-4)
    assert result["members"][0]["valid_acc"] == result["valid_acc"] == result["oracle_acc"]
    assert result["wrong_in"] == [round((1 - result["valid_acc"]) * result["n_valid"])]


def test_ensemble_refuses_runs_of_different_splits(tmp_path, small_dir, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--model", "linear", "--epochs", "1", "--data-dir", str(small_dir), "--out", str(a)]) == 0
    assert main(["train", "--model", "linear", "--epochs", "1", "--data-dir", str(small_dir), "--split", "standard",
                 "--out", str(b)]) == 0
    with pytest.raises(RunError, match="an ensemble needs one validation part"):
        ensemble([a, b])
    capsys.readouterr()
    assert main(["ensemble", str(a), str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_shift_images_moves_pixels_and_fills_blank():
    x = torch.zeros(2, 28, 28)
    x[:, 0, 5] = 1.0  # top row
    x[:, 10, 27] = 2.0  # right edge
    assert torch.equal(shift_images(x, 0, 0), x)
    down_right = shift_images(x.reshape(2, 784), 1, 1).reshape(2, 28, 28)
    assert down_right[0, 1, 6] == 1.0 and down_right[0, 0].sum() == 0  # moved, blank row in
    assert down_right.sum() == 2 * 1.0  # the pixel on the right edge left the image: nothing wraps round
    up_left = shift_images(x, -1, -1)
    assert up_left[0, 9, 26] == 2.0 and up_left.sum() == 2 * 2.0
    assert len(TTA_SHIFTS) == 9 and TTA_SHIFTS[0] == (0, 0) and len(set(TTA_SHIFTS)) == 9


def test_test_time_augmentation_averages_the_shifted_views(mnist):
    model = load_model(TRAINED)
    x, y = mnist.images[50000:50500], mnist.labels[50000:50500]
    xt = torch.from_numpy(np.asarray(x))
    views = [predict_proba(model, shift_images(xt, dy, dx)) for dy, dx in TTA_SHIFTS]
    mean = np.mean(views, axis=0)
    np.testing.assert_allclose(predict_proba(model, x, tta=True), mean, atol=1e-6)
    scored = evaluate(model, x, y, batch_size=128, tta=True)
    assert scored["acc"] == pytest.approx(float((mean.argmax(1) == y).mean()))
    nll = -np.log(mean[np.arange(len(y)), y])
    assert scored["loss"] == pytest.approx(np.mean([nll[i : i + 128].mean() for i in range(0, len(y), 128)]), rel=1e-5)
    assert evaluate(model, x, y, tta=False)["acc"] == pytest.approx(float((views[0].argmax(1) == y).mean()))


def test_tta_in_training_ensembles_and_evaluation(tmp_path, small_dir, capsys):
    out = tmp_path / "tta"
    assert main(["train", "--model", "linear", "--epochs", "1", "--data-dir", str(small_dir), "--tta",
                 "--out", str(out)]) == 0
    assert "(test-time augmentation; single view" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    history = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["tta"] is True and summary["valid_acc_single"] == history["valid_acc"]
    ds = mnistlab.load_dataset(small_dir)
    _, _, x_valid, y_valid = split(ds.images, ds.labels, "seed", n_train=ds.n_train)
    model = load_model(out)
    assert summary["valid_acc"] == pytest.approx(float((predict_proba(model, x_valid, tta=True).argmax(1) == y_valid)
                                                       .mean()))
    assert evaluate_run(out)["valid_acc"] == summary["valid_acc"]  # the run's own setting by default
    assert evaluate_run(out, tta=False)["valid_acc"] == history["valid_acc"]
    assert ensemble([out], tta=True)["valid_acc"] == summary["valid_acc"]
    assert main(["evaluate", str(out), "--no-tta"]) == 0
    assert "test-time augmentation" not in capsys.readouterr().out
    assert main(["ensemble", str(out), "--tta"]) == 0
    assert "test-time augmentation): valid_acc" in capsys.readouterr().out
    assert run_cli(["train", "--model", "linear", "--ema", "1.5", "--data-dir", str(small_dir)]) == 2
    err = capsys.readouterr().err
    assert "ema must be a number in [0, 1), got 1.5" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_subsample_trains_each_seed_on_its_own_subset(mnist):
    from mnistlab.run.rundir import load_split

    full = load_split(TrainConfig(split="holdout"), mnist)
    parts = {seed: load_split(TrainConfig(split="holdout", subsample=0.9, seed=seed), mnist) for seed in (0, 1)}
    assert len(parts[0][0]) == len(parts[1][0]) == 45000
    for x_train, _, x_valid, y_valid in parts.values():
        np.testing.assert_array_equal(x_valid, full[2])  # the validation part is untouched
        np.testing.assert_array_equal(y_valid, full[3])
        rows = {row.tobytes() for row in full[0][:2000]}
        assert sum(row.tobytes() in rows for row in x_train[:2000]) > 1500  # the training part's own images
    assert not np.array_equal(parts[0][0], parts[1][0])  # each seed its own subset
    np.testing.assert_array_equal(load_split(TrainConfig(split="holdout", subsample=0.9), mnist)[1], parts[0][1])
    with pytest.raises(UsageError, match=r"subsample must be a fraction in \(0, 1\]"):
        TrainConfig(subsample=1.5)


def test_the_ensemble_reports_its_gain_over_its_members(tmp_path, small_dir, capsys):
    from mnistlab.run.rundir import load_split

    runs = [tmp_path / f"r{s}" for s in range(3)]
    n_train = len(load_split(TrainConfig(data_dir=str(small_dir)))[0])
    for s, run in enumerate(runs):
        assert main(["train", "--model", "linear", "--epochs", "1", "--seed", str(s), "--subsample", "0.8",
                     "--data-dir", str(small_dir), "--out", str(run)]) == 0
        assert json.loads((run / "summary.json").read_text())["n_train"] == round(0.8 * n_train)
    result = ensemble(runs)
    members = [m["valid_acc"] for m in result["members"]]
    assert result["gain_over_mean"] == pytest.approx(result["valid_acc"] - np.mean(members))
    assert result["gain_over_best"] == pytest.approx(result["valid_acc"] - max(members))
    capsys.readouterr()
    assert main(["ensemble", *map(str, runs)]) == 0
    assert f"{100 * result['gain_over_best']:+.2f} over the best member" in capsys.readouterr().out


def test_mixes_score_every_subset_as_ensemble_does(tmp_path, small_dir):
    from mnistlab.lab.ensemble import mixes

    lin, cnn = tmp_path / "lin", tmp_path / "cnn"
    base = ["train", "--epochs", "1", "--data-dir", str(small_dir), "--seeds", "0,1", "--split", "holdout"]
    assert main([*base, "--model", "linear", "--out", str(lin)]) == 0
    assert main([*base, "--model", "cnn", "--out", str(cnn)]) == 0
    runs = {"lin": [lin / "seed-0", lin / "seed-1"], "cnn": [cnn / "seed-0", cnn / "seed-1"]}
    names, rows = mixes([*runs["lin"], *runs["cnn"]], size=3, dataset=mnistlab.load_dataset(small_dir))
    assert names == ["cnn, 1 epochs, augment none", "linear, 1 epochs, augment none"]
    by_counts = {tuple(r["counts"]): r for r in rows}
    assert set(by_counts) == {(1, 0), (0, 1), (2, 0), (0, 2), (1, 1), (2, 1), (1, 2)}  # 3 members at most
    assert [r["members"] for r in rows] == sorted(r["members"] for r in rows)
    for (n_cnn, n_lin), row in by_counts.items():
        accs = [ensemble([*a, *b], dataset=mnistlab.load_dataset(small_dir))["valid_acc"]
                for a in itertools.combinations(runs["cnn"], n_cnn)
                for b in itertools.combinations(runs["lin"], n_lin)]
        assert row["subsets"] == len(accs)
        assert row["mean"] == pytest.approx(np.mean(accs)) and row["min"] == min(accs) and row["max"] == max(accs)
    with pytest.raises(UsageError, match="size must be a positive integer"):
        mixes(runs["lin"], size=0)


def test_recipes_are_every_setting_but_the_seed():
    from mnistlab.lab.ensemble import recipe_names

    configs = [TrainConfig(model="widecnn", seed=0), TrainConfig(model="widecnn", seed=1, device="cpu"),
               TrainConfig(model="widecnn", lr=0.05), TrainConfig(model="deskewcnn", subsample=0.9)]
    names = recipe_names(configs)
    assert names[0] == names[1] == "widecnn, 15 epochs, augment none, lr 0.1"
    assert names[2] == "widecnn, 15 epochs, augment none, lr 0.05"
    assert names[3] == "deskewcnn, 15 epochs, augment none, subsample 0.9"


def test_choosing_a_mix_is_a_command_refused_on_test_images(tmp_path, small_dir, capsys):
    holdout, seed_split = tmp_path / "holdout", tmp_path / "seed"
    base = ["train", "--model", "linear", "--epochs", "1", "--data-dir", str(small_dir), "--seeds", "0,1,2"]
    assert main([*base, "--split", "holdout", "--out", str(holdout)]) == 0
    assert main([*base, "--lr", "0.05", "--split", "holdout", "--out", str(holdout / "slow")]) == 0
    assert main([*base, "--out", str(seed_split)]) == 0
    runs = [str(holdout / f"seed-{s}") for s in range(3)] + [str(holdout / "slow" / "seed-0")]
    capsys.readouterr()
    assert main(["ensemble", "--choose", "--size", "2", *runs]) == 0
    out = capsys.readouterr().out
    assert "recipe A: linear, 1 epochs, augment none, lr 0.05" in out and "recipe B: linear, 1 epochs, augment " \
        "none, lr 0.5" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "%" in line]
    assert len(rows) == 4 and "| 2 | 1A + 1B |" in out and "| 1 | 1B |" in out  # 1A, 1B, 2B, 1A + 1B
    assert "best mean:" in out
    assert main(["ensemble", "--choose", *[str(seed_split / f"seed-{s}") for s in range(2)]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "would look at the test images" in err and "--split holdout" in err
