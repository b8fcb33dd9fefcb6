"""Ensembles of finished runs: the accuracy of their averaged class probabilities, and of each alone."""

from __future__ import annotations

import os

import numpy as np

from ..data.mnist import Dataset, load_dataset
from ..errors import RunError, UsageError
from ..evaluation import predict_proba
from ..models import load_model
from ..run.rundir import load_split, read_config
from .seeds import spread


def ensemble(run_dirs: list[str | os.PathLike], dataset: Dataset | None = None, tta: bool = False) -> dict:
    """Accuracy of the averaged class probabilities of several finished runs, and of each alone.

    The runs must share a split and a dataset: they are scored on the same validation part.
    ``tta``: each run's probabilities are first averaged over ``TTA_SHIFTS`` (test-time augmentation).
    ``gain_over_mean`` and ``gain_over_best``: the ensemble's accuracy less the members' mean and
    the best member's. ``wrong_in[k]``: how many images exactly k + 1 of the runs get wrong (what averaging can and
    cannot win back); ``oracle_acc``: the fraction some run gets right, the most any vote could reach.
    """
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
    y_valid = np.asarray(y_valid)
    total, members, wrong = None, [], np.zeros(len(y_valid), dtype=np.int64)
    for d in run_dirs:
        model = load_model(d)
        proba = predict_proba(model, x_valid, tta=tta).astype(np.float64)
        if total is not None and proba.shape != total.shape:
            raise RunError(f"{d}: predicts {proba.shape[1]} classes, the first run {total.shape[1]}")
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
