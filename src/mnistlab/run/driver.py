"""The run driver: a run's whole lifecycle in one place, on either engine.

:func:`run_training` decides what a run directory's state calls for (start a fresh run, resume an
interrupted one, refuse or reuse a finished one, continue a job torchrun restarted), launches or
joins a data-parallel job, then drives the epochs → weights → summary → pictures. Every run goes
through it: ``mnistlab train``, :func:`train_run` / :func:`resume_run`, searches and seed sweeps.
The device is resolved once here (:func:`mnistlab.train.device.resolve_device`), the engine chosen
once (:func:`mnistlab.train.choose.choose_engine`, or the one a resumed checkpoint names); the
driver owns the timings, the hooks, the checkpoints and the summary, the engine the numbers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import plots
from ..config import History, TrainConfig
from ..data.mnist import Dataset, load_dataset
from ..errors import RunError, UsageError
from ..files import write_json_atomic
from ..train import distributed
from ..train.choose import check_processes, create_engine, resolve_precision
from ..train.device import resolve_device, set_deterministic
from ..train.engine import AUTOGRAD, Engine
from ..train.loop import train_epochs
from . import checkpoint
from .rundir import (
    CONFIG,
    SUMMARY,
    default_run_dir,
    load_split,
    prepare_run_dir,
    read_config,
    read_history,
    read_summary,
    write_metrics,
)
from .summary import Phases, finish

LOSS_PLOT_EVERY = 10.0  # seconds: loss.png is redrawn at most this often while training, and after the last epoch

START, RESUME, CONTINUE = "start", "resume", "continue"
MODES = (START, RESUME, CONTINUE)

OnStart = Callable[[TrainConfig, Path, History], None]
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
            from .trained import load_model

            self._model = load_model(self.run_dir)
        return self._model


@dataclass(frozen=True)
class Job:
    """How the command line runs a data-parallel run: the command each process runs (``argv``, as
    given to ``mnistlab``), restarts after a process dies, and seconds a collective waits (None:
    ``DEFAULT_TIMEOUT``)."""

    argv: list[str]
    max_restarts: int = 0
    timeout: float | None = None


def run_training(config: TrainConfig | None, run_dir: str | os.PathLike | None = None, *, mode: str = START,
                 force: bool = False, dataset: Dataset | None = None, job: Job | None = None,
                 on_start: OnStart | None = None, on_batch: OnBatch | None = None,
                 on_epoch: OnEpoch | None = None) -> RunResult | None:
    """A run from whatever state ``run_dir`` is in to finished; the :class:`RunResult`.

    ``mode``:

    - ``"start"``: a fresh run of ``config`` into ``run_dir`` (default ``runs/MODEL-TIME``); a
      non-empty directory is refused unless ``force``.
    - ``"resume"``: continue the interrupted run in ``run_dir`` from its last complete epoch with
      its own config (``config`` is ignored), exactly as if never stopped; a finished run is refused.
    - ``"continue"``: whatever ``run_dir`` holds: a finished run is returned as it is, an
      interrupted one resumed, anything else started afresh from ``config``. (A retried search
      trial or queued seed, and every process of a job torchrun restarted.)

    In a process torchrun started, the job is joined first (gloo on the CPU, NCCL on CUDA) and left
    at the end; only rank 0 writes the directory and calls the hooks, and the others return None.
    With ``config.nproc`` above 1 outside torchrun, ``job`` says what each process runs: the job is
    launched, None returned once it ended well (a one-line error otherwise).

    ``on_start(config, run_dir, history)`` is called before the first epoch trained here (``history``:
    the epochs done before, if resumed); ``on_batch(batch, n_batches, loss)`` and ``on_epoch(record)``
    report progress.
    """
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; expected one of: {', '.join(MODES)}")
    if run_dir is None:
        if mode != START:
            raise UsageError(f"mode {mode!r} needs the run directory")
        if distributed.launched():
            raise UsageError("a run trained by several processes needs its run directory given (out), the same "
                             "in every process")
        run_dir = default_run_dir(config.model)
    run_dir = Path(run_dir)
    if distributed.launched() and distributed.restarted():
        mode = CONTINUE  # every process of a restarted job picks the run up where it stands
    if mode == RESUME or (mode == CONTINUE and (run_dir / checkpoint.STATE).is_file()):
        config = read_config(run_dir)
    elif config is None:
        raise UsageError(f"mode {mode!r} needs a config")
    device = resolve_device(config.device)
    config = resolve_precision(config, device)  # what config.json records: a resumed run keeps it
    check_processes(config, device)
    if device == "cuda":
        set_deterministic(config.deterministic)
    if config.nproc > 1 and not distributed.launched():
        if job is None:
            raise UsageError(f"nproc {config.nproc}: several processes train through torchrun; start this under "
                             f"torchrun, or use mnistlab train --nproc {config.nproc}")
        argv = job.argv + (["--out", str(run_dir)] if mode == START else [])  # one directory for every process
        distributed.launch(argv, config.nproc, job.max_restarts)
        return None
    if distributed.launched():
        distributed.setup(device, (job and job.timeout) or distributed.DEFAULT_TIMEOUT)
    try:
        return _run(config, run_dir, device, mode, force, dataset, on_start, on_batch, on_epoch)
    finally:
        distributed.teardown()


def _run(config, run_dir: Path, device: str, mode: str, force: bool, dataset, on_start, on_batch,
         on_epoch) -> RunResult | None:
    if mode == CONTINUE:
        if (run_dir / SUMMARY).is_file():
            return RunResult(run_dir, read_history(run_dir), read_summary(run_dir))
        mode = RESUME if (run_dir / checkpoint.STATE).is_file() else START
        force = True  # what is there is this run's own beginning
    if mode == RESUME:
        if (run_dir / SUMMARY).exists():
            raise UsageError(f"--resume {run_dir}: the run already finished ({SUMMARY} exists)")
        distributed.check_world(config.nproc)
    elif distributed.launched():
        config = replace(config, nproc=distributed.world_size())  # the config records the job's size
    writes = distributed.is_main()
    phases = Phases()
    history, meta, arrays = History(), None, None
    if mode == RESUME:
        with phases("checkpoints"):
            meta, arrays = checkpoint.read_state(run_dir)
        history = History(list(meta["epochs"]))
    with phases("data"):  # bad data is refused before a run directory is made
        ds = dataset if dataset is not None else load_dataset(config.data_dir)
    if mode == START and writes:
        run_dir = prepare_run_dir(run_dir, force)
    engine = _engine(config, ds.num_classes, device, run_dir, meta, arrays)
    if mode == START and writes:
        write_json_atomic(run_dir / CONFIG, {**config.to_dict(), "resolved_device": device})
        first, label = ds.images[0], int(ds.labels[0])  # every split starts with the dataset's first row
        with phases("pictures"):
            plots.save(plots.plot_example(first, label, f"First training example: label {label}"),
                       run_dir / "example.png")
    if writes and on_start is not None:
        on_start(config, run_dir, history)
    return _drive(config, run_dir, ds, engine, history, phases, on_batch if writes else None,
                  on_epoch if writes else None)


def _engine(config: TrainConfig, num_classes: int, device: str, run_dir: Path, meta: dict | None,
            arrays: dict | None) -> Engine:
    """A fresh engine, or (``meta``: a checkpoint's) the one that started the run, in its state."""
    if meta is None:
        return create_engine(config, num_classes, device)
    try:
        engine = create_engine(config, num_classes, device, name=meta.get("engine", AUTOGRAD))
    except RunError as exc:
        raise RunError(f"--resume {run_dir}: cannot continue here: {exc}") from None
    try:
        engine.load_state(arrays, meta)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise RunError(f"{run_dir / checkpoint.STATE}: unreadable checkpoint ({exc})") from None
    return engine


def train_run(config: TrainConfig, out: str | os.PathLike | None = None, *, force: bool = False,
              dataset: Dataset | None = None, on_batch: OnBatch | None = None,
              on_epoch: OnEpoch | None = None) -> RunResult:
    """Train ``config`` end to end and write its run directory (default ``runs/MODEL-TIME``):
    :func:`run_training` with ``mode="start"``."""
    return run_training(config, out, force=force, dataset=dataset, on_batch=on_batch, on_epoch=on_epoch)


def resume_run(run_dir: str | os.PathLike, *, dataset: Dataset | None = None, on_batch: OnBatch | None = None,
               on_epoch: OnEpoch | None = None) -> RunResult:
    """Continue an interrupted run from its last complete epoch, exactly as if never stopped, on
    the engine that started it: :func:`run_training` with ``mode="resume"``."""
    return run_training(None, run_dir, mode=RESUME, dataset=dataset, on_batch=on_batch, on_epoch=on_epoch)


class RunWriter:
    """What a run directory gets as its run goes: after every epoch the checkpoint, the metrics and,
    now and then, loss.png; at the end the weights, ``summary.json`` and the pictures."""

    def __init__(self, config: TrainConfig, run_dir: Path, history: History, phases: Phases,
                 on_epoch: OnEpoch | None = None):
        self.config, self.run_dir, self.history, self.phases, self.on_epoch = config, run_dir, history, phases, on_epoch
        self.first_epoch = len(history.epochs)
        self.last_plot = time.monotonic()

    def epoch(self, record: dict, arrays: dict, meta: dict, state_file: str = checkpoint.STATE) -> None:
        """After ``record`` (in the history already): the engine's state (``arrays``, ``meta``) saved
        (into ``state_file``)."""
        with self.phases("checkpoints"):
            meta = {**meta, "epoch": record["epoch"], "epochs": self.history.epochs}
            checkpoint.write_state(self.run_dir, arrays, meta, state_file)
            write_metrics(self.run_dir, self.history)
        # the last epoch's loss.png is drawn by finish(), beside the other pictures
        if record["epoch"] < self.config.epochs and time.monotonic() - self.last_plot >= LOSS_PLOT_EVERY:
            with self.phases("pictures"):
                plots.save(plots.plot_history(self.history.epochs, f"{self.config.model}: {self.run_dir.name}"),
                           self.run_dir / "loss.png")
            self.last_plot = time.monotonic()
        if self.on_epoch is not None:
            self.on_epoch(record)

    def finish(self, weights: dict, num_classes: int, proba, x_valid, y_valid, *, n_train: int, device: str,
               num_parameters: int, extra: dict) -> dict:
        """The final weights, then the summary and the pictures from the validation probabilities ``proba``."""
        with self.phases("checkpoints"):
            checkpoint.write_weights(self.run_dir, weights, self.config.model, {"num_classes": num_classes})
        return finish(self.run_dir, self.config, self.history, self.first_epoch, self.phases, proba, x_valid, y_valid,
                      num_classes, n_train=n_train, device=device, num_parameters=num_parameters, extra=extra)


def _drive(config: TrainConfig, run_dir: Path, ds: Dataset, engine: Engine, history: History, phases: Phases,
           on_batch: OnBatch | None, on_epoch: OnEpoch | None) -> RunResult | None:
    """The epochs after ``history``'s last, then weights, summary and pictures."""
    with phases("data"):
        x_train, y_train, x_valid, y_valid = load_split(config, ds)
    writes = distributed.is_main()
    writer = RunWriter(config, run_dir, history, phases, on_epoch)

    def epoch_done(record: dict) -> None:  # the record is in history already
        if writes:
            arrays, meta = engine.state()
            writer.epoch(record, arrays, {**meta, "engine": engine.name})

    try:
        proba = train_epochs(engine, config, x_train, y_train, x_valid, y_valid, history, on_batch, epoch_done)
    except RuntimeError as exc:
        if distributed.active() is None:
            raise
        raise distributed.failed(exc) from None
    if not writes:
        return None
    if proba is None or config.tta:  # the last epoch's validation kept them, unless nothing was left
        with phases("final_inference"):  # once, for the summary and the pictures
            proba = engine.predict_proba(x_valid, tta=config.tta)
    summary = writer.finish(engine.weights(), ds.num_classes, proba, x_valid, y_valid, n_train=len(x_train),
                            device=engine.device, num_parameters=engine.num_parameters,
                            extra={"engine": engine.name, "precision": config.precision})
    return RunResult(run_dir, history, summary, engine.torch_model())
