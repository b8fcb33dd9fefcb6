"""MNIST as arrays: the shipped IDX files, any MNIST-format directory, and the seed's split.

The four original MNIST files ship inside the package (``data/_mnist``). On first use
their decompressed bytes are checked against the published SHA-256 values and the
decoded arrays are cached as uint8 ``.npy`` files, so later loads are a memory copy.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import DataError, UsageError
from .idx import parse_idx, read_bytes

SHIPPED_DIR = Path(__file__).parent / "_mnist"

# Part name -> (file stem, SHA-256 of the decompressed MNIST file).
MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train_labels": ("train-labels-idx1-ubyte", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "test_images": ("t10k-images-idx3-ubyte", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "test_labels": ("t10k-labels-idx1-ubyte", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}
IMAGE_SIDE = 28
SPLITS = ("seed", "standard", "holdout")
# The splits whose validation part holds no test image: the only ones to choose settings on.
TUNING_SPLITS = ("holdout",)
SOURCES = ("shipped", "openml")


@dataclass(frozen=True)
class Dataset:
    """A whole MNIST-format dataset: the training files' rows first, then the test files'."""

    images: np.ndarray  # (N, 784) uint8, raw pixel values 0..255
    labels: np.ndarray  # (N,) int64
    n_train: int  # rows that came from the training files
    name: str = "mnist"

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1


def cache_dir() -> Path:
    """Where decoded arrays are cached: ``$MNISTLAB_CACHE`` or ``$XDG_CACHE_HOME/mnistlab``."""
    if os.environ.get("MNISTLAB_CACHE"):
        return Path(os.environ["MNISTLAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mnistlab"


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (directory / name).exists():
            return directory / name
    raise DataError(f"{directory}: missing {stem}.gz (or {stem}); expected the four MNIST-format IDX files")


def _read_part(directory: Path, part: str, sha256: str | None) -> np.ndarray:
    path = _find(directory, MNIST_FILES[part][0])
    data = read_bytes(path)
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise DataError(
                f"{path}: SHA-256 of the decompressed content is {digest[:16]}..., expected {sha256[:16]}...; "
                "the shipped file is corrupt, reinstall mnistlab"
            )
    return parse_idx(data, name=str(path))


def _check_pair(images: np.ndarray, labels: np.ndarray, where: str) -> None:
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(f"{where}: images have shape {images.shape}, expected (N, 28, 28)")
    if labels.ndim != 1:
        raise DataError(f"{where}: labels have shape {labels.shape}, expected (N,)")
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels; the counts must match")


def _read_dir(directory: Path, verify: bool) -> Dataset:
    parts = {p: _read_part(directory, p, sha if verify else None) for p, (_, sha) in MNIST_FILES.items()}
    _check_pair(parts["train_images"], parts["train_labels"], f"{directory} (train files)")
    _check_pair(parts["test_images"], parts["test_labels"], f"{directory} (t10k files)")
    images = np.concatenate([parts["train_images"], parts["test_images"]]).reshape(-1, IMAGE_SIDE * IMAGE_SIDE)
    labels = np.concatenate([parts["train_labels"], parts["test_labels"]]).astype(np.int64)
    if len(labels) == 0:
        raise DataError(f"{directory}: the IDX files hold no images")
    return Dataset(images, labels, n_train=len(parts["train_labels"]), name=directory.name)


def _cache_key() -> str:
    return hashlib.sha256("".join(sha for _, sha in MNIST_FILES.values()).encode()).hexdigest()[:16]


def _cached_array(path: Path, dtype, shape) -> np.ndarray | None:
    """A cached .npy as a copy-on-write memory map: no read, no fresh memory until written to."""
    try:
        arr = np.load(path, mmap_mode="c")
    except (OSError, ValueError, EOFError):
        return None
    return np.asarray(arr) if arr.dtype == dtype and arr.shape == shape else None


def _load_cached(path: Path) -> Dataset | None:
    images = _cached_array(path / "images.npy", np.uint8, (70000, 784))
    labels = _cached_array(path / "labels.npy", np.uint8, (70000,))
    if images is None or labels is None:
        return None
    return Dataset(images, labels.astype(np.int64), n_train=60000)


def _save_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _store(path: Path, name: str, array: np.ndarray) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        _save_atomic(path / name, array)
    except OSError:
        pass  # an unwritable cache only costs speed


def _mnist_cache() -> Path:
    return cache_dir() / f"mnist-{_cache_key()}"


def load_dataset(data_dir: str | os.PathLike | None = None, cache: bool = True) -> Dataset:
    """Load MNIST (shipped, hash-verified, cached) or the four IDX files in ``data_dir``."""
    if data_dir is not None:
        directory = Path(data_dir)
        if not directory.is_dir():
            raise DataError(f"data directory not found: {directory}; expected a folder with the four IDX files")
        return _read_dir(directory, verify=False)
    where = _mnist_cache()
    if cache and (ds := _load_cached(where)) is not None:
        return ds
    ds = replace(_read_dir(SHIPPED_DIR, verify=True), name="mnist")
    if cache:
        _store(where, "images.npy", ds.images)
        _store(where, "labels.npy", ds.labels.astype(np.uint8))
    return ds


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 divided by 256, as the seed does (exact: 256 is a power of two)."""
    return np.multiply(images, np.float32(1 / 256), dtype=np.float32)


