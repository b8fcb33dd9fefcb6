"""Pictures: each function returns a matplotlib Figure; :func:`save` writes it as PNG.

Figures are built without pyplot (no global figure registry, so nothing leaks and a
picture can be drawn on a background thread) and rendered with Agg: no display needed.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .files import write_bytes_atomic

WRONG = "tab:red"
RIGHT = "black"


def save(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` atomically (a watcher never sees half a PNG).

    Every figure here lays itself out (``tight_layout``), so it is drawn once, not twice as
    ``bbox_inches="tight"`` would.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return write_bytes_atomic(path, buf.getvalue())


def _square(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32).reshape(28, 28)


def plot_example(image, label: int | None = None, title: str | None = None) -> Figure:
    """One image in gray, as the seed's ``plt.imshow(x_train[0].reshape((28, 28)), cmap="gray")``."""
    fig = Figure(figsize=(3.2, 3.4))
    ax = fig.subplots()
    ax.imshow(_square(image), cmap="gray")
    ax.set_title(title or (f"label {label}" if label is not None else "image"))
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
    fig.tight_layout()
    return fig


def plot_grid(images, labels, rows: int, cols: int, predictions=None, title: str | None = None,
              probabilities=None) -> Figure:
    """A rows x cols grid of images titled with their labels (and predictions, mistakes in red)."""
    n = min(rows * cols, len(images))
    fig = Figure(figsize=(1.6 * cols, 1.8 * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(_square(images[i]), cmap="gray")
        if predictions is None:
            ax.set_title(f"label {int(labels[i])}", fontsize=9)
            continue
        wrong = int(predictions[i]) != int(labels[i])
        text = f"pred {int(predictions[i])} / true {int(labels[i])}"
        if probabilities is not None:
            text += f"\np={float(probabilities[i]):.2f}"
        ax.set_title(text, fontsize=8, color=WRONG if wrong else RIGHT)
        if wrong:  # a red frame marks a mistake
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color(WRONG)
                spine.set_linewidth(2.5)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_history(epochs: list[dict], title: str = "Training") -> Figure:
    """Training and validation loss per epoch (left) and validation accuracy (right)."""
    x = [e["epoch"] for e in epochs]
    fig = Figure(figsize=(9, 3.6))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(x, [e["train_loss"] for e in epochs], "o-", label="training loss")
    ax_loss.plot(x, [e["valid_loss"] for e in epochs], "s-", label="validation loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.set_title("Loss per epoch")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_acc.plot(x, [100 * e["valid_acc"] for e in epochs], "o-", color="tab:green", label="validation accuracy")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("Validation accuracy")
    ax_acc.legend(loc="lower right")
    ax_acc.grid(alpha=0.3)
    for ax in (ax_loss, ax_acc):
        ax.set_xticks(x if len(x) <= 20 else ax.get_xticks())
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_confusion(matrix: np.ndarray, title: str = "Confusion matrix (validation)") -> Figure:
    """Counts as a heat map; rows are true labels, columns predictions, counts in the cells."""
    matrix = np.asarray(matrix)
    k = len(matrix)
    fig = Figure(figsize=(0.55 * k + 2.5, 0.55 * k + 2))
    ax = fig.subplots()
    im = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(im, ax=ax, label="images")
    threshold = matrix.max() / 2
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] > threshold else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_compare(histories: dict[str, list[dict]]) -> Figure:
    """Validation loss and accuracy per epoch of several runs, one line per run."""
    fig = Figure(figsize=(10, 3.8))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for name, epochs in histories.items():
        x = [e["epoch"] for e in epochs]
        ax_loss.plot(x, [e["valid_loss"] for e in epochs], "o-", label=name)
        ax_acc.plot(x, [100 * e["valid_acc"] for e in epochs], "o-", label=name)
    ax_loss.set(xlabel="epoch", ylabel="validation loss", title="Validation loss")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
