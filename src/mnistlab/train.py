"""The seed's training loop, with its gaps filled the way its text says.

Each epoch: reshuffle, ``model.train()``, then per batch forward, cross-entropy,
backward, ``opt.step()``, ``opt.zero_grad()``; then ``model.eval()`` and the validation
loss averaged over validation batches (batch size twice the training one, as in the
PyTorch tutorial the seed follows). Batches are sliced from tensors held in memory:
no per-sample Python work, no DataLoader. The shuffled order is nevertheless the one the
seed's ``DataLoader(train_ds, batch_size=64, shuffle=True)`` draws from torch's global
random generator, so a run seeded like the seed's code sees the same batches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .allocator import keep_freed_memory
from .augment import AUGMENTS
from .config import DEVICES, PRESETS, RECIPES, History, TrainConfig, TrainingDiverged  # noqa: F401 (re-exported)
from .errors import UsageError
from .evaluation import as_tensor, evaluate, prepare
from .optim import SGD, WeightAverage, learning_rate


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' requested but CUDA is not available here; use --device cpu or auto")
    if name not in DEVICES:
        raise UsageError(f"unknown device {name!r}; expected one of: {', '.join(DEVICES)}")
    return torch.device(name)


def make_optimizer(model: nn.Module, config: TrainConfig) -> SGD:
    return SGD(model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
               weight_decay=config.weight_decay)


def _draw_seed() -> int:
    return int(torch.empty((), dtype=torch.int64).random_().item())


def dataloader_order(n: int) -> torch.Tensor:
    """The permutation one epoch of ``DataLoader(..., shuffle=True)`` yields, drawn the same way.

    Iterating such a loader draws a base seed for its workers from torch's global
    generator, then its RandomSampler draws a seed for a fresh generator and takes
    ``randperm(n)`` from it.
    """
    _draw_seed()  # the loader iterator's base seed
    return torch.randperm(n, generator=torch.Generator().manual_seed(_draw_seed()))


def train_epoch(
    model: nn.Module,
    opt,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    on_batch: Callable[[int, int, float], None] | None = None,
    config: TrainConfig | None = None,
    epoch: int = 1,
    average: WeightAverage | None = None,
) -> float:
    """One pass over ``x`` in a fresh random order; returns the mean of the batch losses.

    ``config`` brings the schedule and label smoothing; ``epoch`` (1-based) places the
    epoch's steps in the schedule; ``average`` is updated after every step.
    """
    model.train()
    n = len(x)
    order = dataloader_order(n).to(x.device)
    n_batches = math.ceil(n / batch_size)
    total = torch.zeros((), device=x.device)
    smoothing = config.label_smoothing if config is not None else 0.0
    augment = AUGMENTS[config.augment] if config is not None else None
    scheduled = config is not None and config.schedule != "constant"
    forward = native.forward_for(model, x)  # the compiled kernels for the seed's CNN on a CPU
    # FastCNN on a CPU: whole steps without autograd (the kernels, NumPy for the head, loss and SGD)
    stepper = native.fast_trainer(model, opt, smoothing) if x.device.type == "cpu" else None
    for b in range(n_batches):
        if scheduled:
            step, steps = (epoch - 1) * n_batches + b, config.epochs * n_batches
            for group in opt.param_groups:
                group["lr"] = learning_rate(config.schedule, config.lr, step, steps, config.warmup)
        idx = order[b * batch_size : (b + 1) * batch_size]
        xb = prepare(x[idx])
        if augment is not None:
            xb = augment(xb)
        if stepper is not None:
            loss = torch.tensor(stepper.step(xb.numpy(), y[idx].numpy(), opt.param_groups[0]["lr"]))
        else:
            loss = F.cross_entropy(forward(xb), y[idx], label_smoothing=smoothing)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if average is not None:
            average.update(model)
        total += loss.detach()
        if on_batch is not None:
            on_batch(b, n_batches, float(loss.detach()))
    return float(total) / n_batches


def fit(
    model: nn.Module,
    x_train,
    y_train,
    x_valid,
    y_valid,
    config: TrainConfig | None = None,
    *,
    on_batch: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    optimizer=None,
    start_epoch: int = 0,
    average: WeightAverage | None = None,
    **overrides,
) -> History:
    """Train ``model`` with SGD as the seed does and return the per-epoch :class:`History`.

    Shuffling draws from torch's global random generator exactly as the seed's DataLoaders
    do: call ``torch.manual_seed(s)`` before building the model for a repeatable run that
    sees the same batches as the seed's code seeded with ``s``. (``config.seed`` is applied
    by :func:`mnistlab.train_run` and the CLI, which build the model themselves.)

    ``x`` may be NumPy or torch, float pixels in [0, 1) or uint8 (divided by 256 per batch).
    ``overrides`` set :class:`TrainConfig` fields, e.g. ``fit(..., epochs=3, lr=0.1)``.
    ``on_batch(batch, n_batches, loss)`` and ``on_epoch(metrics)`` let a caller show progress.
    ``optimizer`` and ``start_epoch`` continue an interrupted run (see ``mnistlab train --resume``).

    With ``config.ema`` a :class:`~mnistlab.optim.WeightAverage` of the weights (``average``,
    or a fresh one) is validated after each epoch, and ``model`` ends holding the average.
    """
    if config is None:
        config = TrainConfig(**overrides)
    elif overrides:
        config = TrainConfig.from_dict({**config.to_dict(), **overrides})
    device = resolve_device(config.device)
    model.to(device)
    if device.type == "cpu":
        # oneDNN runs these convolutions 1.25-1.33x faster channels-last, and a step's buffers
        # are reused instead of page-faulted in afresh (benchmarks/bench_choices.py). The
        # compiled kernels take FastCNN's weights as they are (contiguous).
        if not (native.fast_supported(model) and native.available()):
            model.to(memory_format=torch.channels_last)
        keep_freed_memory()
    x_train, y_train = as_tensor(x_train, device), as_tensor(y_train, device).long()
    x_valid, y_valid = as_tensor(x_valid, device), as_tensor(y_valid, device).long()
    if len(x_train) == 0 or len(x_valid) == 0:
        raise UsageError("training and validation parts must both hold at least one image")
    opt = optimizer if optimizer is not None else make_optimizer(model, config)
    if average is None and config.ema > 0:
        average = WeightAverage(model, config.ema)
    if average is not None:
        average.model.to(device)
        if device.type == "cpu":
            average.model.to(memory_format=torch.channels_last)
    scored = average.model if average is not None else model
    history = History()
    for epoch in range(start_epoch + 1, config.epochs + 1):
        start = time.perf_counter()
        train_loss = train_epoch(model, opt, x_train, y_train, config.batch_size, on_batch, config, epoch, average)
        if device.type == "cuda":
            torch.cuda.synchronize()
        trained = time.perf_counter() - start
        if not math.isfinite(train_loss):
            raise TrainingDiverged(
                f"training diverged: the loss became {train_loss} in epoch {epoch}; "
                f"try a lower learning rate than {config.lr} (--lr)"
            )
        last = epoch == config.epochs
        valid = evaluate(scored, x_valid, y_valid, batch_size=2 * config.batch_size, keep_proba=last)
        if last:
            history.valid_proba = valid["proba"]
        _draw_seed()  # iterating the seed's valid_dl draws a base seed too
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "valid_loss": valid["loss"],
            "valid_acc": valid["acc"],
            "seconds": time.perf_counter() - start,
            "train_seconds": trained,  # the training steps alone, validation excluded
        }
        history.epochs.append(record)
        if on_epoch is not None:
            on_epoch(record)
    if average is not None:
        model.load_state_dict(average.model.state_dict())
    return history
