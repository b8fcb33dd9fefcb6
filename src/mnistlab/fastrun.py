"""FastCNN runs (``--preset fast``) on the CPU without PyTorch: the compiled kernels and NumPy.

Importing PyTorch takes 1.7 to 2.5 seconds on this project's 2-core machine, a quarter of the
fast preset's whole command. Where the compiled kernels are available, a FastCNN run on the
CPU without augmentation, weight averaging or test-time augmentation trains here instead of
through :func:`mnistlab.fit`, step by step the same recipe (:mod:`mnistlab.fastpath`), and
writes the same run directory: the weights load into ``mnistlab.models.FastCNN`` and every
other command reads the run as usual; ``summary.json`` says ``"engine": "fastpath"``.

The differences: the weights are initialised (with PyTorch's default distributions) and the
batches shuffled from NumPy's generator seeded with ``config.seed``, so a seed gives other
numbers than the same run through PyTorch (``MNISTLAB_NATIVE=0``), equally repeatable;
checkpoint.safetensors holds that generator's state, and ``--resume`` continues such a run here.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from . import fastpath, kernels, rundir
from .allocator import keep_freed_memory
from .config import FASTCNN_WIDTHS, History, TrainConfig, TrainingDiverged
from .data import Dataset
from .errors import RunError
from .files import write_bytes_atomic, write_json_atomic
from .rundir import META, STATE, WEIGHTS, Phases, RunResult
from .schedule import learning_rate

ENGINE = "fastpath"


def _cpu(device: str) -> bool:
    """Whether ``device`` means the CPU, without importing PyTorch: "auto" does where the installed
    PyTorch is a CPU build (its version ends in "+cpu"); with a CUDA build, PyTorch decides."""
    if device == "cpu":
        return True
    if device != "auto":
        return False
    try:
        return importlib.metadata.version("torch").endswith("+cpu")
    except importlib.metadata.PackageNotFoundError:
        return True


def applies(config: TrainConfig) -> bool:
    """Whether ``config`` trains here: a FastCNN (``fastcnn``, ``widecnn``) on the CPU, no
    augmentation, weight averaging or TTA, and the compiled kernels available."""
    return (config.model in FASTCNN_WIDTHS and config.augment == "none" and config.ema == 0 and not config.tta
            and _cpu(config.device) and kernels.available())


def init_state(seed: int, num_classes: int,
               widths: tuple[int, int, int] = FASTCNN_WIDTHS["fastcnn"]) -> dict[str, np.ndarray]:
    """A FastCNN's initial weights with PyTorch's default initialisation (convolutions and the linear
    layer uniform in +-1/sqrt(fan_in), BatchNorm weight 1, bias 0), drawn from NumPy's generator."""
    rng = np.random.default_rng(seed)

    def uniform(shape, fan_in):
        bound = 1 / math.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    state = {}
    c1, c2, c3 = widths
    for (conv, bn), (c_out, c_in, k) in zip(((0, 1), (3, 4), (6, 7)), ((c1, 1, 5), (c2, c1, 3), (c3, c2, 3)),
                                             strict=True):
        state[f"features.{conv}.weight"] = uniform((c_out, c_in, k, k), c_in * k * k)
        state[f"features.{bn}.weight"] = np.ones(c_out, np.float32)
        state[f"features.{bn}.bias"] = np.zeros(c_out, np.float32)
        state[f"features.{bn}.running_mean"] = np.zeros(c_out, np.float32)
        state[f"features.{bn}.running_var"] = np.ones(c_out, np.float32)
        state[f"features.{bn}.num_batches_tracked"] = np.zeros((), np.int64)
    features = kernels.fast_features(widths)
    state["head.weight"] = uniform((num_classes, features), features)
    state["head.bias"] = uniform((num_classes,), features)
    return state


