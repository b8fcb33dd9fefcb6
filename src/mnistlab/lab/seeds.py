"""One recipe over several seeds: each seed's run, and the spread of their figures."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..config import TrainConfig
from ..data.mnist import Dataset, load_dataset
from ..errors import UsageError
from ..files import write_json_atomic
from ..run.batch import BATCH, train_batch
from ..run.driver import RESUME, RunResult, train_run
from ..run.rundir import prepare_run_dir, read_json

SEEDS_SUMMARY = "seeds.json"


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def train_seeds(config: TrainConfig, seeds: list[int], out: str | os.PathLike, *, force: bool = False,
                batched: bool = False, dataset: Dataset | None = None,
                on_run: Callable[[int, RunResult], None] | None = None,
                on_epoch: Callable[[int, dict], None] | None = None,
                on_batch: Callable[[int, int, float], None] | None = None,
                on_stop: Callable[[int, str], None] | None = None) -> dict:
    """Train ``config`` once per seed into ``out/seed-N``; write and return ``out/seeds.json``.

    The summary has each run's validation accuracy and training seconds, and their
    mean, standard deviation, min and max. ``batched``: every seed trained at once as one network
    (:mod:`mnistlab.run.batch`; FastCNN models), a member that diverges stopping alone
    (``on_stop(seed, message)``; listed under ``stopped``). ``on_epoch(seed, metrics)`` and
    ``on_run(seed, result)`` report progress.
    """
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"seeds must be distinct, got {list(seeds)}")
    if batched:
        return _batch_summary(Path(out), train_batch(config, seeds, out, force=force, dataset=dataset,
                                                     on_epoch=on_epoch, on_run=on_run, on_stop=on_stop))
    out = prepare_run_dir(out, force)
    ds = dataset if dataset is not None else load_dataset(config.data_dir)
    runs = []
    for seed in seeds:
        epoch_hook = (lambda record, seed=seed: on_epoch(seed, record)) if on_epoch is not None else None
        result = train_run(replace(config, seed=seed), out / f"seed-{seed}", force=force, dataset=ds,
                           on_batch=on_batch, on_epoch=epoch_hook)
        runs.append(_row(seed, result.run_dir.name, result.summary))
        if on_run is not None:
            on_run(seed, result)
    return _write_summary(out, config, seeds, runs)


def resume_batch(out: str | os.PathLike, *, dataset: Dataset | None = None,
                 on_run: Callable[[int, RunResult], None] | None = None,
                 on_epoch: Callable[[int, dict], None] | None = None,
                 on_stop: Callable[[int, str], None] | None = None) -> dict:
    """Continue the interrupted batch in ``out`` (:func:`train_seeds` with ``batched``); its ``seeds.json``."""
    results = train_batch(None, None, out, mode=RESUME, dataset=dataset, on_epoch=on_epoch, on_run=on_run,
                          on_stop=on_stop)
    return _batch_summary(Path(out), results)


def _batch_summary(out: Path, results: dict[int, RunResult]) -> dict:
    batch = read_json(out / BATCH)
    config = TrainConfig.from_dict({**batch["config"], "seed": 0})
    runs = [_row(seed, r.run_dir.name, r.summary) for seed, r in results.items()]
    return _write_summary(out, config, batch["seeds"], runs, stopped=batch["stopped"])


def _row(seed: int, run_dir: str, summary: dict) -> dict:
    return {"seed": seed, "run_dir": run_dir, "valid_acc": summary["valid_acc"], "valid_loss": summary["valid_loss"],
            "train_seconds": summary["train_seconds"]}


def _write_summary(out: Path, config: TrainConfig, seeds: list[int], runs: list[dict], **extra) -> dict:
    """``OUT/seeds.json``: each run's figures, and their spread."""
    summary = {"config": {**config.to_dict(), "seed": None}, "seeds": list(seeds), "runs": runs,
               "valid_acc": spread([r["valid_acc"] for r in runs]) if runs else None,
               "train_seconds": spread([r["train_seconds"] for r in runs]) if runs else None, **extra}
    write_json_atomic(out / SEEDS_SUMMARY, summary)
    return summary


def format_spread(s: dict) -> str:
    """A fraction's spread as percentages: '99.03% ± 0.05 (min 98.97, max 99.08, 3 runs)'."""
    return (f"{100 * s['mean']:.2f}% ± {100 * s['std']:.2f} (min {100 * s['min']:.2f}, max {100 * s['max']:.2f}, "
            f"{s['n']} runs)")


def train_queued_seeds(config: TrainConfig, seeds: list[int], out: str | os.PathLike, storage: str,
                       study_name: str | None = None, *, heartbeat: int = 30, dataset: Dataset | None = None,
                       on_run: Callable[[int, RunResult | None], None] | None = None,
                       on_epoch: Callable[[int, dict], None] | None = None) -> dict | None:
    """:func:`train_seeds` shared by any number of processes through an Optuna storage: the seeds are
    queued once, each process trains the next unclaimed one into ``out/seed-S`` until none is left, a
    dead worker's seed is taken over from its checkpoint. Returns the summary (and writes
    ``seeds.json``) once every seed has finished; None while others are still training."""
    import optuna

    from ..errors import TrainingDiverged
    from ..run.driver import CONTINUE, START, run_training
    from ..run.rundir import read_summary
    from .studies import connect, counts, open_study, storage_url, system_attrs

    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"seeds must be distinct, got {list(seeds)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    url = storage_url(out, storage)
    name = study_name or f"seeds-{out.resolve().name}"
    attrs = {"config": {**config.to_dict(), "seed": None}, "seeds": list(seeds)}
    study, created = open_study(url, name, heartbeat, attrs)
    ds = dataset if dataset is not None else load_dataset(config.data_dir)

    def objective(trial) -> float:
        if "fixed_params" not in system_attrs(trial):  # the queue ran dry between the check and the claim
            trial.set_user_attr("empty", True)
            raise optuna.TrialPruned("no seed left")
        seed = trial.suggest_int("seed", min(seeds), max(seeds))
        run_dir = out / f"seed-{seed}"
        trial.set_user_attr("run_dir", run_dir.name)
        epoch_hook = (lambda record: on_epoch(seed, record)) if on_epoch is not None else None
        # a seed taken over from a dead worker continues its run (finished, but its worker died before
        # telling: as it is); a fresh claim trains from the start
        taken_over = system_attrs(trial).get("failed_trial") is not None
        result = run_training(replace(config, seed=seed), run_dir, mode=CONTINUE if taken_over else START,
                              force=True, dataset=ds, on_epoch=epoch_hook)
        if on_run is not None:
            on_run(seed, result)
        return result.summary["valid_acc"]

    with connect(url):
        if created:
            for seed in seeds:
                study.enqueue_trial({"seed": seed})
        while counts(study).get("waiting", 0) > 0:
            study.optimize(objective, n_trials=1, catch=(TrainingDiverged,))
        done = {t.params["seed"]: t for t in study.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.COMPLETE and "seed" in t.params}
    if set(done) != set(seeds):
        return None
    runs = [_row(seed, f"seed-{seed}", read_summary(out / f"seed-{seed}")) for seed in seeds]
    return _write_summary(out, config, seeds, runs,
                          trained_by={str(t.params["seed"]): t.number for t in done.values()})
