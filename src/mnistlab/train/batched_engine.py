"""The ``batched`` engine: N FastCNN members of one recipe trained together as one wider network.

The members' weights are stacked along the channels: each convolution runs once with ``groups=N``
(member ``i`` sees only its own channels), BatchNorm normalises each channel over its own member's
batch (so every member keeps its own statistics), the linear heads run as one batched matrix
product, and the loss is the sum of the members' mean losses, so each member's gradient is the one
it would get alone. SGD, weight decay, momentum and the weight average are element-wise, hence per
member. One step of N members costs one set of kernel launches instead of N.

Each member draws its random numbers as the kernel engine does for its seed alone (weights from
:func:`mnistlab.kernels.fastcnn.init_state`, its own NumPy shuffling generator, its own
``torch.Generator`` for augmentation) and trains on its own images (``subsample`` draws each
member's subset), so a member ends as the same seed trained alone up to rounding (the kernels
and PyTorch's convolutions add in other orders, and training amplifies it). A member whose loss stops being finite
is left out of the loss from the next epoch on (:meth:`BatchedEngine.drop`); the others go on.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..config import FASTCNN_WIDTHS, TrainConfig
from ..data.shift import TTA_SHIFTS, shift_images
from ..kernels import fastcnn
from ..kernels.fastcnn import BN_MOMENTUM, PARAMS
from ..metrics import log_softmax, score_logits
from ..models import FastCNN
from .augment import AUGMENTS
from .engine import BATCHED, prefixed
from .optim import SGD
from .schedule import average_decay, learning_rate, steps_per_epoch

CONVS = (("features.0", "features.1", 5), ("features.3", "features.4", 3), ("features.6", "features.7", 3))
EVAL_IMAGES = 4096  # images x members per evaluation chunk


class BatchedEngine:
    """Trains the members ``configs`` (one recipe, one seed each) on ``device`` as one network."""

    name = BATCHED

    def __init__(self, configs: list[TrainConfig], num_classes: int, device: str):
        c = configs[0]
        if c.model not in FASTCNN_WIDTHS:
            raise ValueError(f"batched training takes {', '.join(FASTCNN_WIDTHS)}, not {c.model}")
        self.configs, self.config, self.device = configs, c, device
        self.n = len(configs)
        self.widths = FASTCNN_WIDTHS[c.model]
        self.torch_device = torch.device(device)
        members = [fastcnn.init_state(m.seed, num_classes, self.widths) for m in configs]
        self.state = {k: torch.from_numpy(np.concatenate([m[k][None] if k.startswith("head.") else m[k]
                                                          for m in members])).to(self.torch_device)
                      for k in members[0] if not k.endswith("num_batches_tracked")}
        self.steps = torch.zeros(self.n, dtype=torch.int64)  # BatchNorm's batch counter, per member
        self.params = [self.state[k].requires_grad_() for k in PARAMS]
        self.opt = SGD(self.params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay)
        self.average = {k: v.detach().clone() for k, v in self.state.items()} if c.ema > 0 else None
        self.average_steps = 0
        self.shuffles = [np.random.default_rng([m.seed, 1]) for m in configs]
        self.generators = [torch.Generator(self.torch_device).manual_seed(m.seed) for m in configs]
        self.augment = AUGMENTS[c.augment]
        self.alive = np.ones(self.n, bool)
        self.num_parameters = sum(members[0][k].size for k in PARAMS)

    # -- the stacked network -------------------------------------------------------------------
    def _logits(self, x: torch.Tensor, state: dict, training: bool) -> torch.Tensor:
        """Logits (N, B, C) of each member's batch ``x`` (N, B, 784) float pixels in [0, 1)."""
        n, b = x.shape[:2]
        h = ((x.reshape(n, b, 28, 28) - FastCNN.MEAN) * (1 / FastCNN.STD)).transpose(0, 1)  # (B, N, 28, 28)
        for conv, bn, k in CONVS:
            h = F.conv2d(h, state[f"{conv}.weight"], stride=2, padding=k // 2, groups=n)
            h = F.batch_norm(h, state[f"{bn}.running_mean"], state[f"{bn}.running_var"], state[f"{bn}.weight"],
                             state[f"{bn}.bias"], training, BN_MOMENTUM, 1e-5)
            h = F.relu(h)
        feats = h.reshape(b, n, -1).transpose(0, 1)  # (N, B, 16 C3), each member's flattened (C3, 4, 4)
        return torch.baddbmm(state["head.bias"][:, None, :], feats, state["head.weight"].transpose(1, 2))

    # -- the engine interface, per member ------------------------------------------------------
    def set_data(self, x_train: list, y_train: list, x_valid, y_valid) -> None:
        """Each member's training images (uint8 (n, 784), the same n for all) and labels; one validation part.
        Members that train on the same images share one copy of them."""
        d = self.torch_device
        self.shared = all(x is x_train[0] for x in x_train)
        keep = x_train[:1] if self.shared else x_train
        self.x_train = [torch.from_numpy(np.ascontiguousarray(x)).to(d) for x in keep]
        self.y_train = [torch.from_numpy(np.asarray(y, np.int64)).to(d) for y in (y_train[:1] if self.shared
                                                                                  else y_train)]
        self.x_valid, self.y_valid = np.asarray(x_valid), np.asarray(y_valid, np.int64)

    def _gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The members' images (N, B, 784) and labels (N, B) at rows ``idx`` (N, B) of their training parts."""
        if self.shared:
            return self.x_train[0][idx], self.y_train[0][idx]
        return (torch.stack([x[i] for x, i in zip(self.x_train, idx, strict=True)]),
                torch.stack([y[i] for y, i in zip(self.y_train, idx, strict=True)]))

    def train_epoch(self, epoch: int, on_batch=None) -> np.ndarray:
        """One pass over each member's images in its own order; each member's mean batch loss (N,)."""
        c, size = self.config, self.config.batch_size
        n = len(self.x_train[0])
        n_batches = steps_per_epoch(n, size, c.drop_last)
        orders = torch.from_numpy(np.stack([s.permutation(n) for s in self.shuffles])).to(self.torch_device)
        alive = torch.from_numpy(self.alive).to(self.torch_device)
        total = torch.zeros(self.n, dtype=torch.float64, device=self.torch_device)
        for b in range(n_batches):
            lr = learning_rate(c.schedule, c.lr, (epoch - 1) * n_batches + b, c.epochs * n_batches, c.warmup)
            self.opt.param_groups[0]["lr"] = lr
            idx = orders[:, b * size : (b + 1) * size]  # (N, B): each member's batch
            xb, yb = self._gather(idx)
            xb = xb.float().mul_(1 / 256)
            if self.augment is not None:  # each member's draws from its own generator, one grid_sample for all
                draws = [self.augment.draw(idx.shape[1], xb.device, xb.dtype, g) for g in self.generators]
                r = torch.cat([d[0] for d in draws])
                coarse = torch.cat([d[1] for d in draws]) if draws[0][1] is not None else None
                xb = self.augment.apply(xb.reshape(-1, 1, 28, 28), r, coarse)
            z = self._logits(xb.reshape(self.n, -1, 784), self.state, training=True)
            losses = F.cross_entropy(z.reshape(-1, z.shape[-1]), yb.reshape(-1), label_smoothing=c.label_smoothing,
                                     reduction="none").view(self.n, -1).mean(1)
            torch.where(alive, losses, 0.0).sum().backward()  # a dropped member's NaN reaches no one
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.steps += 1
            if self.average is not None:
                self._average()
            total += losses.detach()
            if on_batch is not None:
                on_batch(b, n_batches, float(losses.detach()[alive].mean()) if self.alive.any() else math.nan)
        return (total / n_batches).cpu().numpy()

    @torch.no_grad()
    def _average(self) -> None:
        """The weight average, as the kernel engine computes it (:func:`~.schedule.average_decay`)."""
        self.average_steps += 1
        weight = 1 - average_decay(self.config.ema, self.average_steps)
        names = list(self.average)
        torch._foreach_lerp_([self.average[k] for k in names], [self.state[k].detach() for k in names], weight)

    def _scored(self) -> dict:
        return self.average if self.average is not None else self.state

    @torch.no_grad()
    def _eval_logits(self, x: np.ndarray, state: dict) -> np.ndarray:
        """Every member's logits (N, V, C) on the same images ``x`` (V, 784) uint8 or float in [0, 1)."""
        chunk = max(1, EVAL_IMAGES // self.n)
        out = []
        for start in range(0, len(x), chunk):
            xb = torch.from_numpy(np.ascontiguousarray(x[start : start + chunk])).to(self.torch_device)
            xb = xb.float().mul_(1 / 256) if xb.dtype == torch.uint8 else xb.float()
            out.append(self._logits(xb.reshape(1, len(xb), 784).expand(self.n, -1, -1), state, False).cpu())
        return torch.cat(out, dim=1).numpy()

    def validate(self, keep_proba: bool) -> list[dict]:
        """Each member's :meth:`~mnistlab.train.engine.Engine.validate`."""
        results = []
        for z in self._eval_logits(self.x_valid, self._scored()):
            with np.errstate(all="ignore"):
                r = score_logits(z, self.y_valid, 2 * self.config.batch_size)
            if not keep_proba:
                del r["proba"]
            results.append(r)
        return results

    def drop(self, member: int) -> None:
        """Leave member ``member`` out of the loss (it diverged); the others train on unchanged."""
        self.alive[member] = False

    def end_training(self) -> None:
        if self.average is not None:
            with torch.no_grad():
                for k, v in self.average.items():
                    self.state[k].copy_(v)

    def predict_proba(self, x, tta: bool = False) -> np.ndarray:
        """Every member's class probabilities (N, V, C) on ``x`` (averaged over TTA's shifts with ``tta``)."""
        views = [shift_images(x, dy, dx) for dy, dx in TTA_SHIFTS] if tta else [x]
        with np.errstate(all="ignore"):
            total = sum(np.exp(log_softmax(self._eval_logits(v, self.state))) for v in views)
        return (total / len(views)).astype(np.float32)

    def weights(self, member: int) -> dict[str, np.ndarray]:
        """Member ``member``'s ``state_dict`` as arrays, FastCNN's names: what its ``model.safetensors`` holds."""
        return self._member(self.state, member)

    def _member(self, state: dict, i: int) -> dict[str, np.ndarray]:
        out = {}
        for k, v in state.items():
            v = v.detach()
            rows = v[i] if k.startswith("head.") else v.unflatten(0, (self.n, -1))[i]
            out[k] = rows.cpu().numpy().copy()
        for _, bn, _ in CONVS:
            out[f"{bn}.num_batches_tracked"] = np.array(int(self.steps[i]), np.int64)
        return out

    def state_of(self, member: int) -> tuple[dict[str, np.ndarray], dict]:
        """Member ``member``'s checkpoint, in the kernel engine's layout (its weights, momentum buffers,
        weight average, shuffling and augmentation generators)."""
        c = self.config
        arrays = {f"model.{k}": v for k, v in self.weights(member).items()}
        for j, p in enumerate(self.params):
            buf = self.opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                arrays[f"opt.{j}.momentum_buffer"] = self._member({PARAMS[j]: buf}, member)[PARAMS[j]]
        if self.average is not None:
            arrays.update({f"ema.{k}": v for k, v in self._member(self.average, member).items()})
            arrays["ema.steps"] = np.array(self.average_steps, np.int64)
        if self.augment is not None:
            arrays["augment_rng"] = self.generators[member].get_state().numpy()
        group = {"lr": c.lr, "momentum": c.momentum, "dampening": 0, "weight_decay": c.weight_decay,
                 "nesterov": c.nesterov, "maximize": False, "params": list(range(len(PARAMS)))}
        return arrays, {"param_groups": [group], "shuffle": self.shuffles[member].bit_generator.state}

    def load_states(self, states: list[tuple[dict[str, np.ndarray], dict]]) -> None:
        """Continue from every member's :meth:`state_of` (in member order)."""
        def stacked(prefix: str, k: str) -> torch.Tensor:
            rows = [np.asarray(prefixed(a, prefix)[k]) for a, _ in states]
            return torch.from_numpy(np.stack(rows) if k.startswith("head.") else np.concatenate(rows))

        with torch.no_grad():
            for k, v in self.state.items():
                v.copy_(stacked("model", k))
            if self.average is not None:
                for k, v in self.average.items():
                    v.copy_(stacked("ema", k))
                self.average_steps = int(states[0][0]["ema.steps"])
        self.steps = torch.tensor([int(a[f"model.{CONVS[0][1]}.num_batches_tracked"]) for a, _ in states])
        if self.config.momentum and all("opt.0.momentum_buffer" in a for a, _ in states):
            for j, p in enumerate(self.params):
                rows = [np.asarray(a[f"opt.{j}.momentum_buffer"]) for a, _ in states]
                buf = np.stack(rows) if PARAMS[j].startswith("head.") else np.concatenate(rows)
                self.opt.state[p] = {"momentum_buffer": torch.from_numpy(buf).to(self.torch_device)}
        for i, (arrays, meta) in enumerate(states):
            self.shuffles[i].bit_generator.state = meta["shuffle"]
            if self.augment is not None:
                self.generators[i].set_state(torch.from_numpy(np.array(arrays["augment_rng"], np.uint8)))
