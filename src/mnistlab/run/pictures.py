"""A run's pictures of its validation part: predictions, confusion matrix, worst mistakes, losses.

The example and loss pictures are drawn while training (:mod:`.driver`); the rest at the end, two
at a time (matplotlib draws on one thread).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import metrics, plots
from .rundir import GRID


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
