"""A run directory: train from a config and leave everything needed to understand and reuse it.

Layout of ``RUN_DIR``::

    config.json        the resolved TrainConfig
    metrics.csv        one row per epoch (also metrics.jsonl, one JSON object per line)
    model.safetensors  the weights; model.json: registry name and model config
    checkpoint.safetensors  after every epoch: everything --resume needs
    summary.json       written last: its presence marks a finished run
"""

from __future__ import annotations

import csv
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
import torch

from . import checkpoint, metrics, plots
from .data import Dataset, load_dataset, split
from .errors import RunError, UsageError
from .evaluate import evaluate, predict_proba, score
from .files import write_json_atomic, write_text_atomic
from .models import count_parameters, create_model
from .optim import WeightAverage
from .train import History, TrainConfig, fit, make_optimizer, resolve_device

CONFIG = "config.json"
SUMMARY = "summary.json"
METRICS_CSV = "metrics.csv"
METRICS_JSONL = "metrics.jsonl"
PICTURES = ("example.png", "loss.png", "predictions.png", "confusion.png", "mistakes.png")
RUN_FILES = (CONFIG, SUMMARY, METRICS_CSV, METRICS_JSONL, checkpoint.WEIGHTS, checkpoint.META, checkpoint.STATE,
             "report.html", *PICTURES)
METRIC_KEYS = ("epoch", "train_loss", "valid_loss", "valid_acc", "seconds")
TIMINGS = ("data", "training", "validation", "checkpoints", "final_inference", "pictures")  # summary.json
GRID = (3, 3)  # the seed's prediction grid: validation images 0..8


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


@dataclass
class RunResult:
    run_dir: Path
    model: torch.nn.Module
    history: History
    summary: dict


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


def train_run(
    config: TrainConfig,
    out: str | os.PathLike | None = None,
    *,
    force: bool = False,
    dataset: Dataset | None = None,
    on_batch: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> RunResult:
    """Train ``config`` end to end and write its run directory; returns the trained model too."""
    config.validate()
    if config.data_dir is not None:  # absolute, so the run can be evaluated from anywhere
        config = replace(config, data_dir=str(Path(config.data_dir).resolve()))
    device = resolve_device(config.device)
    phases = Phases()
    with phases("data"):
        ds = dataset if dataset is not None else load_dataset(config.data_dir)
    run_dir = prepare_run_dir(out if out is not None else default_run_dir(config.model), force)
    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=ds.num_classes)
    write_json_atomic(run_dir / CONFIG, {**config.to_dict(), "resolved_device": str(device)})
    first, label = ds.images[0], int(ds.labels[0])  # both splits start with the dataset's first row
    with phases("pictures"):
        plots.save(plots.plot_example(first, label, f"First training example: label {label}"),
                   run_dir / "example.png")
    average = WeightAverage(model, config.ema) if config.ema > 0 else None
    return _train(config, run_dir, ds, model, make_optimizer(model, config), History(), on_batch, on_epoch, average,
                  phases)