def train_run(config: TrainConfig, out: str | os.PathLike | None = None, *, force: bool = False,
              dataset: Dataset | None = None, on_batch: Callable[[int, int, float], None] | None = None,
              on_epoch: Callable[[dict], None] | None = None) -> RunResult:
    """:func:`mnistlab.train_run` for a config that :func:`applies`; the result's model is None."""
    phases = Phases()
    config, ds, run_dir = rundir.start(config, out, force, dataset, phases, "cpu")
    state = init_state(config.seed, ds.num_classes, FASTCNN_WIDTHS[config.model])
    buffers = [np.zeros_like(state[k]) for k in fastpath.PARAMS] if config.momentum else None
    shuffle = np.random.default_rng([config.seed, 1])  # the batches' order, apart from the weights' draws
    return _train(config, run_dir, ds, state, buffers, shuffle, History(), on_batch, on_epoch, phases)


def trained_here(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir``'s checkpoint was written by this module (so ``--resume`` continues here)."""
    try:
        return _read(Path(run_dir) / STATE, tensors=False)[0].get("engine") == ENGINE
    except RunError:
        return False


def resume_run(run_dir: str | os.PathLike, *, dataset: Dataset | None = None,
               on_batch: Callable[[int, int, float], None] | None = None,
               on_epoch: Callable[[dict], None] | None = None) -> RunResult:
    """Continue an interrupted run of this module from its last complete epoch."""
    phases = Phases()
    config, run_dir, ds = rundir.resume_start(run_dir, dataset, phases)
    if not applies(config):
        raise RunError(f"--resume {run_dir}: this run trained with the compiled kernels, which are not available "
                       f"here ({kernels.why_unavailable()})")
    with phases("checkpoints"):
        state, buffers, shuffle, epochs = load_state(run_dir, config)
    return _train(config, run_dir, ds, state, buffers, shuffle, History(epochs), on_batch, on_epoch, phases)


def _train(config, run_dir, ds, state, buffers, shuffle, history, on_batch, on_epoch, phases) -> RunResult:
    with phases("data"):
        x_train, y_train, x_valid, y_valid = rundir.load_split(config, ds)
    keep_freed_memory()
    first_epoch = len(history.epochs)

    def save_state(epoch: int) -> None:
        write_state(run_dir, state, buffers, shuffle, epoch, history.epochs, config)

    epoch_done = rundir.epoch_recorder(run_dir, config, history, phases, save_state, on_epoch)
    proba = fit(state, buffers, shuffle, config, x_train, y_train, x_valid, y_valid, first_epoch, on_batch,
                epoch_done)
    with phases("checkpoints"):
        write_bytes_atomic(run_dir / WEIGHTS, save(state))
        write_json_atomic(run_dir / META, {"name": config.model, "config": {"num_classes": ds.num_classes}})
    with phases("final_inference"):
        if proba is None:  # nothing was left to train
            proba = fastpath.evaluate(state, x_valid, y_valid, 2 * config.batch_size)["proba"]
    summary = rundir.finish(run_dir, config, history, first_epoch, phases, proba, x_valid, y_valid, ds.num_classes,
                            n_train=len(x_train), device="cpu",
                            num_parameters=sum(state[k].size for k in fastpath.PARAMS), extra={"engine": ENGINE})
    return RunResult(run_dir, None, history, summary)


def fit(state, buffers, shuffle: np.random.Generator, config: TrainConfig, x_train, y_train, x_valid, y_valid,
        start_epoch: int = 0, on_batch=None, on_epoch=None) -> np.ndarray | None:
    """The epochs after ``start_epoch``: each a fresh shuffled order, SGD steps of ``batch_size``
    images (uint8 pixels divided by 256), then the validation loss and accuracy as the seed
    computes them. Calls ``on_epoch(record)`` after each; returns the last epoch's validation
    probabilities (None if no epoch was left)."""
    stepper = fastpath.FastCNNStep(state, buffers, momentum=config.momentum, nesterov=config.nesterov,
                                   weight_decay=config.weight_decay, label_smoothing=config.label_smoothing)
    n, size = len(x_train), config.batch_size
    n_batches = math.ceil(n / size)
    proba = None
    for epoch in range(start_epoch + 1, config.epochs + 1):
        start = time.perf_counter()
        order = shuffle.permutation(n)
        total = 0.0
        for b in range(n_batches):
            lr = learning_rate(config.schedule, config.lr, (epoch - 1) * n_batches + b, config.epochs * n_batches,
                               config.warmup)
            idx = order[b * size : (b + 1) * size]
            xb = x_train[idx].reshape(len(idx), 784).astype(np.float32)
            xb *= np.float32(1 / 256)
            loss = stepper.step(xb, y_train[idx], lr)
            total += loss
            if on_batch is not None:
                on_batch(b, n_batches, loss)
        trained = time.perf_counter() - start
        train_loss = total / n_batches
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"training diverged: the loss became {train_loss} in epoch {epoch}; "
                                   f"try a lower learning rate than {config.lr} (--lr)")
        last = epoch == config.epochs
        valid = fastpath.evaluate(state, x_valid, y_valid, 2 * size)
        if last:
            proba = valid["proba"]
        record = {"epoch": epoch, "train_loss": train_loss, "valid_loss": valid["loss"], "valid_acc": valid["acc"],
                  "seconds": time.perf_counter() - start, "train_seconds": trained}
        if on_epoch is not None:
            on_epoch(record)
    return proba


