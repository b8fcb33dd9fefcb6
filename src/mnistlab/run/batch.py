"""Runs of one recipe over several seeds trained together (:mod:`mnistlab.train.batched_engine`):
each member an ordinary run directory ``OUT/seed-S``, the batch's record in ``OUT/batch.json``.

A member whose training diverges or collapses stops alone (its directory keeps its last good
checkpoint, ``batch.json`` the one-line reason); the others finish. An interrupted batch
(Ctrl-C, SIGKILL) continues from its members' last complete epoch with ``mode="resume"``,
exactly as if never stopped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .. import plots
from ..config import History, TrainConfig
from ..data.mnist import Dataset, load_dataset
from ..errors import TrainingDiverged, UsageError
from ..files import write_json_atomic
from ..train.choose import resolve_precision
from ..train.device import resolve_device, set_deterministic
from ..train.engine import BATCHED
from ..train.loop import check_loss, check_outputs, epoch_record
from . import checkpoint
from .driver import RESUME, START, RunResult, RunWriter
from .rundir import CONFIG, SUMMARY, load_split, prepare_run_dir, read_config, read_json
from .summary import Phases

BATCH = "batch.json"  # in OUT: the recipe, the seeds, and the members that stopped early


def is_batch(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a batch of runs (``--resume`` continues them together)."""
    return (Path(path) / BATCH).is_file()


def batch_epochs(out: str | os.PathLike) -> int:
    """The epochs each member of the batch in ``out`` trains."""
    return int(read_json(Path(out) / BATCH)["config"]["epochs"])


def member_dir(out: Path, seed: int) -> Path:
    return out / f"seed-{seed}"


def train_batch(config: TrainConfig | None, seeds: list[int] | None, out: str | os.PathLike, *, mode: str = START,
                force: bool = False, dataset: Dataset | None = None,
                on_epoch: Callable[[int, dict], None] | None = None,
                on_run: Callable[[int, RunResult], None] | None = None,
                on_stop: Callable[[int, str], None] | None = None) -> dict[int, RunResult]:
    """Train ``config`` once per seed, all seeds together, into ``out/seed-S``; the finished runs by seed.

    ``mode="resume"`` continues the interrupted batch in ``out`` (``config`` and ``seeds`` come from
    its ``batch.json``). ``on_epoch(seed, record)`` after each member's epoch, ``on_run(seed, result)``
    once a member has finished, ``on_stop(seed, message)`` where one stopped early.
    """
    from ..train.batched_engine import BatchedEngine

    out = Path(out)
    if mode == RESUME:
        if not (out / BATCH).is_file():
            raise UsageError(f"--resume {out}: no {BATCH}; not a batch of runs")
        batch = read_json(out / BATCH)
        seeds, stopped = batch["seeds"], {int(k): v for k, v in batch["stopped"].items()}
        _settle(out, batch["epoch"], seeds)
        configs = [read_config(member_dir(out, s)) for s in seeds]
        if all((member_dir(out, s) / SUMMARY).exists() for s in seeds if s not in stopped):
            raise UsageError(f"--resume {out}: the batch already finished")
    elif mode == START:
        if not seeds or len(set(seeds)) != len(seeds):
            raise UsageError(f"seeds must be distinct, got {list(seeds or [])}")
        configs, stopped = [replace(config, seed=s) for s in seeds], {}
        batch = {"config": {**config.to_dict(), "seed": None}, "seeds": list(seeds), "epoch": 0, "stopped": {}}
    else:
        raise UsageError(f"unknown mode {mode!r} for a batch; expected {START} or {RESUME}")
    device = resolve_device(configs[0].device)
    configs = [resolve_precision(c, device, BATCHED) for c in configs]
    first = configs[0]
    if first.precision != "fp32" or first.nproc > 1 or first.sync_bn:
        raise UsageError("--batched trains in fp32 in one process; leave out --precision bf16, --nproc and --sync-bn")
    if device == "cuda":
        set_deterministic(first.deterministic)
    phases = Phases()  # shared: the members' phases are the batch's
    with phases("data"):
        ds = dataset if dataset is not None else load_dataset(first.data_dir)
        parts = [load_split(c, ds) for c in configs]
        if first.subsample == 1:  # every member trains on the same images: one copy of them
            parts = [parts[0]] * len(parts)
    try:
        engine = BatchedEngine(configs, ds.num_classes, device)
    except ValueError as exc:
        raise UsageError(f"--batched: {exc}") from None
    histories = [History() for _ in seeds]
    if mode == RESUME:
        with phases("checkpoints"):
            states = [checkpoint.read_state(member_dir(out, s)) for s in seeds]
        engine.load_states([(arrays, meta) for meta, arrays in states])
        histories = [History(list(meta["epochs"])) for meta, _ in states]
        for i, s in enumerate(seeds):
            if s in stopped:
                engine.drop(i)
        epochs_done = {len(h.epochs) for s, h in zip(seeds, histories, strict=True) if s not in stopped}
        if len(epochs_done) > 1:
            raise UsageError(f"--resume {out}: its members stopped at different epochs ({sorted(epochs_done)})")
    else:
        _start(out, configs, device, ds, force, phases)
        _write_record(out, batch, stopped)
    writers = [RunWriter(c, member_dir(out, c.seed), h, phases) for c, h in zip(configs, histories, strict=True)]
    return _epochs(engine, configs, parts, writers, out, batch, stopped, phases, ds.num_classes, on_epoch, on_run,
                   on_stop)


