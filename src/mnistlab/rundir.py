"""A run directory's files: names, writing and reading them. No PyTorch here (see :mod:`mnistlab.runs`).

Layout of ``RUN_DIR``::

    config.json        the resolved TrainConfig
    metrics.csv        one row per epoch (also metrics.jsonl, one JSON object per line)
    model.safetensors  the weights; model.json: registry name and model config
    checkpoint.safetensors  after every epoch: everything --resume needs
    summary.json       written last: its presence marks a finished run
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from . import metrics, plots
from .config import History, TrainConfig
from .data import Dataset, load_dataset, split
from .errors import RunError, UsageError
from .files import write_json_atomic, write_text_atomic

WEIGHTS = "model.safetensors"
META = "model.json"
STATE = "checkpoint.safetensors"
CONFIG = "config.json"
SUMMARY = "summary.json"
METRICS_CSV = "metrics.csv"
METRICS_JSONL = "metrics.jsonl"
PICTURES = ("example.png", "loss.png", "predictions.png", "confusion.png", "mistakes.png")
RUN_FILES = (CONFIG, SUMMARY, METRICS_CSV, METRICS_JSONL, WEIGHTS, META, STATE,
             "report.html", *PICTURES)
METRIC_KEYS = ("epoch", "train_loss", "valid_loss", "valid_acc", "seconds")
TIMINGS = ("data", "training", "validation", "checkpoints", "final_inference", "pictures")  # summary.json
GRID = (3, 3)  # the seed's prediction grid: validation images 0..8


@dataclass
class RunResult:
    run_dir: Path
    model: object  # the trained torch.nn.Module (None from mnistlab.fastrun, which runs without PyTorch)
    history: History
    summary: dict


class Phases:
    """Wall seconds spent per phase of a run, summed over every entry into the phase."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def start(config: TrainConfig, out, force: bool, dataset: Dataset | None, phases: Phases, device: str):
    """A new run's first steps: check ``config``, load the data, create the run directory, write
    config.json and example.png. Returns ``(config, dataset, run_dir)``; ``config.data_dir`` made absolute."""
    config.validate()
    if config.data_dir is not None:  # absolute, so the run can be evaluated from anywhere
        config = replace(config, data_dir=str(Path(config.data_dir).resolve()))
    with phases("data"):
        ds = dataset if dataset is not None else load_dataset(config.data_dir)
    run_dir = prepare_run_dir(out if out is not None else default_run_dir(config.model), force)
    write_json_atomic(run_dir / CONFIG, {**config.to_dict(), "resolved_device": device})
    first, label = ds.images[0], int(ds.labels[0])  # both splits start with the dataset's first row
    with phases("pictures"):
        plots.save(plots.plot_example(first, label, f"First training example: label {label}"),
                   run_dir / "example.png")
    return config, ds, run_dir


def resume_start(run_dir, dataset: Dataset | None, phases: Phases):
    """An interrupted run's config, directory and data; refuses a finished run."""
    config = read_config(run_dir)
    run_dir = Path(run_dir)
    if (run_dir / SUMMARY).exists():
        raise UsageError(f"--resume {run_dir}: the run already finished ({SUMMARY} exists)")
    with phases("data"):
        ds = dataset if dataset is not None else load_dataset(config.data_dir)
    return config, run_dir, ds


def default_run_dir(model: str) -> Path:
    return Path("runs") / f"{model}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_run_dir(out: str | os.PathLike, force: bool = False) -> Path:
    """Create ``out``; refuse to reuse a non-empty directory unless ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UsageError(f"--out {out}: directory exists and is not empty; pass --force to overwrite its run")
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    return out


def _metrics_csv(history: History) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_KEYS, lineterminator="\n")
    writer.writeheader()
    for row in history.epochs:
        writer.writerow({k: row[k] for k in METRIC_KEYS})
    return buf.getvalue()


def write_metrics(run_dir: Path, history: History) -> None:
    write_text_atomic(run_dir / METRICS_CSV, _metrics_csv(history))
    write_text_atomic(run_dir / METRICS_JSONL, "".join(json.dumps(r) + "\n" for r in history.epochs))


def load_split(config: TrainConfig, dataset: Dataset | None = None):
    """The run's ``x_train, y_train, x_valid, y_valid`` as uint8 images and int64 labels."""
    ds = dataset if dataset is not None else load_dataset(config.data_dir)
    return split(ds.images, ds.labels, config.split, n_train=ds.n_train)


