"""The end of a run: its pictures of the validation part (predictions, confusion matrix, worst
mistakes, losses; two drawn at a time, since matplotlib draws on one thread) and ``summary.json``
(its figures, where its time went, and what trained it)."""

from __future__ import annotations

import importlib.metadata
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .. import metrics, plots
from ..config import History, TrainConfig
from ..files import write_json_atomic
from .rundir import GRID, SUMMARY

TIMINGS = ("data", "training", "validation", "checkpoints", "final_inference", "pictures")  # summary.json


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
        tta = metrics.score(proba, y_valid, batch_size=2 * config.batch_size)
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


def _grid(values: np.ndarray, cols: int) -> list[list[int]]:
    values = [int(v) for v in values]
    return [values[i : i + cols] for i in range(0, len(values), cols)]


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
