"""The ``autograd`` engine: the seed's training loop, with its gaps filled the way its text says.

Each epoch: reshuffle, ``model.train()``, then per batch forward, cross-entropy, backward,
``opt.step()``, ``opt.zero_grad()``; then ``model.eval()`` and the validation loss averaged
over validation batches (batch size twice the training one, as in the PyTorch tutorial the seed
follows). Batches are sliced from tensors held in memory: no per-sample Python work, no
DataLoader. The shuffled order is nevertheless the one the seed's
``DataLoader(train_ds, batch_size=64, shuffle=True)`` draws from torch's global random
generator, so a run seeded like the seed's code sees the same batches. On the CPU the seed's CNN
and FastCNN run in the compiled kernels through autograd (:mod:`mnistlab.kernels.autograd`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import metrics
from ..config import TrainConfig
from ..evaluation import as_tensor, evaluate, logits, predict_proba, prepare
from ..kernels.autograd import forward_for, kernel_of, kernels_apply
from ..kernels.calls import FASTCNN
from ..metrics import log_softmax, output_spread
from ..models import count_parameters, create_model
from . import distributed
from .allocator import keep_freed_memory
from .augment import AUGMENTS
from .engine import AUTOGRAD, prefixed
from .optim import SGD, WeightAverage
from .schedule import learning_rate, steps_per_epoch


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


def _arrays(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous().numpy() for k, v in tensors.items()}


class AutogradEngine:
    """Trains ``model`` (any ``nn.Module`` taking (B, 784) pixels in [0, 1)) on ``device``."""

    name = AUTOGRAD

    def __init__(self, model: nn.Module, config: TrainConfig, device: str):
        self.model, self.config, self.device = model, config, device
        self.torch_device = torch.device(device)
        model.to(self.torch_device)
        self.opt = SGD(model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                       weight_decay=config.weight_decay)
        self.average = WeightAverage(model, config.ema) if config.ema > 0 else None
        if device == "cpu":
            # oneDNN runs these convolutions 1.25-1.33x faster channels-last, and a step's buffers are
            # reused instead of page-faulted in afresh (benchmarks/bench_choices.py). The compiled
            # kernels take FastCNN's weights as they are (contiguous).
            if not (kernel_of(model) == FASTCNN and kernels_apply(model)):
                model.to(memory_format=torch.channels_last)
                if self.average is not None:
                    self.average.model.to(memory_format=torch.channels_last)
            keep_freed_memory()
        self.augment = AUGMENTS[config.augment]
        self.num_parameters = count_parameters(model)
        self.group = distributed.active()  # several processes: torchrun started this one

    @classmethod
    def create(cls, config: TrainConfig, num_classes: int, device: str) -> AutogradEngine:
        """A registry model built right after ``torch.manual_seed(config.seed)``, as the seed's code does."""
        torch.manual_seed(config.seed)
        model = create_model(config.model, num_classes=num_classes)
        if config.sync_bn:  # on CUDA (mnistlab.train.choose.check_processes)
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return cls(model, config, device)

    def set_data(self, x_train, y_train, x_valid, y_valid) -> None:
        d = self.torch_device
        self.x_train, self.y_train = as_tensor(x_train, d), as_tensor(y_train, d).long()
        self.x_valid, self.y_valid = as_tensor(x_valid, d), as_tensor(y_valid, d).long()

    def _schedule(self, epoch: int, b: int, n_batches: int) -> None:
        """The learning rate of step ``b`` of ``epoch`` (1-based) on every parameter group."""
        c = self.config
        if c.schedule != "constant":
            for group in self.opt.param_groups:
                group["lr"] = learning_rate(c.schedule, c.lr, (epoch - 1) * n_batches + b, c.epochs * n_batches,
                                            c.warmup)

    def _graphable(self, on_batch) -> bool:
        """Whether this epoch's steps run as one captured CUDA graph (:class:`~.graphed.GraphedStep`):
        every batch full (``drop_last``), one process, no per-step hook, no weight average."""
        c = self.config
        return (self.torch_device.type == "cuda" and c.drop_last and self.group is None and on_batch is None
                and self.average is None)

    def _train_epoch_graphed(self, epoch: int, order: torch.Tensor, n_batches: int) -> float:
        from .graphed import GraphedStep

        c = self.config
        if getattr(self, "graphed", None) is None:
            self.graphed = GraphedStep(self, c.batch_size, capture=self.torch_device.type == "cuda")
        self.model.train()
        # every step's learning rate, and the epoch's batches, on the device before the first step
        rates = torch.tensor([learning_rate(c.schedule, c.lr, (epoch - 1) * n_batches + b, c.epochs * n_batches,
                                            c.warmup) for b in range(n_batches)], device=self.torch_device)
        batches = order[: n_batches * c.batch_size].view(n_batches, c.batch_size)
        self.graphed.total.zero_()
        for b in range(n_batches):
            self.graphed(batches[b], rates[b])
        return float(self.graphed.total) / n_batches

    def train_epoch(self, epoch: int, on_batch=None) -> float:
        """One pass in a fresh random order; the mean of the batch losses."""
        if self.group is not None:
            return self._train_epoch_distributed(epoch, on_batch)
        model, opt, c, x, y = self.model, self.opt, self.config, self.x_train, self.y_train
        model.train()
        n = len(x)
        order = dataloader_order(n).to(x.device)
        n_batches = steps_per_epoch(n, c.batch_size, c.drop_last)
        if self._graphable(on_batch):
            return self._train_epoch_graphed(epoch, order, n_batches)
        total = torch.zeros((), device=x.device)
        forward = forward_for(model, x)  # the compiled kernels for the seed's CNN and FastCNN on a CPU
        for b in range(n_batches):
            self._schedule(epoch, b, n_batches)
            idx = order[b * c.batch_size : (b + 1) * c.batch_size]
            xb = prepare(x[idx])
            if self.augment is not None:
                xb = self.augment(xb)
            loss = F.cross_entropy(forward(xb), y[idx], label_smoothing=c.label_smoothing)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if self.average is not None:
                self.average.update(model)
            total += loss.detach()
            if on_batch is not None:
                on_batch(b, n_batches, float(loss.detach()))
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize()
        return float(total) / n_batches

    def _train_epoch_distributed(self, epoch: int, on_batch=None) -> float:
        """One epoch as one process of several: the same global order everywhere, this process's slice
        of every global batch, the gradients summed across processes. Dropout and augmentation draw
        from a generator seeded per (seed, epoch, batch, rank) inside a fork of torch's, so the
        shuffling stream stays the same in every process and a restarted job repeats exactly."""
        model, opt, c, x, y = self.model, self.opt, self.config, self.x_train, self.y_train
        world, me = distributed.world_size(), distributed.rank()
        model.train()
        n = len(x)
        order = dataloader_order(n).to(x.device)
        n_batches = steps_per_epoch(n, c.batch_size, c.drop_last)
        sums = torch.zeros(n_batches, dtype=torch.float64, device=x.device)
        sizes = torch.zeros(n_batches, dtype=torch.float64, device=x.device)
        forward = forward_for(model, x)
        params = [p for p in model.parameters() if p.requires_grad]
        devices = [self.torch_device] if self.torch_device.type == "cuda" else []
        # a step draws random numbers only for augmentation or dropout
        random_steps = self.augment is not None or any(isinstance(m, torch.nn.modules.dropout._DropoutNd)
                                                       for m in model.modules())
        for b in range(n_batches):
            self._schedule(epoch, b, n_batches)
            idx = order[b * c.batch_size : (b + 1) * c.batch_size]
            mine = idx.tensor_split(world)[me]
            sizes[b] = len(idx)
            if len(mine):
                with torch.random.fork_rng(devices=devices, enabled=random_steps):
                    if random_steps:
                        torch.manual_seed(int(np.random.SeedSequence([c.seed, epoch, b, me]).generate_state(1)[0]))
                    xb = prepare(x[mine])
                    if self.augment is not None:
                        xb = self.augment(xb)
                    loss = F.cross_entropy(forward(xb), y[mine], label_smoothing=c.label_smoothing, reduction="sum")
                    loss.backward()
                sums[b] = loss.detach()
            distributed.sum_grads_(params, 1.0 / len(idx))
            opt.step()
            opt.zero_grad(set_to_none=True)
            distributed.broadcast_buffers_(model)
            if self.average is not None:
                self.average.update(model)
            if on_batch is not None and distributed.is_main():
                on_batch(b, n_batches, float(sums[b]) / len(mine) if len(mine) else 0.0)
        distributed.all_reduce_(sums)
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize()
        return float((sums / sizes).mean())

    def validate(self, keep_proba: bool) -> dict:
        scored = self.average.model if self.average is not None else self.model
        if self.group is not None:
            result = self._validate_distributed(scored)
        else:
            result = evaluate(scored, self.x_valid, self.y_valid, batch_size=2 * self.config.batch_size,
                              keep_proba=keep_proba)
        _draw_seed()  # iterating the seed's valid_dl draws a base seed too
        return result

    def _validate_distributed(self, scored) -> dict:
        """Each process scores its slice of the validation images; the rows are joined in order and
        every process computes the seed's figures from all of them."""
        x, y = self.x_valid, self.y_valid
        mine = torch.arange(len(x), device=x.device).tensor_split(distributed.world_size())[distributed.rank()]
        # a process with no validation image (fewer images than processes) still sends its (0, C) share
        z = logits(scored, x[mine] if len(mine) else x[:1])[: len(mine)].to(x.device)
        z = distributed.gather_rows(z.float(), len(x)).cpu().numpy()
        proba = np.exp(log_softmax(z))
        labels = y.cpu().numpy()
        result = metrics.score(proba, labels, 2 * self.config.batch_size)
        return {**result, "proba": proba.astype(np.float32), "spread": output_spread(z)}

    def end_training(self) -> None:
        if self.average is not None:
            self.model.load_state_dict(self.average.model.state_dict())

    def predict_proba(self, x, tta: bool = False) -> np.ndarray:
        return predict_proba(self.model, x, tta=tta)

    def weights(self) -> dict[str, np.ndarray]:
        return {k[6:]: v for k, v in _arrays(self.model.state_dict(), "model").items()}

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = _arrays(self.model.state_dict(), "model")
        if self.average is not None:
            arrays.update(_arrays(self.average.state_dict(), "ema"))
        opt_state = self.opt.state_dict()
        for index, state in opt_state["state"].items():
            arrays.update(_arrays({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, f"opt.{index}"))
        arrays["rng"] = torch.get_rng_state().numpy()
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # augmentation draws on the GPU there
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                arrays[f"cuda_rng.{i}"] = s.numpy()
        return arrays, {"param_groups": opt_state["param_groups"]}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        tensors = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        self.model.load_state_dict(prefixed(tensors, "model"))
        if self.average is not None:
            self.average.load_state_dict(prefixed(tensors, "ema"))
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        self.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        torch.set_rng_state(tensors["rng"])
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_rng.")),
                                           key=lambda k: int(k.split(".")[1]))]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)

    def torch_model(self) -> nn.Module:
        return self.model
