"""Learning-rate schedules: the rate for each optimizer step. No PyTorch needed."""

from __future__ import annotations

import math

from ..config import SCHEDULES


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Optimizer steps in a pass over ``n`` images: every batch, or (``drop_last``) the full ones."""
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def average_decay(decay: float, steps: int) -> float:
    """The weight average's decay after ``steps`` updates: ``decay``, or less over the first steps
    (``(1 + t) / (10 + t)``), so that short runs are not anchored to the initial weights."""
    return min(decay, (1 + steps) / (10 + steps))


def learning_rate(schedule: str, peak: float, step: int, total: int, warmup: float = 0.25) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total``.

    ``constant``: ``peak`` throughout (the seed). ``onecycle``: rises linearly to ``peak``
    over the first ``warmup`` fraction of the steps, then falls linearly towards 0, reached one
    step after the last.
    """
    if schedule == "constant":
        return peak
    if schedule != "onecycle":
        raise ValueError(f"unknown schedule {schedule!r}; expected one of: {', '.join(SCHEDULES)}")
    rise = max(1, math.ceil(warmup * total))
    if step < rise:
        return peak * (step + 1) / rise
    return peak * max(0.0, (total - step) / (total - rise + 1))
