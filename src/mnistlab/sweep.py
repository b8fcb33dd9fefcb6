"""Several runs at once: one recipe over several seeds, and ensembles of finished runs."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from .data import Dataset, load_dataset
from .errors import RunError, UsageError
from .evaluation import predict_proba
from .files import write_json_atomic
from .runs import RunResult, load_run_model, load_split, prepare_run_dir, read_config, train_run
from .train import TrainConfig

SEEDS_SUMMARY = "seeds.json"


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def train_seeds(config: TrainConfig, seeds: list[int], out: str | os.PathLike, *, force: bool = False,
                dataset: Dataset | None = None, on_run: Callable[[int, RunResult], None] | None = None,
                on_epoch: Callable[[int, dict], None] | None = None,
                on_batch: Callable[[int, int, float], None] | None = None) -> dict:
    """Train ``config`` once per seed into ``out/seed-N``; write and return ``out/seeds.json``.

    The summary has each run's validation accuracy and training seconds, and their
    mean, standard deviation, min and max. ``on_epoch(seed, metrics)`` and
    ``on_run(seed, result)`` report progress.
    """
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"seeds must be distinct, got {list(seeds)}")
    out = prepare_run_dir(out, force)
    ds = dataset if dataset is not None else load_dataset(config.data_dir)
    runs = []
    for seed in seeds:
        epoch_hook = (lambda record, seed=seed: on_epoch(seed, record)) if on_epoch is not None else None
        result = train_run(replace(config, seed=seed), out / f"seed-{seed}", force=force, dataset=ds,
                           on_batch=on_batch, on_epoch=epoch_hook)
        runs.append({"seed": seed, "run_dir": result.run_dir.name, "valid_acc": result.summary["valid_acc"],
                     "valid_loss": result.summary["valid_loss"], "train_seconds": result.summary["train_seconds"]})
        if on_run is not None:
            on_run(seed, result)
    summary = {"config": {**config.to_dict(), "seed": None}, "seeds": list(seeds), "runs": runs,
               "valid_acc": spread([r["valid_acc"] for r in runs]),
               "train_seconds": spread([r["train_seconds"] for r in runs])}
    write_json_atomic(out / SEEDS_SUMMARY, summary)
    return summary


def ensemble(run_dirs: list[str | os.PathLike], dataset: Dataset | None = None, tta: bool = False) -> dict:
    """Accuracy of the averaged class probabilities of several finished runs, and of each alone.

    The runs must share a split and a dataset: they are scored on the same validation part.
    ``tta``: each run's probabilities are first averaged over ``TTA_SHIFTS`` (test-time augmentation).
    ``wrong_in[k]``: how many images exactly k + 1 of the runs get wrong (what averaging can and
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
        model, _ = load_run_model(d)
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
            "wrong_in": [int(c) for c in np.bincount(wrong, minlength=len(run_dirs) + 1)[1:]],
            "oracle_acc": float((wrong < len(run_dirs)).mean())}


def format_spread(s: dict) -> str:
    """A fraction's spread as percentages: '99.03% ± 0.05 (min 98.97, max 99.08, 3 runs)'."""
    return (f"{100 * s['mean']:.2f}% ± {100 * s['std']:.2f} (min {100 * s['min']:.2f}, max {100 * s['max']:.2f}, "
            f"{s['n']} runs)")
