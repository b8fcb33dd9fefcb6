"""The engine interface, its two implementations, and the one rule that chooses between them.

An engine owns a model's parameters, its optimizer state and its random generators; the epoch
loop (:mod:`.loop`) and the run driver (:mod:`mnistlab.run.driver`) own everything else: timing,
hooks, the divergence check, checkpoints, the summary.

- ``fastpath`` (:mod:`.kernel_engine`): the FastCNN models (``fastcnn``, ``widecnn``) on the CPU,
  in the compiled kernels and NumPy, without autograd (and, without augmentation, without
  importing PyTorch). Weights initialised (PyTorch's default distributions) and batches
  shuffled from NumPy's generator seeded with the run's seed.
- ``pytorch`` (:mod:`.torch_engine`): everything else, and every model :func:`mnistlab.fit` is
  handed. Weights and shuffling from ``torch.manual_seed(seed)``, as the seed's code draws them.

The rule (:func:`choose_engine`): ``fastpath`` for a FastCNN model on the CPU where the compiled
kernels are available, ``pytorch`` otherwise. ``summary.json`` records the engine; a resumed run
continues on the engine that started it.

The device, decided once per run (:func:`resolve_device`): ``cpu``; ``cuda`` (a one-line error
where PyTorch sees no GPU); ``auto``: the GPU where the operating system shows one (an NVIDIA or
AMD GPU driver's device files) and PyTorch can use it, else the CPU. A machine with no GPU device
files answers ``cpu`` without importing PyTorch, so kernel-engine runs start in a fraction of a second.
"""

from __future__ import annotations

import glob
import os
from typing import Protocol

import numpy as np

from ..config import DEVICES, FASTCNN_WIDTHS, TrainConfig
from ..errors import RunError, UsageError

# What a GPU driver leaves on Linux: NVIDIA's, AMD's (ROCm, which PyTorch also calls cuda), WSL's.
GPU_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def gpu_visible() -> bool:
    """Whether this machine shows a GPU driver's device files (no PyTorch imported)."""
    return any(os.path.exists(p) for p in GPU_FILES) or bool(glob.glob("/dev/nvidia[0-9]*"))


def resolve_device(name: str = "auto") -> str:
    """``"cpu"`` or ``"cuda"`` for a configured device name (see the module's rule)."""
    if name not in DEVICES:
        raise UsageError(f"unknown device {name!r}; expected one of: {', '.join(DEVICES)}")
    if name == "cpu" or (name == "auto" and not gpu_visible()):
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if name == "cuda":
        raise UsageError("device 'cuda' requested but CUDA is not available here; use --device cpu or auto")
    return "cpu"


KERNELS = "fastpath"
PYTORCH = "pytorch"
ENGINES = (KERNELS, PYTORCH)


class Engine(Protocol):
    name: str  # one of ENGINES, recorded in summary.json and the checkpoint
    device: str  # "cpu" or "cuda"
    num_parameters: int

    def set_data(self, x_train, y_train, x_valid, y_valid) -> None:
        """The images (uint8 (N, 784)) and int64 labels the next epochs train and validate on."""

    def train_epoch(self, epoch: int, on_batch=None) -> float:
        """One pass over the training images (``epoch`` counts from 1); the mean batch loss."""

    def validate(self, keep_proba: bool) -> dict:
        """``loss`` (as the seed averages it), ``acc``, ``spread`` (0: every image gets the same
        outputs) on the validation images; ``proba`` (N, C) too with ``keep_proba``."""

    def end_training(self) -> None:
        """After the last epoch: the model takes its final weights (the weight average, if any)."""

    def predict_proba(self, x, tta: bool = False) -> np.ndarray:
        """Class probabilities (N, C) of the final model on images ``x``."""

    def weights(self) -> dict[str, np.ndarray]:
        """The final model's ``state_dict`` as arrays: what ``model.safetensors`` holds."""

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """What a checkpoint needs to continue exactly: arrays by name, and JSON-able settings."""

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Continue from what :meth:`state` returned."""

    def torch_model(self):
        """The trained ``torch.nn.Module``, or None where the engine has none (load it from the run)."""


def choose_engine(config: TrainConfig, device: str) -> str:
    """The rule: ``fastpath`` for a FastCNN model on the CPU with the compiled kernels, else ``pytorch``."""
    from ..kernels.build import available

    return KERNELS if config.model in FASTCNN_WIDTHS and device == "cpu" and available() else PYTORCH


def check_processes(config: TrainConfig, device: str, name: str | None = None) -> None:
    """Refuse, in one line, a multi-process setting the engine (``name``, default by the rule) cannot train."""
    if config.nproc > 1 and (name or choose_engine(config, device)) == KERNELS:
        raise UsageError(f"the {KERNELS} engine ({', '.join(FASTCNN_WIDTHS)} on the CPU) trains in one process; "
                         f"leave out --nproc, or train them on PyTorch's layers (MNISTLAB_NATIVE=0, or CUDA)")
    if config.sync_bn and device != "cuda":
        raise UsageError("--sync-bn synchronises BatchNorm across GPUs; on the CPU each process keeps its own "
                         "statistics (leave out --sync-bn)")


def create_engine(config: TrainConfig, num_classes: int, device: str, name: str | None = None) -> Engine:
    """A fresh engine for ``config`` (``name``: the one a checkpoint names; default :func:`choose_engine`)."""
    name = name or choose_engine(config, device)
    check_processes(config, device, name)
    if name == KERNELS:
        from ..kernels.build import available, why_unavailable

        if config.model not in FASTCNN_WIDTHS or device != "cpu" or not available():
            raise RunError(f"the {KERNELS} engine trains {', '.join(FASTCNN_WIDTHS)} on the CPU with the compiled "
                           f"kernels; here: model {config.model}, device {device}, kernels "
                           f"{'available' if available() else 'unavailable: ' + str(why_unavailable())}")
        from .kernel_engine import KernelEngine

        return KernelEngine(config, num_classes)
    if name != PYTORCH:
        raise RunError(f"unknown engine {name!r}; this version has {', '.join(ENGINES)}")
    from .torch_engine import TorchEngine

    return TorchEngine.create(config, num_classes, device)
