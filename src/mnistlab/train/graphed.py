"""The autograd engine's training step captured as a CUDA graph, for static shapes (``drop_last``).

At MNIST's sizes a GPU step is bound by kernel launches and host synchronisations, not arithmetic:
a step of the fast preset's network is some hundred small kernels. Captured once, a step replays
as one graph launch. Its inputs are static tensors the step reads: the batch's row indices, the
learning rate (SGD takes it as a tensor: no value is baked into the graph), and the loss sum it
adds to. The first steps run eagerly on a side stream (CUDA's lazy initialisation, the optimizer's
momentum buffers), then the step is captured and replayed: the same kernels, so the same numbers
as an eager step, and a resumed run (whose first steps are eager again) ends bit-identical.
Augmentation and dropout draw from the default CUDA generator, which graph replays advance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..evaluation import prepare

WARMUP = 3  # eager steps before the capture


class GraphedStep:
    """``step(rows, lr)``: one SGD step of ``engine`` on its training rows ``rows`` (batch_size,)."""

    def __init__(self, engine, batch_size: int, capture: bool = True):
        self.engine, self.capture = engine, capture
        device = engine.torch_device
        self.rows = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.lr = torch.zeros((), device=device)
        self.total = torch.zeros((), device=device)
        for group in engine.opt.param_groups:
            group["lr"] = self.lr
        self.graph = None
        self.eager_steps = 0

    def _step(self) -> None:
        """The step on the static inputs (what the graph holds)."""
        e = self.engine
        xb = prepare(e.x_train[self.rows])
        if e.augment is not None:
            xb = e.augment(xb)
        loss = F.cross_entropy(e.model(xb), e.y_train[self.rows], label_smoothing=e.config.label_smoothing)
        loss.backward()
        e.opt.step()
        e.opt.zero_grad(set_to_none=True)
        self.total += loss.detach()

    def __call__(self, rows: torch.Tensor, lr: torch.Tensor) -> None:
        self.rows.copy_(rows)
        self.lr.copy_(lr)
        if self.graph is not None:
            self.graph.replay()
        elif not self.capture:
            self._step()
        elif self.eager_steps < WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.eager_steps += 1
        else:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._step()
            self.graph.replay()
