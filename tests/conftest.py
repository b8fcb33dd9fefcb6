"""Shared fixtures: the real shipped MNIST, and small MNIST-format folders cut from it."""

from __future__ import annotations

import numpy as np
import pytest

from mnistlab.data.idx import write_idx
from mnistlab.data.mnist import load_dataset


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """One cache for the whole session, outside the user's home."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MNISTLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request, monkeypatch):
    """Every test but the ``cuda``-marked ones (tests/test_cuda.py) expects the CPU's behaviour (the
    kernel engine, its bit-identical weights); on a machine with a GPU, ``--device auto`` would train
    there. Such tests run on the CPU, in this process and in those they start."""
    if request.node.get_closest_marker("cuda") is None:
        from mnistlab.train import device

        monkeypatch.setattr(device, "gpu_visible", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def mnist():
    return load_dataset()


def write_idx_dir(directory, train_images, train_labels, test_images, test_labels, gz=True):
    directory.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    write_idx(directory / f"train-images-idx3-ubyte{ext}", train_images)
    write_idx(directory / f"train-labels-idx1-ubyte{ext}", train_labels)
    write_idx(directory / f"t10k-images-idx3-ubyte{ext}", test_images)
    write_idx(directory / f"t10k-labels-idx1-ubyte{ext}", test_labels)
    return directory


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory, mnist):
    """600 training and 200 test images of real MNIST, as the four gzip IDX files."""
    images = mnist.images.reshape(-1, 28, 28)
    labels = mnist.labels.astype(np.uint8)
    return write_idx_dir(tmp_path_factory.mktemp("small") / "mnist-small",
                         images[:600], labels[:600], images[60000:60200], labels[60000:60200])