# checkpoint.safetensors in the layout of mnistlab.checkpoint.save_state (model.*, opt.I.momentum_buffer,
# the optimizer's settings in the metadata), with the shuffling generator's state in place of torch's.

def write_state(run_dir: Path, state, buffers, shuffle: np.random.Generator, epoch: int, epochs: list[dict],
                config: TrainConfig) -> None:
    tensors = {f"model.{k}": np.ascontiguousarray(v) for k, v in state.items()}
    for i, b in enumerate(buffers or []):
        tensors[f"opt.{i}.momentum_buffer"] = b
    group = {"lr": config.lr, "momentum": config.momentum, "dampening": 0, "weight_decay": config.weight_decay,
             "nesterov": config.nesterov, "maximize": False, "params": list(range(len(fastpath.PARAMS)))}
    meta = {"epoch": epoch, "epochs": epochs, "param_groups": [group], "engine": ENGINE,
            "shuffle": shuffle.bit_generator.state}
    write_bytes_atomic(run_dir / STATE, save(tensors, metadata={"state": json.dumps(meta)}))


def _read(path: Path, tensors: bool) -> tuple[dict, dict]:
    """The checkpoint's metadata and, with ``tensors``, its arrays by name."""
    try:
        with safe_open(path, framework="numpy") as f:
            return json.loads(f.metadata()["state"]), {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except FileNotFoundError:
        raise RunError(f"{path.parent}: no {STATE}; no epoch finished, nothing to resume") from None
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{path}: unreadable checkpoint ({exc})") from None


def load_state(run_dir: Path, config: TrainConfig):
    """What :func:`write_state` wrote: ``(state, momentum buffers, shuffling generator, per-epoch metrics)``."""
    path = run_dir / STATE
    meta, tensors = _read(path, tensors=True)
    try:
        state = {k[6:]: np.ascontiguousarray(v) for k, v in tensors.items() if k.startswith("model.")}
        missing = [k for k in fastpath.PARAMS if k not in state]
        if missing:
            raise KeyError(f"no weights {', '.join(missing)}")
        buffers = None
        if config.momentum:
            buffers = [np.ascontiguousarray(tensors[f"opt.{i}.momentum_buffer"]) for i in range(len(fastpath.PARAMS))]
        shuffle = np.random.default_rng()
        shuffle.bit_generator.state = meta["shuffle"]
        return state, buffers, shuffle, list(meta["epochs"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{path}: unreadable checkpoint ({exc})") from None
