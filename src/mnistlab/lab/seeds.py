"""One recipe over several seeds: each seed's run, and the spread of their figures."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import replace

from ..config import TrainConfig
from ..data.mnist import Dataset, load_dataset
from ..errors import UsageError
from ..files import write_json_atomic
from ..run.driver import RunResult, train_run
from ..run.rundir import prepare_run_dir

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


def format_spread(s: dict) -> str:
    """A fraction's spread as percentages: '99.03% ± 0.05 (min 98.97, max 99.08, 3 runs)'."""
    return (f"{100 * s['mean']:.2f}% ± {100 * s['std']:.2f} (min {100 * s['min']:.2f}, max {100 * s['max']:.2f}, "
            f"{s['n']} runs)")
