"""Classification metrics from outputs, predictions and true labels. NumPy in, plain numbers out."""

from __future__ import annotations

import numpy as np


def confusion_matrix(predictions, labels, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; rows are true labels, columns predictions."""
    predictions, labels = np.asarray(predictions, np.int64), np.asarray(labels, np.int64)
    flat = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class(matrix: np.ndarray) -> list[dict]:
    """Precision, recall, F1 and support per class (0 where a ratio is undefined)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return [{"class": k, "precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
             "support": int(actual[k])} for k in range(len(matrix))]


def most_confused(matrix: np.ndarray, top: int = 5) -> list[dict]:
    """The off-diagonal cells with the most images: which true label was taken for which."""
    matrix = np.asarray(matrix).copy()
    np.fill_diagonal(matrix, 0)
    order = np.argsort(matrix, axis=None, kind="stable")[::-1][:top]
    pairs = [np.unravel_index(i, matrix.shape) for i in order]
    return [{"true": int(t), "predicted": int(p), "count": int(matrix[t, p])} for t, p in pairs if matrix[t, p] > 0]


def worst_mistakes(probabilities: np.ndarray, labels, top: int = 16) -> np.ndarray:
    """Indices of wrongly classified rows, most confident first."""
    probabilities, labels = np.asarray(probabilities), np.asarray(labels)
    predictions = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predictions != labels)
    confidence = probabilities[wrong, predictions[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:top]


def batch_mean(per_row: np.ndarray, batch_size: int) -> float:
    """The mean over batches of ``batch_size`` rows of each batch's mean, as the seed averages its
    validation loss (the last, smaller batch counts as much as a full one); NaN for no rows."""
    per_row = np.asarray(per_row, np.float64)
    means = [per_row[i : i + batch_size].mean() for i in range(0, len(per_row), batch_size)]
    return float(np.mean(means)) if means else float("nan")


def score(proba, labels, batch_size: int = 128) -> dict[str, float]:
    """Loss and accuracy from class probabilities (N, C) already computed: the loss is their
    negative log-likelihood, averaged over batches of ``batch_size`` rows (:func:`batch_mean`)."""
    proba, labels = np.asarray(proba, np.float64), np.asarray(labels, np.int64)
    per_row = -np.log(np.clip(proba[np.arange(len(labels)), labels], 1e-12, None))
    acc = float((proba.argmax(axis=1) == labels).mean()) if len(labels) else float("nan")
    return {"loss": batch_mean(per_row, batch_size), "acc": acc}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Over the last axis (the classes)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def output_spread(z: np.ndarray) -> float:
    """How much the outputs ``z`` (n, C) vary from image to image: the largest range of any class's
    value over the rows. 0 when every image gets the same outputs (a collapsed network)."""
    return float((z.max(axis=0) - z.min(axis=0)).max()) if len(z) > 1 else float("nan")


def score_logits(z: np.ndarray, labels, batch_size: int = 128) -> dict:
    """The seed's validation figures from outputs ``z`` (N, C): ``loss`` (each batch of ``batch_size``
    rows' mean cross-entropy, averaged over batches: :func:`batch_mean`), ``acc``, ``proba`` (N, C)
    and ``spread`` (:func:`output_spread`)."""
    labels = np.asarray(labels, np.int64)
    logp = log_softmax(z)
    per_row = -logp[np.arange(len(labels)), labels].astype(np.float64)
    return {"loss": batch_mean(per_row, batch_size),
            "acc": float((z.argmax(axis=1) == labels).mean()) if len(labels) else float("nan"),
            "proba": np.exp(logp), "spread": output_spread(z)}