def _write_record(out: Path, batch: dict, stopped: dict[int, str]) -> None:
    """``batch.json``: the recipe, the seeds, the epoch committed and the members stopped early."""
    batch["stopped"] = {str(k): v for k, v in stopped.items()}
    write_json_atomic(out / BATCH, batch)


def _commit(out: Path, batch: dict, stopped: dict[int, str], epoch: int, run_dirs: list[Path]) -> None:
    """Every member's epoch ``epoch`` saved (staged), the batch moves to it: ``batch.json`` says so
    first, then each staged checkpoint takes its place. A batch killed in between is settled by
    :func:`_settle` when resumed, so its members never stand at different epochs."""
    batch["epoch"] = epoch
    _write_record(out, batch, stopped)
    for run_dir in run_dirs:
        os.replace(run_dir / checkpoint.STAGED, run_dir / checkpoint.STATE)


def _settle(out: Path, epoch: int, seeds: list[int]) -> None:
    """After a kill during :func:`_commit`: staged checkpoints of the committed epoch take their place,
    those of an epoch never committed are dropped."""
    for s in seeds:
        staged = member_dir(out, s) / checkpoint.STAGED
        if staged.is_file():
            meta, _ = checkpoint.read_state(member_dir(out, s), arrays=False, name=checkpoint.STAGED)
            if meta["epoch"] == epoch:
                os.replace(staged, member_dir(out, s) / checkpoint.STATE)
            else:
                staged.unlink()


def _start(out: Path, configs: list[TrainConfig], device: str, ds: Dataset, force: bool, phases: Phases) -> None:
    """``out`` and every member's directory made, with its ``config.json`` and ``example.png``."""
    prepare_run_dir(out, force)
    first, label = ds.images[0], int(ds.labels[0])
    with phases("pictures"):
        example = plots.plot_example(first, label, f"First training example: label {label}")
    for c in configs:
        run_dir = prepare_run_dir(member_dir(out, c.seed), force)
        write_json_atomic(run_dir / CONFIG, {**c.to_dict(), "resolved_device": device})
        with phases("pictures"):
            plots.save(example, run_dir / "example.png")


def _epochs(engine, configs, parts, writers, out, batch, stopped, phases, num_classes, on_epoch, on_run,
            on_stop) -> dict[int, RunResult]:
    """The epochs left, each member checked and saved on its own, then each finished member's end."""
    config, seeds = configs[0], [c.seed for c in configs]
    engine.set_data([p[0] for p in parts], [p[1] for p in parts], parts[0][2], parts[0][3])
    first = min(len(w.history.epochs) for s, w in zip(seeds, writers, strict=True) if s not in stopped) \
        if len(stopped) < len(seeds) else config.epochs
    proba = None
    for epoch in range(first + 1, config.epochs + 1):
        start = time.perf_counter()
        losses = engine.train_epoch(epoch)
        trained = time.perf_counter() - start
        last = epoch == config.epochs
        valid = engine.validate(keep_proba=last and not config.tta)
        seconds = time.perf_counter() - start
        for i, (seed, writer) in enumerate(zip(seeds, writers, strict=True)):
            if seed in stopped:
                continue
            try:
                check_loss(float(losses[i]), epoch, config)
                check_outputs(valid[i], float(losses[i]), epoch, config)
            except TrainingDiverged as exc:
                engine.drop(i)
                stopped[seed] = str(exc)
                _write_record(out, batch, stopped)
                if on_stop is not None:
                    on_stop(seed, str(exc))
                continue
            # each member's share of the batch's time
            record = epoch_record(epoch, float(losses[i]), valid[i], seconds / len(seeds), trained / len(seeds))
            writer.history.epochs.append(record)
            arrays, meta = engine.state_of(i)
            writer.epoch(record, arrays, {**meta, "engine": engine.name}, checkpoint.STAGED)
        _commit(out, batch, stopped, epoch, [w.run_dir for s, w in zip(seeds, writers, strict=True)
                                            if s not in stopped])
        for seed, writer in zip(seeds, writers, strict=True):
            if seed not in stopped and on_epoch is not None:
                on_epoch(seed, writer.history.epochs[-1])
        if last:
            proba = [v.get("proba") for v in valid]
    engine.end_training()
    if len(stopped) < len(seeds) and (config.tta or proba is None):
        with phases("final_inference"):
            proba = list(engine.predict_proba(parts[0][2], tta=config.tta))
    results = {}
    for i, (seed, writer) in enumerate(zip(seeds, writers, strict=True)):
        if seed in stopped:
            continue
        summary = writer.finish(engine.weights(i), num_classes, proba[i], parts[i][2], parts[i][3],
                                n_train=len(parts[i][0]), device=engine.device, num_parameters=engine.num_parameters,
                                extra={"engine": engine.name, "batch": seeds})
        results[seed] = RunResult(writer.run_dir, writer.history, summary)
        if on_run is not None:
            on_run(seed, results[seed])
    return results
