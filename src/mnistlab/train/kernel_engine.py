"""The ``kernels`` engine: FastCNN models on the CPU in the compiled kernels and NumPy, no autograd.

Importing PyTorch takes 1.7 to 2.5 seconds on a 2-core machine, a quarter of the fast preset's
whole command: without augmentation this engine never imports it. The recipe is step for step
the autograd engine's (:mod:`mnistlab.kernels.fastcnn` has the arithmetic); the differences are
the random numbers: weights are initialised (with PyTorch's default distributions) and batches
shuffled from NumPy's generator seeded with the run's seed, and augmentation (the same maps as
:mod:`.augment`, done by PyTorch) draws from a ``torch.Generator`` of the engine's own, seeded
with it too. All three are in the checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import numpy as np

from ..config import FASTCNN_WIDTHS, TrainConfig
from ..data.shift import TTA_SHIFTS, shift_images
from ..kernels import fastcnn
from ..metrics import log_softmax
from .allocator import keep_freed_memory
from .engine import KERNELS, prefixed
from .schedule import average_decay, learning_rate, steps_per_epoch


class KernelEngine:
    name = KERNELS
    device = "cpu"

    def __init__(self, config: TrainConfig, num_classes: int):
        self.config = config
        self.params = fastcnn.init_state(config.seed, num_classes, FASTCNN_WIDTHS[config.model])
        self.buffers = [np.zeros_like(self.params[k]) for k in fastcnn.PARAMS] if config.momentum else None
        self.shuffle = np.random.default_rng([config.seed, 1])  # the batches' order, apart from the weights' draws
        self.average = _Average(self.params, config.ema) if config.ema > 0 else None
        self.augment = _Augment(config.augment, config.seed) if config.augment != "none" else None
        self.num_parameters = sum(self.params[k].size for k in fastcnn.PARAMS)
        self._stepper()
        keep_freed_memory()

    def _stepper(self) -> None:
        c = self.config
        self.step = fastcnn.FastCNNStep(self.params, self.buffers, momentum=c.momentum, nesterov=c.nesterov,
                                        weight_decay=c.weight_decay, label_smoothing=c.label_smoothing,
                                        bf16=c.precision == "bf16")

    def set_data(self, x_train, y_train, x_valid, y_valid) -> None:
        self.x_train, self.y_train = np.asarray(x_train), np.asarray(y_train, np.int64)
        self.x_valid, self.y_valid = np.asarray(x_valid), np.asarray(y_valid, np.int64)

    def train_epoch(self, epoch: int, on_batch=None) -> float:
        """A fresh shuffled order, then SGD steps of ``batch_size`` images (uint8 pixels / 256)."""
        c, x, y = self.config, self.x_train, self.y_train
        n, size = len(x), c.batch_size
        n_batches = steps_per_epoch(n, size, c.drop_last)
        order = self.shuffle.permutation(n)
        total = 0.0
        with np.errstate(all="ignore"):  # a diverging run ends with one line from the loop, not warnings
            for b in range(n_batches):
                lr = learning_rate(c.schedule, c.lr, (epoch - 1) * n_batches + b, c.epochs * n_batches, c.warmup)
                idx = order[b * size : (b + 1) * size]
                xb = x[idx].reshape(len(idx), 784).astype(np.float32)
                xb *= np.float32(1 / 256)
                if self.augment is not None:
                    xb = self.augment(xb)
                loss = self.step.step(xb, y[idx], lr)
                if self.average is not None:
                    self.average.update(self.params)
                total += loss
                if on_batch is not None:
                    on_batch(b, n_batches, loss)
        return total / n_batches

    def _scored(self) -> dict[str, np.ndarray]:
        return self.average.params if self.average is not None else self.params

    def validate(self, keep_proba: bool) -> dict:
        with np.errstate(all="ignore"):
            result = fastcnn.evaluate(self._scored(), self.x_valid, self.y_valid, 2 * self.config.batch_size)
        if not keep_proba:
            del result["proba"]
        return result

    def end_training(self) -> None:
        if self.average is not None:
            for k, v in self.average.params.items():
                self.params[k][...] = v

    def predict_proba(self, x, tta: bool = False) -> np.ndarray:
        views = [shift_images(x, dy, dx) for dy, dx in TTA_SHIFTS] if tta else [x]
        with np.errstate(all="ignore"):
            total = sum(np.exp(log_softmax(fastcnn.logits(self.params, v))) for v in views)
        return (total / len(views)).astype(np.float32)

    def weights(self) -> dict[str, np.ndarray]:
        return dict(self.params)

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        c = self.config
        arrays = {f"model.{k}": v for k, v in self.params.items()}
        for i, b in enumerate(self.buffers or []):
            arrays[f"opt.{i}.momentum_buffer"] = b
        if self.average is not None:
            arrays.update({f"ema.{k}": v for k, v in self.average.params.items()})
            arrays["ema.steps"] = np.array(self.average.steps, np.int64)
        if self.augment is not None:
            arrays["augment_rng"] = self.augment.get_state()
        group = {"lr": c.lr, "momentum": c.momentum, "dampening": 0, "weight_decay": c.weight_decay,
                 "nesterov": c.nesterov, "maximize": False, "params": list(range(len(fastcnn.PARAMS)))}
        return arrays, {"param_groups": [group], "shuffle": self.shuffle.bit_generator.state, "precision": c.precision}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        params = {k: np.array(v) for k, v in prefixed(arrays, "model").items()}
        missing = [k for k in fastcnn.PARAMS if k not in params]
        if missing:
            raise KeyError(f"no weights {', '.join(missing)}")
        self.params = params
        if self.config.momentum:
            self.buffers = [np.array(arrays[f"opt.{i}.momentum_buffer"]) for i in range(len(fastcnn.PARAMS))]
        self.shuffle.bit_generator.state = meta["shuffle"]
        if self.average is not None:
            ema = {k: np.array(v) for k, v in prefixed(arrays, "ema").items()}
            self.average.steps = int(ema.pop("steps"))
            self.average.params = ema
        if self.augment is not None:
            self.augment.set_state(arrays["augment_rng"])
        self._stepper()

    def torch_model(self):
        return None


class _Average:
    """An exponential moving average of the weights and buffers, as :class:`~.optim.WeightAverage`
    computes it (the decay rises as ``min(decay, (1 + t) / (10 + t))``; integer buffers copied)."""

    def __init__(self, params: dict[str, np.ndarray], decay: float):
        self.decay, self.steps = decay, 0
        self.params = {k: v.copy() for k, v in params.items()}

    def update(self, params: dict[str, np.ndarray]) -> None:
        self.steps += 1
        weight = np.float32(1 - average_decay(self.decay, self.steps))
        for k, avg in self.params.items():
            if avg.dtype.kind == "f":
                avg += weight * (params[k] - avg)
            else:
                avg[...] = params[k]


class _Augment:
    """:data:`~.augment.AUGMENTS` on NumPy batches, drawing from a generator of the engine's own."""

    def __init__(self, name: str, seed: int):
        import torch

        from .augment import AUGMENTS

        self.torch, self.maps = torch, AUGMENTS[name]
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, xb: np.ndarray) -> np.ndarray:
        out = self.maps(self.torch.from_numpy(xb), generator=self.generator)
        return np.ascontiguousarray(out.reshape(len(xb), 784).numpy())

    def get_state(self) -> np.ndarray:
        return self.generator.get_state().numpy()

    def set_state(self, state: np.ndarray) -> None:
        self.generator.set_state(self.torch.from_numpy(np.array(state, np.uint8)))