def resume_run(
    run_dir: str | os.PathLike,
    *,
    dataset: Dataset | None = None,
    on_batch: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> RunResult:
    """Continue an interrupted run from its last complete epoch, exactly as if never stopped."""
    config = read_config(run_dir)
    run_dir = Path(run_dir)
    if (run_dir / SUMMARY).exists():
        raise UsageError(f"--resume {run_dir}: the run already finished ({SUMMARY} exists)")
    phases = Phases()
    with phases("data"):
        ds = dataset if dataset is not None else load_dataset(config.data_dir)
    model = create_model(config.model, num_classes=ds.num_classes)
    opt = make_optimizer(model, config)
    average = WeightAverage(model, config.ema) if config.ema > 0 else None
    with phases("checkpoints"):
        _, epochs = checkpoint.load_state(run_dir, model, opt, average)
    return _train(config, run_dir, ds, model, opt, History(epochs), on_batch, on_epoch, average, phases)


LOSS_PLOT_EVERY = 10.0  # seconds: loss.png is redrawn at most this often while training, and after the last epoch


def _train(config, run_dir, ds, model, opt, history, on_batch, on_epoch, average=None, phases=None) -> RunResult:
    """Train from ``history``'s last epoch to the end, then write weights, summary and pictures.

    ``summary.json``'s ``timings`` gives the wall seconds of this process's phases: data
    (loading and splitting), training and validation (the epochs trained here),
    checkpoints (per-epoch state, metrics, final weights), final_inference (the validation
    probabilities the summary and pictures use: the last epoch's validation keeps them, so this
    is a pass of its own only with TTA or when no epoch was left to train) and pictures.
    """
    phases = phases if phases is not None else Phases()
    device = resolve_device(config.device)
    with phases("data"):
        x_train, y_train, x_valid, y_valid = load_split(config, ds)
    last_plot = [time.monotonic()]
    first_epoch = len(history.epochs)

    def epoch_done(record: dict) -> None:
        history.epochs.append(record)
        with phases("checkpoints"):
            checkpoint.save_state(run_dir, model, opt, record["epoch"], history.epochs, average)
            write_metrics(run_dir, history)
        if record["epoch"] == config.epochs or time.monotonic() - last_plot[0] >= LOSS_PLOT_EVERY:
            with phases("pictures"):
                plots.save(plots.plot_history(history.epochs, f"{config.model}: {run_dir.name}"),
                           run_dir / "loss.png")
            last_plot[0] = time.monotonic()
        if on_epoch is not None:
            on_epoch(record)

    fitted = fit(model, x_train, y_train, x_valid, y_valid, config, on_batch=on_batch, on_epoch=epoch_done,
                 optimizer=opt, start_epoch=first_epoch, average=average)
    train_seconds = sum(r["seconds"] for r in history.epochs)  # the epochs, validation included
    model.cpu()
    with phases("checkpoints"):
        checkpoint.save_model(model, run_dir, config.model, {"num_classes": ds.num_classes})
    with phases("final_inference"):  # once, for the summary and the pictures
        proba = fitted.valid_proba  # the last epoch's validation computed them, unless nothing was left to train
        if proba is None or config.tta:
            proba = predict_proba(model, x_valid, tta=config.tta)
    summary = make_summary(model, config, history, len(x_train), y_valid, proba, train_seconds, device)
    with phases("pictures"):
        write_pictures(run_dir, model, x_valid, y_valid, ds.num_classes, proba=proba)
    here = history.epochs[first_epoch:]  # the epochs trained by this process
    training = sum(r["train_seconds"] for r in here)
    epochs = {"training": training, "validation": sum(r["seconds"] for r in here) - training}
    summary["timings"] = {k: epochs[k] if k in epochs else phases.seconds.get(k, 0.0) for k in TIMINGS}
    write_json_atomic(run_dir / SUMMARY, summary)
    return RunResult(run_dir, model, history, summary)


def make_summary(model, config, history, n_train, y_valid, proba, train_seconds, device) -> dict:
    """The run's final figures; ``proba``: the model's class probabilities on the validation part.

    With ``config.tta`` (``proba`` then test-time-augmented) the validation loss and accuracy
    come from ``proba``; the last epoch's single-view figures stay beside them.
    """
    rows, cols = GRID
    n = min(rows * cols, len(y_valid))
    last = history.epochs[-1]
    scores = {"valid_loss": last["valid_loss"], "valid_acc": last["valid_acc"]}
    if config.tta:
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
        "num_parameters": count_parameters(model),
        "device": str(device),
        "torch": torch.__version__,
    }


def write_pictures(run_dir: Path, model, x_valid, y_valid, num_classes: int, proba=None) -> dict:
    """predictions.png, confusion.png and mistakes.png for the validation part; returns the analysis.

    ``proba``: the model's class probabilities on ``x_valid`` if already computed.
    """
    if proba is None:
        proba = predict_proba(model, x_valid)
    preds = proba.argmax(axis=1)
    y_valid = np.asarray(y_valid)
    rows, cols = GRID
    plots.save(plots.plot_grid(x_valid, y_valid, rows, cols, preds, probabilities=proba.max(axis=1),
                               title="Validation images 0-8: predicted / true"), run_dir / "predictions.png")
    matrix = metrics.confusion_matrix(preds, y_valid, num_classes)
    plots.save(plots.plot_confusion(matrix), run_dir / "confusion.png")
    worst = metrics.worst_mistakes(proba, y_valid, top=16)
    if len(worst):
        fig = plots.plot_grid(x_valid[worst], y_valid[worst], 4, 4, preds[worst],
                              probabilities=proba[worst, preds[worst]], title="Most confident mistakes (validation)")
    else:
        fig = plots.plot_grid(x_valid[:0], y_valid[:0], 1, 1, preds[:0], title="No mistakes on the validation part")
    plots.save(fig, run_dir / "mistakes.png")
    return {"confusion": matrix, "predictions": preds, "probabilities": proba}


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


def load_run_model(run_dir: str | os.PathLike):
    """``(model, config)`` of a finished run, the model in eval mode on the CPU."""
    config = read_config(run_dir)
    model, _ = checkpoint.load_model(run_dir)
    return model, config


def evaluate_run(run_dir: str | os.PathLike, dataset: Dataset | None = None, tta: bool | None = None) -> dict:
    """Loss and accuracy of a run's model on the validation part of its split.

    ``tta``: score with test-time augmentation (see :data:`mnistlab.evaluate.TTA_SHIFTS`);
    ``None`` does what the run's config says.
    """
    model, config = load_run_model(run_dir)
    tta = config.tta if tta is None else tta
    ds = dataset if dataset is not None else load_dataset(config.data_dir)
    _, _, x_valid, y_valid = load_split(config, ds)
    proba = predict_proba(model, x_valid, tta=tta)
    batch_size = 2 * config.batch_size
    result = score(proba, y_valid, batch_size) if tta else evaluate(model, x_valid, y_valid, batch_size=batch_size)
    matrix = metrics.confusion_matrix(proba.argmax(axis=1), y_valid, ds.num_classes)
    return {"valid_loss": result["loss"], "valid_acc": result["acc"], "n_valid": len(x_valid), "tta": tta,
            "per_class": metrics.per_class(matrix), "most_confused": metrics.most_confused(matrix),
            "confusion": matrix.tolist()}
