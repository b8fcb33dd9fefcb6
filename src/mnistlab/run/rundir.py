"""A run directory's files: names, creating the directory, writing and reading them. No PyTorch here.

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
from datetime import datetime
from pathlib import Path

import numpy as np

from ..config import History, TrainConfig
from ..data.mnist import Dataset, load_dataset, split
from ..errors import RunError, UsageError
from ..files import write_text_atomic
from .checkpoint import META, STAGED, STATE, WEIGHTS

CONFIG = "config.json"
SUMMARY = "summary.json"
METRICS_CSV = "metrics.csv"
METRICS_JSONL = "metrics.jsonl"
PICTURES = ("example.png", "loss.png", "predictions.png", "confusion.png", "mistakes.png")
RUN_FILES = (CONFIG, SUMMARY, METRICS_CSV, METRICS_JSONL, WEIGHTS, META, STATE, STAGED,
             "report.html", *PICTURES)
METRIC_KEYS = ("epoch", "train_loss", "valid_loss", "valid_acc", "seconds")
GRID = (3, 3)  # the seed's prediction grid: validation images 0..8


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
    """The run's ``x_train, y_train, x_valid, y_valid`` as uint8 images and int64 labels. With
    ``config.subsample`` below 1, the training part is that fraction of it, drawn without
    replacement from a generator seeded with the run's seed (so each seed trains on its own
    subset), in the original order."""
    ds = dataset if dataset is not None else load_dataset(config.data_dir)
    x_train, y_train, x_valid, y_valid = split(ds.images, ds.labels, config.split, n_train=ds.n_train)
    if config.subsample < 1:
        n = len(x_train)
        keep = np.sort(np.random.default_rng([config.seed, 2]).choice(n, max(1, round(config.subsample * n)),
                                                                       replace=False))
        x_train, y_train = x_train[keep], y_train[keep]
    return x_train, y_train, x_valid, y_valid


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


def read_json(path: str | os.PathLike) -> dict:
    """A JSON file a run or a batch of runs wrote; one-line errors naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: not found") from None
    except (OSError, ValueError) as exc:
        raise RunError(f"{path}: unreadable ({exc})") from None


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
