"""SGD, and the exponential moving average of the weights.

:class:`SGD` performs exactly the update of ``torch.optim.SGD`` (momentum with dampening 0,
optional Nesterov momentum and weight decay) and reads and writes the same ``state_dict``
layout. It exists because every ``torch.optim`` optimizer imports ``torch._dynamo`` when it
is built, which costs 2 to 2.6 seconds on a 2-core machine: more than a whole ``fast``
training run spends in its first epoch's first half.
"""

from __future__ import annotations

import torch

from .schedule import average_decay


class SGD:
    """``torch.optim.SGD(params, lr, momentum, nesterov=..., weight_decay=...)``, same arithmetic."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs a momentum above 0")
        group = {"params": list(params), "lr": lr, "momentum": momentum, "dampening": 0, "weight_decay": weight_decay,
                 "nesterov": nesterov, "maximize": False}
        self.param_groups = [group]
        self.state: dict[torch.Tensor, dict] = {}

    @torch.no_grad()
    def step(self) -> None:
        # Multi-tensor (_foreach) kernels: the same element-wise arithmetic as torch.optim.SGD's
        # per-tensor loop, in a handful of calls instead of three per parameter.
        for group in self.param_groups:
            lr, momentum, wd, nesterov = group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if wd != 0:
                grads = torch._foreach_add(grads, params, alpha=wd)
            if momentum != 0:
                states = [self.state.setdefault(p, {}) for p in params]
                if all("momentum_buffer" in s for s in states):
                    bufs = [s["momentum_buffer"] for s in states]
                    torch._foreach_mul_(bufs, momentum)
                    torch._foreach_add_(bufs, grads)
                else:
                    bufs = []
                    for s, g in zip(states, grads, strict=True):
                        if "momentum_buffer" not in s:
                            s["momentum_buffer"] = torch.clone(g).detach()
                        else:
                            s["momentum_buffer"].mul_(momentum).add_(g)
                        bufs.append(s["momentum_buffer"])
                grads = torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs
            if isinstance(lr, torch.Tensor):  # a learning rate on the device (a CUDA graph's input): no host sync
                torch._foreach_add_(params, torch._foreach_mul(grads, lr), alpha=-1)
            else:
                torch._foreach_add_(params, grads, alpha=-lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict:
        """The layout of ``torch.optim.Optimizer.state_dict()``: parameters by index."""
        index = {id(p): i for i, p in enumerate(self._params())}
        groups, start = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            settings = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in group.items() if k != "params"}
            groups.append({**settings, "params": list(range(start, start + n))})
            start += n
        state = {index[id(p)]: dict(s) for p, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        params = self._params()
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or sum(len(g["params"]) for g in saved_groups) != len(params):
            raise ValueError("the saved optimizer state does not match this model's parameters")
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params" and k in group})
        self.state = {}
        for i, s in state_dict["state"].items():
            p = params[int(i)]
            self.state[p] = {k: (v.to(p.device, p.dtype) if isinstance(v, torch.Tensor) else v) for k, v in s.items()}


class WeightAverage:
    """An exponential moving average of a model's weights and buffers (EMA), updated after every step.

    ``model`` is a copy of the trained network holding the averages; validate and save it.
    The decay rises as ``min(decay, (1 + t) / (10 + t))`` over the first steps ``t``, so the
    average is not anchored to the initial weights in short runs. BatchNorm's running
    statistics are averaged like the weights; integer buffers (the batch counters) are copied.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        import copy

        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        self.decay = decay
        self.steps = 0
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.steps += 1
        decay = average_decay(self.decay, self.steps)
        avg, cur = self.model.state_dict(), model.state_dict()
        floats = [k for k, v in avg.items() if v.is_floating_point()]
        torch._foreach_lerp_([avg[k] for k in floats], [cur[k] for k in floats], 1 - decay)
        for key, value in avg.items():
            if not value.is_floating_point():
                value.copy_(cur[key])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.model.state_dict(), "steps": torch.tensor(self.steps)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        self.steps = int(state.pop("steps"))
        self.model.load_state_dict(state)
