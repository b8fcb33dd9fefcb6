import shutil

import numpy as np
import pytest

import mnistlab
from mnistlab.data import mnist as data
from mnistlab.data.idx import encode_idx, parse_idx, read_bytes
from mnistlab.errors import DataError, UsageError

from .conftest import write_idx_dir


def test_load_mnist_shapes_dtypes_and_scaling():
    X, Y = mnistlab.load_mnist()
    assert X.shape == (70000, 784) and X.dtype == np.float32
    assert Y.shape == (70000,) and Y.dtype == np.int64
    assert X.min() == 0.0 and X.max() == 255 / 256
    np.testing.assert_array_equal(X[:100] * 256, np.round(X[:100] * 256))  # pixels / 256, exactly


def test_rows_are_in_openml_order(mnist):
    _, Y = mnistlab.load_mnist()
    assert Y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert Y[60000:60010].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(Y[:60000]).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_seed_split_and_its_first_nine_validation_labels():
    X, Y = mnistlab.load_mnist()
    x_train, y_train, x_valid, y_valid = mnistlab.split(X, Y)
    assert (len(x_train), len(y_train), len(x_valid), len(y_valid)) == (50000, 50000, 20000, 20000)
    assert y_valid[:9].reshape(3, 3).tolist() == [[3, 8, 6], [9, 6, 4], [5, 3, 8]]
    np.testing.assert_array_equal(x_valid[0], X[50000])


def test_standard_split_is_60000_10000():
    X, Y = mnistlab.load_mnist()
    x_train, _, x_valid, y_valid = mnistlab.split(X, Y, "standard")
    assert len(x_train) == 60000 and len(x_valid) == 10000 and y_valid[0] == 7


def test_split_rejects_unknown_names_and_mismatched_lengths():
    with pytest.raises(UsageError, match="unknown split 'half'; expected one of: seed, standard"):
        mnistlab.split(np.zeros((7, 2)), np.zeros(7), "half")
    with pytest.raises(UsageError, match="must match"):
        mnistlab.split(np.zeros((7, 2)), np.zeros(6))


def test_cache_is_written_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("MNISTLAB_CACHE", str(tmp_path))
    X1, Y1 = mnistlab.load_mnist()
    assert sorted(p.name for p in next(tmp_path.iterdir()).iterdir()) == [
        "images-float32.npy", "images.npy", "labels.npy"]
    X2, Y2 = mnistlab.load_mnist()
    np.testing.assert_array_equal(X1[::997], X2[::997])
    np.testing.assert_array_equal(Y1, Y2)
    X2[0, 0] = 7.0  # copy-on-write: the cache file is not changed
    assert mnistlab.load_mnist()[0][0, 0] == 0.0


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("MNISTLAB_CACHE", str(tmp_path))
    mnistlab.load_mnist()
    cached = next(tmp_path.iterdir()) / "images.npy"
    cached.write_bytes(b"not a numpy file")
    ds = data.load_dataset()
    assert ds.images.shape == (70000, 784) and ds.labels[0] == 5


def test_hash_mismatch_on_shipped_files_is_reported(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    shutil.copytree(data.SHIPPED_DIR, shipped)
    labels = parse_idx(read_bytes(shipped / "train-labels-idx1-ubyte.gz")).copy()
    labels[0] = 3  # a valid IDX file whose content is not MNIST's
    import gzip
    (shipped / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(encode_idx(labels)))
    monkeypatch.setattr(data, "SHIPPED_DIR", shipped)
    monkeypatch.setenv("MNISTLAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="SHA-256 .* expected 65a50cbbf4e906d7.*reinstall"):
        mnistlab.load_mnist()


def test_data_dir_with_raw_files_and_other_classes(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = np.arange(30, dtype=np.uint8) % 3
    d = write_idx_dir(tmp_path / "three", images[:20], labels[:20], images[20:], labels[20:], gz=False)
    ds = data.load_dataset(d)
    assert ds.n_train == 20 and ds.num_classes == 3
    np.testing.assert_array_equal(ds.images.reshape(-1, 28, 28), images)
    X, Y = mnistlab.load_mnist(data_dir=d)
    assert X.dtype == np.float32 and np.allclose(X * 256, images.reshape(30, -1))


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "missing t10k-labels-idx1-ubyte.gz"),
        ("count", "20 images but 19 labels"),
        ("shape", r"images have shape \(20, 14, 14\), expected \(N, 28, 28\)"),
    ],
)
def test_bad_data_dirs(tmp_path, case, message):
    images = np.zeros((20, 28, 28), np.uint8)
    labels = np.zeros(20, np.uint8)
    if case == "count":
        labels = labels[:19]
    if case == "shape":
        images = np.zeros((20, 14, 14), np.uint8)
    d = write_idx_dir(tmp_path / case, images, labels, np.zeros((5, 28, 28), np.uint8), np.zeros(5, np.uint8))
    if case == "missing":
        (d / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=message):
        data.load_dataset(d)


def test_missing_data_dir_and_unknown_source(tmp_path):
    with pytest.raises(DataError, match="data directory not found"):
        data.load_dataset(tmp_path / "nowhere")
    with pytest.raises(UsageError, match="unknown source 'web'; expected one of: shipped, openml"):
        mnistlab.load_mnist(source="web")


def test_openml_source_without_scikit_learn_says_how_to_install():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        with pytest.raises(UsageError, match=r"pip install 'mnistlab\[openml\]'"):
            mnistlab.load_mnist(source="openml")
    else:
        pytest.skip("scikit-learn is installed; fetching from OpenML needs the network")
