"""Use a trained run: ``load_run(RUN_DIR).predict(images)``, its predictions on validation items,
and its figures on its validation part (:func:`evaluate_run`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import metrics
from ..data.mnist import load_dataset
from ..errors import UsageError
from ..evaluation import evaluate, logits, predict_proba
from ..run.rundir import load_split, read_config
from ..run.trained import load_model
from .prepare import as_pixels, prepare_image


class Classifier:
    """A trained model plus the input handling users need.

    ``images`` may be an array of shape (N, 28, 28) or (N, 784), already MNIST-style —
    integers are grayscale bytes 0..255, floats fractions in [0, 1] (byte / 256, as
    ``load_mnist`` gives them; :func:`mnistlab.use.prepare.as_pixels`) — or a list of PIL images or
    file paths, which are prepared the way MNIST's digits were (see :mod:`mnistlab.use.prepare`).
    """

    def __init__(self, model: torch.nn.Module, run_dir: Path | None = None):
        self.model = model.eval()
        self.run_dir = run_dir

    def to_pixels(self, images) -> np.ndarray:
        """The model's input: (N, 784), uint8 pixels 0..255 or float32 in [0, 1]."""
        pictures = (str, os.PathLike, Image.Image, bytes)
        if isinstance(images, pictures):
            images = [images]
        if isinstance(images, (list, tuple)) and images and isinstance(images[0], pictures):
            return np.stack([prepare_image(im) for im in images]).reshape(-1, 784)
        return as_pixels(images)

    def predict_proba(self, images) -> np.ndarray:
        """Class probabilities, float32 (N, num_classes)."""
        return torch.softmax(logits(self.model, self.to_pixels(images)), dim=1).numpy()

    def predict(self, images) -> np.ndarray:
        """Predicted labels, int64 (N,)."""
        return self.predict_proba(images).argmax(axis=1)


def load_run(run_dir: str | os.PathLike) -> Classifier:
    """The classifier saved in a run directory (nothing is unpickled)."""
    return Classifier(load_model(run_dir), Path(run_dir))


def predict_valid(run_dir: str | os.PathLike, start: int = 0, stop: int = 9) -> list[dict]:
    """The run's predictions for validation items ``start``..``stop - 1`` of its split: one dict per
    item with ``index``, ``predicted``, ``label`` and ``probability`` (of the predicted class)."""
    config = read_config(run_dir)
    model = load_model(run_dir)
    _, _, x_valid, y_valid = load_split(config)
    if not 0 <= start < stop or stop > len(x_valid):
        raise UsageError(f"--valid {start}:{stop}: the validation part has {len(x_valid)} items (0:{len(x_valid)})")
    proba = predict_proba(model, x_valid[start:stop])
    return [{"index": start + i, "predicted": int(p), "label": int(y_valid[start + i]),
             "probability": float(proba[i, p])} for i, p in enumerate(proba.argmax(axis=1))]


def evaluate_run(run_dir: str | os.PathLike, dataset=None, tta: bool | None = None) -> dict:
    """Loss and accuracy of a run's model on the validation part of its split, per-class figures
    and the most confused pairs. ``tta``: score with test-time augmentation (``TTA_SHIFTS``);
    ``None`` does what the run's config says."""
    config = read_config(run_dir)
    model = load_model(run_dir)
    tta = config.tta if tta is None else tta
    ds = dataset if dataset is not None else load_dataset(config.data_dir)
    _, _, x_valid, y_valid = load_split(config, ds)
    proba = predict_proba(model, x_valid, tta=tta)
    batch_size = 2 * config.batch_size
    if tta:
        result = metrics.score(proba, y_valid, batch_size)
    else:
        result = evaluate(model, x_valid, y_valid, batch_size=batch_size)
    matrix = metrics.confusion_matrix(proba.argmax(axis=1), y_valid, ds.num_classes)
    return {"valid_loss": result["loss"], "valid_acc": result["acc"], "n_valid": len(x_valid), "tta": tta,
            "per_class": metrics.per_class(matrix), "most_confused": metrics.most_confused(matrix),
            "confusion": matrix.tolist()}
