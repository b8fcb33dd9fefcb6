"""The engine interface: what the epoch loop (:mod:`.loop`) and the run driver
(:mod:`mnistlab.run.driver`) ask of an engine, and the engines' names.

An engine owns a model's parameters, its optimizer state and its random generators; the loop and
the driver own everything else: timing, hooks, the divergence check, checkpoints, the summary.
Two implementations, chosen by one rule (:func:`mnistlab.train.choose.choose_engine`):

- ``kernels`` (:mod:`.kernel_engine`): the FastCNN models (``fastcnn``, ``widecnn``) on the CPU,
  computed by the compiled kernels and updated in NumPy, without autograd (and, without
  augmentation, without importing PyTorch). Weights initialised (PyTorch's default
  distributions) and batches shuffled from NumPy's generator seeded with the run's seed.
- ``autograd`` (:mod:`.autograd_engine`): everything else, and every model :func:`mnistlab.fit`
  is handed: PyTorch's autograd over its layers, or over the compiled kernels where they compute
  the network (the seed's CNN, FastCNN on the CPU). Weights and shuffling from
  ``torch.manual_seed(seed)``, as the seed's code draws them.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

KERNELS = "kernels"
AUTOGRAD = "autograd"
ENGINES = (KERNELS, AUTOGRAD)  # one run each; BATCHED trains several (mnistlab.run.batch)
BATCHED = "batched"
# Names older versions recorded in summary.json and checkpoints, for resuming their runs.
FORMER_NAMES = {"fastpath": KERNELS, "pytorch": AUTOGRAD}


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
        outputs) on the validation images; ``proba`` (N, C) too with ``keep_proba``, else not."""

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


def prefixed(arrays: dict, prefix: str) -> dict:
    """The entries of a checkpoint's arrays whose names start with ``prefix + '.'``, without it."""
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in arrays.items() if k.startswith(prefix + ".")}
