"""The run driver: start or resume a run → epochs → weights → summary → pictures, on either engine.

Every run, from ``mnistlab train`` or :func:`mnistlab.train_run`, goes through here. The device
is resolved once (:func:`mnistlab.train.engine.resolve_device`), the engine chosen once
(:func:`mnistlab.train.engine.choose_engine`, or the one a resumed checkpoint names); the
driver owns the timings, the hooks, the checkpoints and the summary, the engine the numbers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import plots
from ..config import History, TrainConfig
from ..data.mnist import Dataset, load_dataset
from ..errors import RunError, UsageError
from ..files import write_json_atomic
from ..train import distributed
from ..train.engine import PYTORCH, Engine, create_engine, resolve_device
from ..train.loop import train_epochs
from . import checkpoint
from .rundir import CONFIG, SUMMARY, default_run_dir, load_split, prepare_run_dir, read_config, write_metrics
from .summary import Phases, finish

LOSS_PLOT_EVERY = 10.0  # seconds: loss.png is redrawn at most this often while training, and after the last epoch

OnBatch = Callable[[int, int, float], None]
OnEpoch = Callable[[dict], None]


@dataclass
class RunResult:
    run_dir: Path
    history: History
    summary: dict
    _model: object = field(default=None, repr=False)

    @property
    def model(self):
        """The trained ``torch.nn.Module`` (loaded from the run directory on first use where the
        engine has none: the kernel engine trains without PyTorch)."""
        if self._model is None:
            from ..models import load_model

            self._model = load_model(self.run_dir)
        return self._model


def train_run(config: TrainConfig, out: str | os.PathLike | None = None, *, force: bool = False,
              dataset: Dataset | None = None, on_batch: OnBatch | None = None,
              on_epoch: OnEpoch | None = None) -> RunResult:
    """Train ``config`` end to end and write its run directory (default ``runs/MODEL-TIME``)."""
    phases = Phases()
    device = resolve_device(config.device)
    with phases("data"):
        ds = dataset if dataset is not None else load_dataset(config.data_dir)
    if not distributed.is_main():  # another process of a data-parallel job: rank 0 writes the directory
        return _drive(config, Path(out), ds, create_engine(config, ds.num_classes, device), History(), phases,
                      on_batch, on_epoch)
    run_dir = prepare_run_dir(out if out is not None else default_run_dir(config.model), force)
    engine = create_engine(config, ds.num_classes, device)
    write_json_atomic(run_dir / CONFIG, {**config.to_dict(), "resolved_device": device})
    first, label = ds.images[0], int(ds.labels[0])  # both splits start with the dataset's first row
    with phases("pictures"):
        plots.save(plots.plot_example(first, label, f"First training example: label {label}"),
                   run_dir / "example.png")
    return _drive(config, run_dir, ds, engine, History(), phases, on_batch, on_epoch)


def resume_run(run_dir: str | os.PathLike, *, dataset: Dataset | None = None, on_batch: OnBatch | None = None,
               on_epoch: OnEpoch | None = None) -> RunResult:
    """Continue an interrupted run from its last complete epoch, exactly as if never stopped, on
    the engine that started it."""
    phases = Phases()
    config = read_config(run_dir)
    run_dir = Path(run_dir)
    if (run_dir / SUMMARY).exists():
        raise UsageError(f"--resume {run_dir}: the run already finished ({SUMMARY} exists)")
    distributed.check_world(config.nproc)
    with phases("checkpoints"):
        meta, arrays = checkpoint.read_state(run_dir)
    device = resolve_device(config.device)
    with phases("data"):
        ds = dataset if dataset is not None else load_dataset(config.data_dir)
    try:
        engine = create_engine(config, ds.num_classes, device, name=meta.get("engine", PYTORCH))
    except RunError as exc:
        raise RunError(f"--resume {run_dir}: cannot continue here: {exc}") from None
    try:
        engine.load_state(arrays, meta)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise RunError(f"{run_dir / checkpoint.STATE}: unreadable checkpoint ({exc})") from None
    return _drive(config, run_dir, ds, engine, History(list(meta["epochs"])), phases, on_batch, on_epoch)


def _drive(config: TrainConfig, run_dir: Path, ds: Dataset, engine: Engine, history: History, phases: Phases,
           on_batch: OnBatch | None, on_epoch: OnEpoch | None) -> RunResult:
    """The epochs after ``history``'s last, then weights, summary and pictures."""
    with phases("data"):
        x_train, y_train, x_valid, y_valid = load_split(config, ds)
    first_epoch = len(history.epochs)
    last_plot = time.monotonic()
    writes = distributed.is_main()

    def epoch_done(record: dict) -> None:  # the record is in history already
        nonlocal last_plot
        if not writes:
            return
        with phases("checkpoints"):
            arrays, meta = engine.state()
            meta = {**meta, "epoch": record["epoch"], "epochs": history.epochs, "engine": engine.name}
            checkpoint.write_state(run_dir, arrays, meta)
            write_metrics(run_dir, history)
        # the last epoch's loss.png is drawn by finish(), beside the other pictures
        if record["epoch"] < config.epochs and time.monotonic() - last_plot >= LOSS_PLOT_EVERY:
            with phases("pictures"):
                plots.save(plots.plot_history(history.epochs, f"{config.model}: {run_dir.name}"),
                           run_dir / "loss.png")
            last_plot = time.monotonic()
        if on_epoch is not None:
            on_epoch(record)

    try:
        proba = train_epochs(engine, config, x_train, y_train, x_valid, y_valid, history, on_batch, epoch_done)
    except RuntimeError as exc:
        if distributed.active() is None:
            raise
        raise distributed.failed(exc) from None
    if not writes:
        return RunResult(run_dir, history, {}, engine.torch_model())
    with phases("checkpoints"):
        checkpoint.write_weights(run_dir, engine.weights(), config.model, {"num_classes": ds.num_classes})
    with phases("final_inference"):  # once, for the summary and the pictures
        if proba is None or config.tta:  # the last epoch's validation kept them, unless nothing was left
            proba = engine.predict_proba(x_valid, tta=config.tta)
    summary = finish(run_dir, config, history, first_epoch, phases, proba, x_valid, y_valid, ds.num_classes,
                     n_train=len(x_train), device=engine.device, num_parameters=engine.num_parameters,
                     extra={"engine": engine.name})
    return RunResult(run_dir, history, summary, engine.torch_model())
