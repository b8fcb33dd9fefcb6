"""A run directory: train from a config and leave everything needed to understand and reuse it.

The files and their layout: :mod:`mnistlab.rundir`. FastCNN runs on a CPU with the compiled
kernels train through :mod:`mnistlab.fastrun`, without PyTorch; the rest here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from . import checkpoint, metrics, rundir
from .data import Dataset, load_dataset
from .evaluation import evaluate, predict_proba, score
from .models import count_parameters, create_model
from .optim import WeightAverage
from .rundir import (  # noqa: F401 (re-exported: the run directory's API lives on here too)
    CONFIG,
    GRID,
    METRIC_KEYS,
    METRICS_CSV,
    METRICS_JSONL,
    PICTURES,
    RUN_FILES,
    SUMMARY,
    TIMINGS,
    Phases,
    RunResult,
    check_run_dir,
    default_run_dir,
    load_split,
    prepare_run_dir,
    read_config,
    read_history,
    read_summary,
    write_metrics,
)
from .train import History, TrainConfig, fit, make_optimizer, resolve_device


def train_run(
    config: TrainConfig,
    out: str | os.PathLike | None = None,
    *,
    force: bool = False,
    dataset: Dataset | None = None,
    on_batch: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> RunResult:
    """Train ``config`` end to end and write its run directory; returns the trained model too.

    FastCNN on a CPU with the compiled kernels trains through :mod:`mnistlab.fastrun` (no
    autograd; weights initialised and batches shuffled from NumPy's generator seeded with
    ``config.seed``); everything else through :func:`mnistlab.fit`.
    """
    from . import fastrun

    if fastrun.applies(config):
        done = fastrun.train_run(config, out, force=force, dataset=dataset, on_batch=on_batch, on_epoch=on_epoch)
        return replace(done, model=checkpoint.load_model(done.run_dir)[0])
    device = resolve_device(config.device)
    phases = Phases()
    config, ds, run_dir = rundir.start(config, out, force, dataset, phases, str(device))
    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=ds.num_classes)
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
    from . import fastrun

    if fastrun.trained_here(run_dir):
        done = fastrun.resume_run(run_dir, dataset=dataset, on_batch=on_batch, on_epoch=on_epoch)
        return replace(done, model=checkpoint.load_model(done.run_dir)[0])
    phases = Phases()
    config, run_dir, ds = rundir.resume_start(run_dir, dataset, phases)
    model = create_model(config.model, num_classes=ds.num_classes)
    opt = make_optimizer(model, config)
    average = WeightAverage(model, config.ema) if config.ema > 0 else None
    with phases("checkpoints"):
        _, epochs = checkpoint.load_state(run_dir, model, opt, average)
    return _train(config, run_dir, ds, model, opt, History(epochs), on_batch, on_epoch, average, phases)


def _train(config, run_dir, ds, model, opt, history, on_batch, on_epoch, average=None, phases=None) -> RunResult:
    """Train from ``history``'s last epoch to the end, then write weights, summary and pictures
    (``summary.json``'s timings: :func:`mnistlab.rundir.finish`)."""
    phases = phases if phases is not None else Phases()
    device = resolve_device(config.device)
    with phases("data"):
        x_train, y_train, x_valid, y_valid = load_split(config, ds)
    first_epoch = len(history.epochs)

    def save_state(epoch: int) -> None:
        checkpoint.save_state(run_dir, model, opt, epoch, history.epochs, average)

    epoch_done = rundir.epoch_recorder(run_dir, config, history, phases, save_state, on_epoch)
    fitted = fit(model, x_train, y_train, x_valid, y_valid, config, on_batch=on_batch, on_epoch=epoch_done,
                 optimizer=opt, start_epoch=first_epoch, average=average)
    model.cpu()
    with phases("checkpoints"):
        checkpoint.save_model(model, run_dir, config.model, {"num_classes": ds.num_classes})
    with phases("final_inference"):  # once, for the summary and the pictures
        proba = fitted.valid_proba  # the last epoch's validation computed them, unless nothing was left to train
        if proba is None or config.tta:
            proba = predict_proba(model, x_valid, tta=config.tta)
    summary = rundir.finish(run_dir, config, history, first_epoch, phases, proba, x_valid, y_valid,
                            ds.num_classes, n_train=len(x_train), device=str(device),
                            num_parameters=count_parameters(model), extra={"engine": "pytorch"})
    return RunResult(run_dir, model, history, summary)


def write_pictures(run_dir: Path, model, x_valid, y_valid, num_classes: int, proba=None) -> dict:
    """predictions.png, confusion.png and mistakes.png for the validation part; returns the analysis.

    ``proba``: the model's class probabilities on ``x_valid`` if already computed.
    """
    if proba is None:
        proba = predict_proba(model, x_valid)
    return rundir.write_pictures(run_dir, proba, x_valid, y_valid, num_classes)


def load_run_model(run_dir: str | os.PathLike):
    """``(model, config)`` of a finished run, the model in eval mode on the CPU."""
    config = read_config(run_dir)
    model, _ = checkpoint.load_model(run_dir)
    return model, config


def evaluate_run(run_dir: str | os.PathLike, dataset: Dataset | None = None, tta: bool | None = None) -> dict:
    """Loss and accuracy of a run's model on the validation part of its split.

    ``tta``: score with test-time augmentation (see :data:`mnistlab.evaluation.TTA_SHIFTS`);
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
