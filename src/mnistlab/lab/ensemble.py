"""Ensembles of finished runs: the accuracy of their averaged class probabilities, and of each alone."""

from __future__ import annotations

import itertools
import os

import numpy as np

from ..data.mnist import TUNING_SPLITS, Dataset, load_dataset
from ..errors import RunError, UsageError
from ..evaluation import predict_proba
from ..run.rundir import load_split, read_config
from ..run.trained import load_model
from .seeds import spread


def ensemble(run_dirs: list[str | os.PathLike], dataset: Dataset | None = None, tta: bool = False) -> dict:
    """Accuracy of the averaged class probabilities of several finished runs, and of each alone.

    The runs must share a split and a dataset: they are scored on the same validation part.
    ``tta``: each run's probabilities are first averaged over ``TTA_SHIFTS`` (test-time augmentation).
    ``gain_over_mean`` and ``gain_over_best``: the ensemble's accuracy less the members' mean and
    the best member's. ``wrong_in[k]``: how many images exactly k + 1 of the runs get wrong (what averaging can and
    cannot win back); ``oracle_acc``: the fraction some run gets right, the most any vote could reach.
    """
    configs, x_valid, y_valid = _validation_part(run_dirs, dataset)
    first = configs[0]
    total, members, wrong = None, [], np.zeros(len(y_valid), dtype=np.int64)
    for d in run_dirs:
        proba = _proba(d, x_valid, tta, total)
        total = proba if total is None else total + proba
        right = proba.argmax(1) == y_valid
        wrong += ~right
        members.append({"run_dir": str(d), "valid_acc": float(right.mean())})
    mean = total / len(run_dirs)
    acc = float((mean.argmax(1) == y_valid).mean())
    loss = float(-np.log(np.clip(mean[np.arange(len(y_valid)), y_valid], 1e-12, None)).mean())
    return {"valid_acc": acc, "valid_nll": loss, "n_valid": len(y_valid), "split": first.split, "tta": tta,
            "members": members,
            "member_acc": spread([m["valid_acc"] for m in members]),
            "gain_over_mean": acc - spread([m["valid_acc"] for m in members])["mean"],
            "gain_over_best": acc - max(m["valid_acc"] for m in members),
            "wrong_in": [int(c) for c in np.bincount(wrong, minlength=len(run_dirs) + 1)[1:]],
            "oracle_acc": float((wrong < len(run_dirs)).mean())}


def _validation_part(run_dirs, dataset: Dataset | None):
    """The runs' configs and their shared validation images and labels (one-line errors otherwise)."""
    if not run_dirs:
        raise UsageError("give at least one run directory")
    configs = [read_config(d) for d in run_dirs]
    first = configs[0]
    for d, c in zip(run_dirs, configs, strict=True):
        if (c.split, c.data_dir) != (first.split, first.data_dir):
            raise RunError(f"{d}: split {c.split!r} / data {c.data_dir or 'MNIST'} differs from {run_dirs[0]}'s "
                           f"({first.split!r} / {first.data_dir or 'MNIST'}); an ensemble needs one validation part")
    ds = dataset if dataset is not None else load_dataset(first.data_dir)
    _, _, x_valid, y_valid = load_split(first, ds)
    return configs, x_valid, np.asarray(y_valid)


def _proba(run_dir, x_valid, tta: bool, like: np.ndarray | None) -> np.ndarray:
    proba = predict_proba(load_model(run_dir), x_valid, tta=tta).astype(np.float64)
    if like is not None and proba.shape != like.shape:
        raise RunError(f"{run_dir}: predicts {proba.shape[1]} classes, the first run {like.shape[1]}")
    return proba


# Config fields that do not make runs different recipes in :func:`mixes`: the seed, where they
# ran and how repeatably, and which preset the values came from.
NOT_RECIPE = ("seed", "device", "preset", "deterministic")


def recipe_names(configs) -> list[str]:
    """A name for each config's recipe (all its settings but ``NOT_RECIPE``): model, epochs,
    augmentation and subsample, plus whatever else tells two of the recipes apart."""
    def short(c):
        parts = [c.model, f"{c.epochs} epochs", f"augment {c.augment}"]
        return ", ".join(parts + ([f"subsample {c.subsample:g}"] if c.subsample < 1 else []))

    def key(c):
        return tuple((k, v) for k, v in c.to_dict().items() if k not in NOT_RECIPE)

    recipes = {key(c): c for c in configs}
    shorts: dict[str, set] = {}
    for k, c in recipes.items():
        shorts.setdefault(short(c), set()).add(k)
    names = {}
    for k, c in recipes.items():
        clash = shorts[short(c)]
        varying = sorted({f for other in clash for f, v in other if dict(k)[f] != v})
        names[k] = ", ".join([short(c), *(f"{f} {dict(k)[f]}" for f in varying)])
    return [names[key(c)] for c in configs]


def mixes(run_dirs: list[str | os.PathLike], size: int = 5, dataset: Dataset | None = None,
          tta: bool = False, tuning_only: bool = True) -> tuple[list[str], list[dict]]:
    """Which mix of recipes makes the best ensemble: every subset of the runs of at most ``size``
    members, scored as :func:`ensemble` scores it, grouped by mix.

    Runs are grouped by recipe (:func:`recipe_names`); a mix gives each recipe a count of members.
    The runs must share a validation part; to choose, one that holds no test image (``--split
    holdout``). ``tuning_only=False`` scores runs of the other splits too: a report of a mix
    already chosen, never a choice.
    Returns the recipes (sorted) and one row per mix: ``counts`` (per recipe, in that order),
    ``members``, and over the subsets of the runs with that mix, ``mean`` / ``min`` / ``max``
    accuracy and their number ``subsets``; rows sorted by members, then best mean first. Each
    run's probabilities are computed once.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UsageError(f"size must be a positive integer, got {size!r}")
    configs, x_valid, y_valid = _validation_part(run_dirs, dataset)
    if tuning_only and configs[0].split not in TUNING_SPLITS:
        raise UsageError(f"{run_dirs[0]}: choosing a mix on split {configs[0].split!r} would look at the test images "
                         f"(its validation part holds them); choose among runs trained with --split "
                         f"{' or '.join(TUNING_SPLITS)}, then train the chosen mix with --split standard")
    groups: dict[str, list[np.ndarray]] = {}
    proba = None
    for d, name in zip(run_dirs, recipe_names(configs), strict=True):
        proba = _proba(d, x_valid, tta, like=proba)
        groups.setdefault(name, []).append(proba)
    names = sorted(groups)
    rows = []
    for counts in itertools.product(*(range(len(groups[n]) + 1) for n in names)):
        if not 0 < sum(counts) <= size:
            continue
        choices = [itertools.combinations(groups[n], k) for n, k in zip(names, counts, strict=True)]
        accs = [float(((sum(p for pick in picks for p in pick) / sum(counts)).argmax(1) == y_valid).mean())
                for picks in itertools.product(*choices)]  # the mean, in ensemble's order and arithmetic
        rows.append({"counts": list(counts), "members": sum(counts), "mean": float(np.mean(accs)),
                     "min": min(accs), "max": max(accs), "subsets": len(accs)})
    rows.sort(key=lambda r: (r["members"], -r["mean"]))
    return names, rows
