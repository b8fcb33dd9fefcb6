"""The epoch loop every training goes through, and :func:`fit`, the seed's loop on a model you built.

Per epoch: the engine trains one pass, the loss is checked (NaN or infinite: diverged), the
engine validates, the outputs are checked (the same for every image: collapsed), then the record
goes to ``history`` and ``on_epoch``. A diverged or collapsed epoch raises before ``on_epoch``,
so a run directory keeps the last good epoch's checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from ..config import History, TrainConfig
from ..errors import TrainingDiverged, UsageError
from .device import resolve_device
from .engine import Engine

COLLAPSED = 1e-6  # largest range of any output over the validation images below which they count as constant


def check_loss(train_loss: float, epoch: int, config: TrainConfig) -> None:
    """Raise :class:`TrainingDiverged` where an epoch's mean training loss is NaN or infinite."""
    if not math.isfinite(train_loss):
        raise TrainingDiverged(f"training diverged: the loss became {train_loss} in epoch {epoch}; "
                               f"try a lower learning rate than {config.lr} (--lr)")


def check_outputs(valid: dict, train_loss: float, epoch: int, config: TrainConfig) -> None:
    """Raise :class:`TrainingDiverged` where the network gives every validation image the same outputs."""
    if valid.get("spread", math.nan) < COLLAPSED:
        raise TrainingDiverged(f"training collapsed: after epoch {epoch} the network gives every image the same "
                               f"outputs (train loss {train_loss:.4f}, valid accuracy "
                               f"{100 * valid['acc']:.2f}%); try a lower learning rate than {config.lr} (--lr)")


def epoch_record(epoch: int, train_loss: float, valid: dict, seconds: float, train_seconds: float) -> dict:
    """One epoch's line of metrics.csv / metrics.jsonl (``train_seconds``: the training steps alone)."""
    return {"epoch": epoch, "train_loss": float(train_loss), "valid_loss": valid["loss"], "valid_acc": valid["acc"],
            "seconds": seconds, "train_seconds": train_seconds}


def train_epochs(engine: Engine, config: TrainConfig, x_train, y_train, x_valid, y_valid, history: History,
                 on_batch: Callable[[int, int, float], None] | None = None,
                 on_epoch: Callable[[dict], None] | None = None) -> np.ndarray | None:
    """Train from ``history``'s last epoch to ``config.epochs``, appending a record per epoch; returns
    the last epoch's validation probabilities (None if no epoch was left), the engine then holding
    its final weights."""
    if len(x_train) == 0 or len(x_valid) == 0:
        raise UsageError("training and validation parts must both hold at least one image")
    if config.drop_last and len(x_train) < config.batch_size:
        raise UsageError(f"drop_last leaves no full batch: {len(x_train)} training images, batch size "
                         f"{config.batch_size}")
    engine.set_data(x_train, y_train, x_valid, y_valid)
    proba = None
    for epoch in range(len(history.epochs) + 1, config.epochs + 1):
        start = time.perf_counter()
        train_loss = engine.train_epoch(epoch, on_batch)
        trained = time.perf_counter() - start
        check_loss(train_loss, epoch, config)
        last = epoch == config.epochs
        valid = engine.validate(keep_proba=last)
        check_outputs(valid, train_loss, epoch, config)
        if last:
            proba = valid["proba"]
        record = epoch_record(epoch, train_loss, valid, time.perf_counter() - start, trained)
        history.epochs.append(record)
        if on_epoch is not None:
            on_epoch(record)
    engine.end_training()
    return proba


def fit(model, x_train, y_train, x_valid, y_valid, config: TrainConfig | None = None, *,
        on_batch: Callable[[int, int, float], None] | None = None,
        on_epoch: Callable[[dict], None] | None = None, **overrides) -> History:
    """Train ``model`` (a ``torch.nn.Module``) with SGD as the seed does; returns the per-epoch :class:`History`.

    The autograd engine trains the model you pass, in place. Shuffling draws from torch's global
    random generator exactly as the seed's DataLoaders do: call ``torch.manual_seed(s)`` before
    building the model for a repeatable run that sees the same batches as the seed's code seeded
    with ``s``. ``x`` may be NumPy or torch, float pixels in [0, 1) or uint8 (divided by 256 per
    batch). ``overrides`` set :class:`TrainConfig` fields, e.g. ``fit(..., epochs=3, lr=0.1)``.
    ``on_batch(batch, n_batches, loss)`` and ``on_epoch(record)`` let a caller show progress.
    With ``config.ema`` the model ends holding the weight average, which was validated.
    """
    from .autograd_engine import AutogradEngine

    if config is None:
        config = TrainConfig.from_dict(overrides)
    elif overrides:
        config = TrainConfig.from_dict({**config.to_dict(), **overrides})
    if config.precision == "bf16":
        raise UsageError("fit trains the model it is handed with autograd, in fp32; --precision bf16 is the kernel "
                         "engine's (train_run with a fastcnn or widecnn config)")
    config = replace(config, precision="fp32")  # what "auto" comes to here
    engine = AutogradEngine(model, config, resolve_device(config.device))
    history = History()
    history.valid_proba = train_epochs(engine, config, x_train, y_train, x_valid, y_valid, history, on_batch,
                                       on_epoch)
    return history
