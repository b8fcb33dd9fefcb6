"""Loss, accuracy and predictions of a model on a set of images. Returns numbers, prints nothing."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import metrics
from .data.shift import TTA_SHIFTS, shift_images
from .kernels.autograd import forward_for


def as_tensor(x, device: torch.device | str = "cpu") -> torch.Tensor:
    """NumPy or torch -> torch tensor on ``device``, without copying when it can."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device)


def prepare(xb: torch.Tensor) -> torch.Tensor:
    """A batch as float pixels in [0, 1): uint8 is divided by 256 as the seed does."""
    if xb.dtype == torch.uint8:
        return xb.float().mul_(1 / 256)
    return xb.float()


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def logits(model: nn.Module, x, batch_size: int = 1024) -> torch.Tensor:
    """Model outputs for every row of ``x`` (N, 784) or (N, 28, 28), in eval mode, on the CPU."""
    device = _device_of(model)
    x = as_tensor(x)
    was_training = model.training
    model.eval()
    try:
        forward = forward_for(model, x[:1].to(device))
        out = [forward(prepare(x[i : i + batch_size].to(device))).float().cpu() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def _proba(model: nn.Module, x, batch_size: int, tta: bool) -> torch.Tensor:
    if not tta:
        return torch.softmax(logits(model, x, batch_size), dim=1)
    x = as_tensor(x)
    total = None
    for dy, dx in TTA_SHIFTS:
        p = torch.softmax(logits(model, shift_images(x, dy, dx), batch_size), dim=1)
        total = p if total is None else total + p
    return total / len(TTA_SHIFTS)


def predict(model: nn.Module, x, batch_size: int = 1024, tta: bool = False) -> np.ndarray:
    """Predicted class per row, int64 (N,). ``tta``: from the probabilities averaged over ``TTA_SHIFTS``."""
    return _proba(model, x, batch_size, tta).argmax(dim=1).numpy()


def predict_proba(model: nn.Module, x, batch_size: int = 1024, tta: bool = False) -> np.ndarray:
    """Class probabilities per row, float32 (N, num_classes); ``tta``: averaged over ``TTA_SHIFTS``."""
    return _proba(model, x, batch_size, tta).numpy()


@torch.no_grad()
def evaluate(model: nn.Module, x, y, batch_size: int = 128, chunk: int = 2048, tta: bool = False,
             keep_proba: bool = False) -> dict:
    """The seed's validation loss and the accuracy.

    ``loss`` is the mean over batches of ``batch_size`` rows of each batch's mean
    cross-entropy, exactly as the seed computes
    ``sum(loss_func(model(xb), yb) for xb, yb in valid_dl) / len(valid_dl)`` (the last,
    smaller batch counts as much as a full one). The forward passes run in larger chunks,
    which gives the same numbers faster. ``acc`` is the fraction of rows classified correctly.
    With ``tta`` both come from the probabilities averaged over ``TTA_SHIFTS`` (the loss is
    their negative log-likelihood, averaged over batches the same way). ``keep_proba`` adds
    ``proba``: the class probabilities, float32 (N, C), as :func:`predict_proba` gives them.
    Without ``tta``, ``spread`` is the largest range of any output over the images (0: the
    network gives every image the same outputs, :func:`mnistlab.metrics.output_spread`).
    """
    device = _device_of(model)
    x, y = as_tensor(x), as_tensor(y).long()
    if len(x) == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    if tta:
        proba = _proba(model, x, chunk, tta=True)
        result = metrics.score(proba.numpy(), y.numpy(), batch_size)
    else:
        was_training = model.training
        model.eval()
        losses, correct, probas, low, high = [], 0, [], None, None
        forward = forward_for(model, x[:1].to(device))
        try:
            for i in range(0, len(x), chunk):
                xb, yb = prepare(x[i : i + chunk].to(device)), y[i : i + chunk].to(device)
                out = forward(xb).float()
                losses.append(F.cross_entropy(out, yb, reduction="none").cpu())
                correct += int((out.argmax(dim=1) == yb).sum())
                low = out.amin(dim=0) if low is None else torch.minimum(low, out.amin(dim=0))
                high = out.amax(dim=0) if high is None else torch.maximum(high, out.amax(dim=0))
                if keep_proba:
                    probas.append(torch.softmax(out, dim=1).cpu())
        finally:
            model.train(was_training)
        spread = float((high - low).max()) if len(x) > 1 else float("nan")
        result = {"loss": metrics.batch_mean(torch.cat(losses).double().numpy(), batch_size),
                  "acc": correct / len(x), "spread": spread}
        proba = torch.cat(probas) if keep_proba else None
    if keep_proba:
        result["proba"] = proba.numpy()
    return result
