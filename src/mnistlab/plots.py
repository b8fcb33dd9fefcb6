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
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from .files import write_bytes_atomic

WRONG = "tab:red"
RIGHT = "black"


def save(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` atomically (a watcher never sees half a PNG).

    Every figure here lays itself out with fixed margins, so it is drawn once: ``tight_layout``
    or ``bbox_inches="tight"`` would draw it twice.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return write_bytes_atomic(path, buf.getvalue())


def _square(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32).reshape(28, 28)


def _margins(fig: Figure, left: float, right: float, bottom: float, top: float, **spacing) -> None:
    """Fixed margins in inches: cheaper than ``tight_layout``, which draws the figure an extra time."""
    w, h = fig.get_figwidth(), fig.get_figheight()
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h, **spacing)


def plot_example(image, label: int | None = None, title: str | None = None) -> Figure:
    """One image in gray, as the seed's ``plt.imshow(x_train[0].reshape((28, 28)), cmap="gray")``."""
    fig = Figure(figsize=(3.2, 3.4))
    ax = fig.subplots()
    ax.imshow(_square(image), cmap="gray")
    ax.set_title(title or (f"label {label}" if label is not None else "image"))
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
    _margins(fig, 0.6, 0.15, 0.5, 0.35)
    return fig


# Image grids, in inches: each cell is a title band above a square image, cells apart by GAP.
CELL, TITLE_BAND, GAP, MARGIN, SUPTITLE_BAND = 1.25, 0.36, 0.15, 0.1, 0.4


def plot_grid(images, labels, rows: int, cols: int, predictions=None, title: str | None = None,
              probabilities=None) -> Figure:
    """A rows x cols grid of images titled with their labels (and predictions, mistakes in red).

    One axes holds every image as a single montage, with the titles and red frames drawn on
    it: several times faster to draw than an axes per image, and it looks the same. Each
    image is scaled to its own darkest and lightest pixel, as ``imshow`` does alone.
    """
    n = min(rows * cols, len(images))
    pitch = CELL + GAP  # inches from one cell to the next
    height, width = rows * (TITLE_BAND + pitch) - GAP, cols * pitch - GAP
    top = SUPTITLE_BAND if title else 0.0
    fig_width = max(width, 0.11 * len(title or "")) + 2 * MARGIN  # room for the title
    fig = Figure(figsize=(fig_width, height + 2 * MARGIN + top))
    ax = fig.add_axes(((fig_width - width) / 2 / fig_width, MARGIN / fig.get_figheight(),
                       width / fig_width, height / fig.get_figheight()))
    ax.axis("off")
    px = 28 / CELL  # montage pixels per inch: one image pixel per source pixel
    montage = np.full((round(height * px), round(width * px)), np.nan, dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        x0, y0 = round(c * pitch * px), round((r * (TITLE_BAND + pitch) + TITLE_BAND) * px)
        image = _square(images[i])
        low, high = float(image.min()), float(image.max())
        montage[y0 : y0 + 28, x0 : x0 + 28] = (image - low) / (high - low) if high > low else 0.0
        if predictions is None:
            ax.text(x0 + 14, y0 - 2, f"label {int(labels[i])}", ha="center", va="bottom", fontsize=9)
            continue
        wrong = int(predictions[i]) != int(labels[i])
        text = f"pred {int(predictions[i])} / true {int(labels[i])}"
        if probabilities is not None:
            text += f"\np={float(probabilities[i]):.2f}"
        ax.text(x0 + 14, y0 - 2, text, ha="center", va="bottom", fontsize=8, color=WRONG if wrong else RIGHT)
        if wrong:  # a red frame marks a mistake
            ax.add_patch(Rectangle((x0 - 1, y0 - 1), 29, 29, fill=False, edgecolor=WRONG, linewidth=2.5))
    ax.imshow(montage, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlim(-1.5, montage.shape[1] + 0.5)
    ax.set_ylim(montage.shape[0] + 0.5, -1.5)
    if title:
        fig.suptitle(title, y=1 - 0.1 / fig.get_figheight(), va="top")
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
    _margins(fig, 0.75, 0.2, 0.55, 0.75, wspace=0.3)
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
    _margins(fig, 0.7, 0.35, 0.6, 0.45)
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
    _margins(fig, 0.75, 0.2, 0.55, 0.4, wspace=0.3)
    return fig


def plot_search_history(trials: list[dict]) -> Figure:
    """A search's trials in order: each finished trial's validation accuracy (pruned ones at their last
    reported epoch are left out), and the best so far."""
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.subplots()
    done = [t for t in trials if t["state"] == "complete" and t["valid_acc"] is not None]
    x = [t["number"] for t in done]
    y = [100 * t["valid_acc"] for t in done]
    ax.plot(x, y, "o", color="tab:blue", label="trial")
    best = [max(y[: k + 1]) for k in range(len(y))]
    ax.step(x, best, where="post", color="tab:red", label="best so far")
    pruned = sum(t["state"] == "pruned" for t in trials)
    ax.set(xlabel="trial", ylabel="validation accuracy (%)",
           title=f"Search: {len(done)} trials finished, {pruned} pruned")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if done:
        ax.legend(fontsize=8)
    _margins(fig, 0.75, 0.2, 0.55, 0.4)
    return fig


def plot_importances(importances: dict[str, float]) -> Figure:
    """How much of the accuracy's variation each searched setting explains (Optuna's estimate)."""
    names = list(importances)[::-1]
    fig = Figure(figsize=(6.4, 0.5 + 0.35 * max(len(names), 1) + 0.8))
    ax = fig.subplots()
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set(xlabel="importance (share of the variation explained)", title="Settings' importance")
    if not names:
        ax.text(0.5, 0.5, "too few finished trials", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3, axis="x")
    _margins(fig, 1.4, 0.2, 0.55, 0.4)
    return fig


def plot_dataset(part: str = "train", index: int = 0, grid: tuple[int, int] | None = None, split: str = "seed",
                 data_dir: str | os.PathLike | None = None) -> Figure:
    """Images of a dataset's ``part`` ("train" or "valid") of ``split``, from ``index``: one image,
    or a ``grid`` (rows, cols) of them with their labels."""
    from .data.mnist import load_dataset
    from .data.mnist import split as split_data
    from .errors import UsageError

    ds = load_dataset(data_dir)
    x_train, y_train, x_valid, y_valid = split_data(ds.images, ds.labels, split, n_train=ds.n_train)
    images, labels = (x_train, y_train) if part == "train" else (x_valid, y_valid)
    rows, cols = grid or (1, 1)
    count = rows * cols
    if not 0 <= index or index + count > len(images):
        raise UsageError(f"--index {index}: the {part} part has {len(images)} images "
                         f"(0..{len(images) - 1}); {count} from --index must fit")
    if grid:
        return plot_grid(images[index : index + count], labels[index : index + count], rows, cols,
                         title=f"{part} images {index}-{index + count - 1}")
    return plot_example(images[index], int(labels[index]), f"{part} image {index}: label {int(labels[index])}")
