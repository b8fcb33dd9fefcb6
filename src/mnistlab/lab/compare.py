"""Several finished runs side by side: their final figures and their per-epoch curves. No PyTorch."""

from __future__ import annotations

import os
from pathlib import Path

from ..run.rundir import read_history, read_summary


def compare_runs(run_dirs: list[str | os.PathLike]) -> tuple[list[dict], dict[str, list[dict]]]:
    """``(rows, histories)``: one row of final figures per run (``run``, ``model``, ``epochs``,
    ``valid_acc``, ``valid_loss``, ``train_seconds``), and each run's per-epoch records by the same
    name (the folder's name, or its path where two runs share one)."""
    rows, histories = [], {}
    for run in run_dirs:
        s = read_summary(run)
        name = Path(run).name
        if name in histories:
            name = str(run)
        histories[name] = read_history(run).epochs
        rows.append({"run": name, "model": s["model"], "epochs": s["epochs"], "valid_acc": s["valid_acc"],
                     "valid_loss": s["valid_loss"], "train_seconds": s["train_seconds"]})
    return rows, histories