def load_mnist(source: str = "shipped", data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``X`` float32 (70000, 784), pixels / 256, and ``Y`` int64 (70000,), in OpenML order.

    ``source="openml"`` fetches ``mnist_784`` with scikit-learn, exactly as the seed does
    (needs the network and ``pip install 'mnistlab[openml]'``).
    """
    if source not in SOURCES:
        raise UsageError(f"unknown source {source!r}; expected one of: {', '.join(SOURCES)}")
    if source == "openml":
        return _load_openml()
    if data_dir is not None:
        ds = load_dataset(data_dir)
        return to_float(ds.images), ds.labels.copy()
    return _load_mnist_float()


def _load_mnist_float() -> tuple[np.ndarray, np.ndarray]:
    # The float32 array (220 MB) is cached too and memory-mapped copy-on-write: faster
    # than converting, and pages are shared between processes until one is written to.
    where = _mnist_cache()
    ds = load_dataset()
    path = where / "images-float32.npy"
    X = _cached_array(path, np.float32, (70000, 784))
    if X is None and _store_float(path, ds.images):
        X = _cached_array(path, np.float32, (70000, 784))
    if X is None:
        X = to_float(ds.images)
    return X, ds.labels.copy()


def _store_float(path: Path, images: np.ndarray, rows: int = 8192) -> bool:
    """Write ``to_float(images)`` to ``path`` as .npy, converting in chunks (no 220 MB temporary)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=images.shape)
        for i in range(0, len(images), rows):
            out[i : i + rows] = to_float(images[i : i + rows])
        out.flush()
        del out
        os.replace(tmp, path)
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        return False


def _load_openml() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import fetch_openml
    except ImportError:
        raise UsageError("source='openml' needs scikit-learn: pip install 'mnistlab[openml]'") from None
    X, Y = fetch_openml("mnist_784", return_X_y=True, as_frame=False)
    return np.float32(X / 256), np.int64(Y)


def split_sizes(n: int, how: str = "seed", n_train: int = 60000) -> tuple[int, int]:
    """Sizes of the train and validation parts for ``n`` rows."""
    if how not in SPLITS:
        raise UsageError(f"unknown split {how!r}; expected one of: {', '.join(SPLITS)}")
    if how == "seed":
        first, stop = round(n * 5 / 7), n
    elif how == "standard":
        first, stop = n_train, n
    else:
        first, stop = round(min(n_train, n) * 5 / 6), min(n_train, n)
    if not 0 < first < stop:
        raise UsageError(f"split {how!r} of {n} rows leaves an empty part (train {first}, valid {stop - first})")
    return first, stop - first


def split(X, Y, how: str = "seed", n_train: int = 60000):
    """``x_train, y_train, x_valid, y_valid``.

    ``"seed"``: the walk-through's 5:2 split (first 50,000 rows train, last 20,000 valid).
    ``"standard"``: the classic split, the first ``n_train`` rows (MNIST's 60,000
    training images) train, the rest (the 10,000 test images) valid.
    ``"holdout"``: for choosing hyperparameters without looking at the test images: the
    training images alone, their first five sixths (50,000) train, the last sixth
    (10,000) valid.
    """
    if len(X) != len(Y):
        raise UsageError(f"X has {len(X)} rows but Y has {len(Y)}; they must match")
    first, size = split_sizes(len(X), how, n_train)
    return X[:first], Y[:first], X[first : first + size], Y[first : first + size]