def write_pictures(run_dir: Path, proba: np.ndarray, x_valid, y_valid, num_classes: int,
                   history: tuple[list[dict], str] | None = None) -> dict:
    """predictions.png, confusion.png and mistakes.png for the validation part from the model's
    class probabilities ``proba`` on it, and loss.png from ``history`` (per-epoch records, title)
    if given; returns the analysis."""
    preds = proba.argmax(axis=1)
    y_valid = np.asarray(y_valid)
    rows, cols = GRID
    matrix = metrics.confusion_matrix(preds, y_valid, num_classes)
    worst = metrics.worst_mistakes(proba, y_valid, top=16)

    def grid_and_confusion() -> None:
        plots.save(plots.plot_grid(x_valid, y_valid, rows, cols, preds, probabilities=proba.max(axis=1),
                                   title="Validation images 0-8: predicted / true"), run_dir / "predictions.png")
        plots.save(plots.plot_confusion(matrix), run_dir / "confusion.png")

    def mistakes_and_losses() -> None:
        if history is not None:
            plots.save(plots.plot_history(*history), run_dir / "loss.png")
        if len(worst):
            fig = plots.plot_grid(x_valid[worst], y_valid[worst], 4, 4, preds[worst],
                                  probabilities=proba[worst, preds[worst]],
                                  title="Most confident mistakes (validation)")
        else:
            fig = plots.plot_grid(x_valid[:0], y_valid[:0], 1, 1, preds[:0], title="No mistakes on the validation part")
        plots.save(fig, run_dir / "mistakes.png")

    side_by_side(grid_and_confusion, mistakes_and_losses)
    return {"confusion": matrix, "predictions": preds, "probabilities": proba}


def side_by_side(first: Callable[[], None], second: Callable[[], None]) -> None:
    """``first()`` here while a forked child process runs ``second()``: two cores draw two
    pictures at once (matplotlib draws on one thread). Where fork is unavailable, or the child
    does not succeed, ``second()`` runs here afterwards, so its errors surface as usual."""
    pid = os.fork() if hasattr(os, "fork") else -1
    if pid == 0:  # the child: no Python teardown, no flushing of buffers it shares with the parent
        try:
            second()
        except BaseException:
            os._exit(1)
        os._exit(0)
    try:
        first()
    finally:
        done = pid > 0 and os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    if not done:
        second()


def _grid(values: np.ndarray, cols: int) -> list[list[int]]:
    values = [int(v) for v in values]
    return [values[i : i + cols] for i in range(0, len(values), cols)]


def check_run_dir(run_dir: str | os.PathLike) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run directory not found: {run_dir}")
    if not (run_dir / CONFIG).is_file():
        raise RunError(f"{run_dir}: no {CONFIG}; not a run directory made by 'mnistlab train'")
    return run_dir


