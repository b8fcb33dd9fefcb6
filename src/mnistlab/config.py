"""How to train: :class:`TrainConfig`, the named presets, and the per-epoch :class:`History`.

No PyTorch here: the command line reads, checks and records a run's settings, and the kernel
engine trains (:mod:`mnistlab.train.kernel_engine`), without importing it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from .data.mnist import SPLITS
from .errors import UsageError

# The built-in models of mnistlab.models, named here so that the command line and a config's check
# need no PyTorch (tests/test_engines.py holds them to the registry).
MODEL_NAMES = ("linear", "cnn", "fastcnn", "widecnn", "bncnn", "poolcnn", "deskewcnn", "normcnn")
# The FastCNN models (mnistlab.models) and their channels per conv layer; the compiled kernels train these.
FASTCNN_WIDTHS = {"fastcnn": (16, 32, 64), "widecnn": (32, 64, 128)}

# Augmentations by name: the ranges of their random maps per image (mnistlab.train.augment.Augment):
# shift in pixels, rotate in degrees, scale relative; elastic: pixels of displacement at each of
# control x control points. None: no augmentation.
AUGMENTS = {
    "none": None,
    "affine": {"shift": 2.0, "rotate": 10.0, "scale": 0.1},
    "elastic": {"shift": 2.0, "rotate": 10.0, "scale": 0.1, "elastic": 1.5, "control": 4},
}
AUGMENT_NAMES = tuple(AUGMENTS)
SCHEDULES = ("constant", "onecycle")  # mnistlab.train.schedule.learning_rate
# the kernel engine's convolutions (mnistlab.kernels.calls.bf16_available); "auto": bf16 where the kernel
# engine trains and the CPU has the instructions, else fp32 (mnistlab.train.choose.resolve_precision)
PRECISIONS = ("fp32", "bf16", "auto")
DEVICES = ("auto", "cpu", "cuda")  # mnistlab.train.device.resolve_device
RECORDED = ("resolved_device",)  # written into a run's config.json beside its settings; not settings

# Per-model SGD settings where the seed leaves them open (the PyTorch tutorial's values).
RECIPES = {
    "linear": {"lr": 0.5, "momentum": 0.0},
    "cnn": {"lr": 0.1, "momentum": 0.9},
}

# Named recipes: values for TrainConfig fields; anything given explicitly overrides them.
PRESETS = {
    # The seed's CNN exactly as its walk-through trains it.
    "seed": {"model": "cnn", "epochs": 15, "batch_size": 64, "lr": 0.1, "momentum": 0.9},
    # Time to 99%: a small BatchNorm CNN, two epochs, one-cycle Nesterov SGD, label smoothing.
    # Chosen on the seed split (benchmarks/bench_choices.py measures the alternatives). Both this and
    # best keep their accuracy with bf16 convolutions (docs/performance.md): "auto" takes them where it can.
    "fast": {"model": "fastcnn", "epochs": 2, "batch_size": 256, "lr": 0.4, "momentum": 0.9, "nesterov": True,
             "weight_decay": 5e-4, "schedule": "onecycle", "label_smoothing": 0.1, "precision": "auto"},
    # Accuracy on the standard test set: the wide FastCNN (compiled kernels), affine augmentation, 65
    # one-cycle epochs (about 13 minutes on 2 cores), scored with test-time augmentation (chosen on the holdout split).
    "best": {"model": "widecnn", "epochs": 65, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "nesterov": True,
             "weight_decay": 5e-4, "schedule": "onecycle", "label_smoothing": 0.1, "augment": "affine",
             "split": "standard", "tta": True, "precision": "auto"},
}


@dataclass
class TrainConfig:
    """How to train: every value a run needs to be repeated. Units in the comments."""

    model: str = "cnn"  # registry name, see mnistlab.list_models()
    epochs: int = 15  # passes over the training part
    batch_size: int = 64  # images per SGD step; validation uses twice this
    lr: float | None = None  # SGD learning rate; None: the model's recipe (linear 0.5, cnn 0.1)
    momentum: float | None = None  # SGD momentum; None: the model's recipe (linear 0, cnn 0.9)
    seed: int = 0  # torch.manual_seed before the model is built: weights' initialisation and shuffling
    split: str = "seed"  # "seed": 50,000 / 20,000; "standard": 60,000 / 10,000 (test); "holdout": 50,000 / 10,000
    data_dir: str | None = None  # a folder of four MNIST-format IDX files (made absolute); None: the shipped MNIST
    device: str = "auto"  # "auto" (cuda if available), "cpu" or "cuda"
    deterministic: bool = True  # on CUDA: repeatable arithmetic (a seed's weights bit-identical, resumes exact)
    nesterov: bool = False  # Nesterov momentum
    weight_decay: float = 0.0  # L2 penalty added to the gradients (as torch.optim.SGD's weight_decay)
    schedule: str = "constant"  # learning rate per step: "constant" (the seed) or "onecycle"
    warmup: float = 0.25  # onecycle: fraction of the steps spent rising to lr
    label_smoothing: float = 0.0  # cross-entropy label smoothing, in [0, 1)
    augment: str = "none"  # "none"; "affine": random shifts, rotations, scaling; "elastic": also warps (augment.py)
    ema: float = 0.0  # decay per step of an exponential moving average of the weights, validated and saved; 0: off
    tta: bool = False  # final score (summary.json): probabilities averaged over the image and its 8 1-px shifts
    precision: str = "fp32"  # "bf16": the kernel engine's convolutions from bf16 operands, summed in fp32; "auto"
    drop_last: bool = False  # every step a full batch: each epoch's last partial batch (of a new order) left out
    subsample: float = 1.0  # fraction of the training part this run trains on, drawn with its seed; 1: all of it
    nproc: int = 1  # processes training this run together (data-parallel, torchrun); the PyTorch engine
    sync_bn: bool = False  # with nproc > 1: BatchNorm statistics of the whole global batch (CUDA)
    preset: str | None = None  # the preset these values came from, for the record

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> TrainConfig:
        """A JSON config file (a search's ``best.json``, a run's ``config.json``), then ``overrides``
        (``None`` values are ignored); one-line errors naming the file."""
        try:
            values = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UsageError(f"{path}: file not found") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: not a JSON config ({exc})") from None
        if not isinstance(values, dict):
            raise UsageError(f"{path}: expected a JSON object of training settings")
        try:
            return cls.from_dict({**values, **{k: v for k, v in overrides.items() if v is not None}})
        except UsageError as exc:
            raise UsageError(f"{path}: {exc}") from None

    @classmethod
    def from_preset(cls, name: str | None, **overrides) -> TrainConfig:
        """The preset's values (see ``PRESETS``), then ``overrides`` (``None`` values are ignored)."""
        if name is not None and name not in PRESETS:
            raise UsageError(f"unknown preset {name!r}; expected one of: {', '.join(PRESETS)}")
        _refuse_unknown(overrides)
        values = dict(PRESETS[name]) if name is not None else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values, preset=name)

    def __post_init__(self):
        recipe = RECIPES.get(self.model, {"lr": 0.1, "momentum": 0.0})
        if self.lr is None:
            self.lr = recipe["lr"]
        if self.momentum is None:
            self.momentum = recipe["momentum"]
        if self.data_dir is not None:  # absolute, so the run can be evaluated from anywhere
            if not isinstance(self.data_dir, (str, os.PathLike)):
                raise UsageError(f"data_dir must be a folder's path, got {self.data_dir!r}")
            self.data_dir = str(Path(self.data_dir).resolve())
        self.validate()

    def validate(self) -> None:
        check_device(self.device)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise UsageError(f"seed must be a whole number in [0, 2**63), got {self.seed!r}")
        for name in ("epochs", "batch_size", "nproc"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise UsageError(f"momentum must be a number in [0, 1), got {self.momentum!r}")
        if self.split not in SPLITS:
            raise UsageError(f"unknown split {self.split!r}; expected one of: {', '.join(SPLITS)}")
        if self.augment not in AUGMENT_NAMES:
            raise UsageError(f"unknown augment {self.augment!r}; expected one of: {', '.join(AUGMENT_NAMES)}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}; expected one of: {', '.join(PRECISIONS)}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}; expected one of: {', '.join(SCHEDULES)}")
        for name, high in (("weight_decay", math.inf), ("label_smoothing", 1.0), ("warmup", 1.0), ("ema", 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < high:
                bound = "a number >= 0" if high == math.inf else f"a number in [0, {high:g})"
                raise UsageError(f"{name} must be {bound}, got {value!r}")
        if isinstance(self.subsample, bool) or not isinstance(self.subsample, (int, float)) \
                or not 0 < self.subsample <= 1:
            raise UsageError(f"subsample must be a fraction in (0, 1], got {self.subsample!r}")
        for name in ("tta", "sync_bn", "deterministic", "drop_last"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.nesterov and self.momentum == 0:
            raise UsageError("nesterov needs a momentum above 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The config these values make; an unknown setting is refused (``RECORDED`` keys are skipped)."""
        _refuse_unknown(d)
        return cls(**{k: v for k, v in d.items() if k not in RECORDED})


def _refuse_unknown(values: dict) -> None:
    """A one-line error for a key that is no TrainConfig setting (``RECORDED`` keys pass)."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known - set(RECORDED))
    if unknown:
        raise UsageError(f"unknown setting {unknown[0]!r}; expected some of: {', '.join(sorted(known))}")


def check_device(name) -> None:
    if name not in DEVICES:
        raise UsageError(f"unknown device {name!r}; expected one of: {', '.join(DEVICES)}")


@dataclass
class History:
    """Per-epoch metrics: one dict per epoch with epoch, train_loss, valid_loss, valid_acc, seconds."""

    epochs: list[dict] = field(default_factory=list)
    # The class probabilities on the validation images after the last epoch trained, (N, C).
    valid_proba: np.ndarray | None = field(default=None, repr=False, compare=False)

    def column(self, key: str) -> list:
        return [e[key] for e in self.epochs]

    @property
    def train_loss(self) -> list[float]:
        return self.column("train_loss")

    @property
    def valid_loss(self) -> list[float]:
        return self.column("valid_loss")

    @property
    def valid_acc(self) -> list[float]:
        return self.column("valid_acc")