def read_config(run_dir: str | os.PathLike) -> TrainConfig:
    run_dir = check_run_dir(run_dir)
    try:
        return TrainConfig.from_dict(json.loads((run_dir / CONFIG).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise RunError(f"{run_dir / CONFIG}: unreadable config ({exc})") from None


def read_summary(run_dir: str | os.PathLike) -> dict:
    run_dir = check_run_dir(run_dir)
    try:
        return json.loads((run_dir / SUMMARY).read_text())
    except FileNotFoundError:
        raise RunError(f"{run_dir}: no {SUMMARY}; the run did not finish") from None
    except (OSError, ValueError) as exc:
        raise RunError(f"{run_dir / SUMMARY}: unreadable summary ({exc})") from None


def read_history(run_dir: str | os.PathLike) -> History:
    path = check_run_dir(run_dir) / METRICS_JSONL
    try:
        return History([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
    except FileNotFoundError:
        raise RunError(f"{run_dir}: no {METRICS_JSONL}; no epoch finished") from None
    except (OSError, ValueError) as exc:
        raise RunError(f"{path}: unreadable metrics ({exc})") from None




LOSS_PLOT_EVERY = 10.0  # seconds: loss.png is redrawn at most this often while training, and after the last epoch


def epoch_recorder(run_dir: Path, config: TrainConfig, history: History, phases: Phases,
                   save_state: Callable[[int], None], on_epoch: Callable[[dict], None] | None = None):
    """The per-epoch hook of a run: append the record to ``history``, ``save_state(epoch)``
    (the checkpoint), write the metrics, redraw loss.png (at most every ``LOSS_PLOT_EVERY``
    seconds; after the last epoch :func:`finish` does), then ``on_epoch(record)``."""
    last_plot = [time.monotonic()]

    def epoch_done(record: dict) -> None:
        history.epochs.append(record)
        with phases("checkpoints"):
            save_state(record["epoch"])
            write_metrics(run_dir, history)
        # the last epoch's loss.png is drawn by finish(), beside the other pictures
        if record["epoch"] < config.epochs and time.monotonic() - last_plot[0] >= LOSS_PLOT_EVERY:
            with phases("pictures"):
                plots.save(plots.plot_history(history.epochs, f"{config.model}: {run_dir.name}"),
                           run_dir / "loss.png")
            last_plot[0] = time.monotonic()
        if on_epoch is not None:
            on_epoch(record)

    return epoch_done


def finish(run_dir: Path, config: TrainConfig, history: History, first_epoch: int, phases: Phases,
           proba: np.ndarray, x_valid, y_valid, num_classes: int, *, n_train: int, device: str,
           num_parameters: int, extra: dict | None = None) -> dict:
    """Write the pictures and ``summary.json`` of a trained run (weights already saved); returns the summary.

    ``summary.json``'s ``timings`` gives the wall seconds of this process's phases: data
    (loading and splitting), training and validation (the epochs trained here, from
    ``first_epoch`` on), checkpoints (per-epoch state, metrics, final weights), final_inference
    (the validation probabilities the summary and pictures use: the last epoch's validation keeps
    them, so this is a pass of its own only with TTA or when no epoch was left to train) and
    pictures. ``extra``: more keys for the summary.
    """
    train_seconds = sum(r["seconds"] for r in history.epochs)  # the epochs, validation included
    summary = make_summary(config, history, n_train, y_valid, proba, train_seconds, device, num_parameters)
    summary.update(extra or {})
    with phases("pictures"):
        write_pictures(run_dir, proba, x_valid, y_valid, num_classes,
                       history=(history.epochs, f"{config.model}: {run_dir.name}"))
    here = history.epochs[first_epoch:]  # the epochs trained by this process
    training = sum(r["train_seconds"] for r in here)
    epochs = {"training": training, "validation": sum(r["seconds"] for r in here) - training}
    summary["timings"] = {k: epochs[k] if k in epochs else phases.seconds.get(k, 0.0) for k in TIMINGS}
    write_json_atomic(run_dir / SUMMARY, summary)
    return summary


def _torch_version() -> str:
    """PyTorch's version as installed (``torch.__version__``), read without importing it."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def make_summary(config, history, n_train, y_valid, proba, train_seconds, device: str, num_parameters: int) -> dict:
    """The run's final figures; ``proba``: the model's class probabilities on the validation part.

    With ``config.tta`` (``proba`` then test-time-augmented) the validation loss and accuracy
    come from ``proba``; the last epoch's single-view figures stay beside them.
    """
    rows, cols = GRID
    n = min(rows * cols, len(y_valid))
    last = history.epochs[-1]
    scores = {"valid_loss": last["valid_loss"], "valid_acc": last["valid_acc"]}
    if config.tta:
        from .evaluation import score  # PyTorch: runs with TTA train through mnistlab.runs

        tta = score(proba, y_valid, batch_size=2 * config.batch_size)
        scores = {"valid_loss": tta["loss"], "valid_acc": tta["acc"], "tta": True,
                  "valid_loss_single": last["valid_loss"], "valid_acc_single": last["valid_acc"]}
    return {
        "model": config.model,
        "epochs": len(history.epochs),
        "train_loss": last["train_loss"],
        **scores,
        "train_seconds": train_seconds,
        "grid_predictions": _grid(proba[:n].argmax(axis=1), cols),
        "grid_labels": _grid(np.asarray(y_valid[:n]), cols),
        "split": config.split,
        "n_train": n_train,
        "n_valid": len(y_valid),
        "num_parameters": num_parameters,
        "device": device,
        "torch": _torch_version(),
    }
