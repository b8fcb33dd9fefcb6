import gzip

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from mnistlab.data.idx import encode_idx, parse_idx, read_idx, write_idx
from mnistlab.errors import DataError


@settings(max_examples=50, deadline=None)
@given(arrays(np.uint8, array_shapes(min_dims=1, max_dims=4, max_side=6)))
def test_encode_parse_round_trip(array):
    back = parse_idx(encode_idx(array))
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("name", ["x.gz", "x"])
def test_write_read_round_trip_gzip_and_raw(tmp_path, name):
    array = np.arange(2 * 28 * 28, dtype=np.uint64).astype(np.uint8).reshape(2, 28, 28)
    path = write_idx(tmp_path / name, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    np.testing.assert_array_equal(read_idx(path), array)


def test_header_matches_the_mnist_layout():
    data = encode_idx(np.zeros((3, 28, 28), np.uint8))
    assert data[:4] == b"\x00\x00\x08\x03"
    assert int.from_bytes(data[4:8], "big") == 3
    assert len(data) == 16 + 3 * 784


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x00\x00\x08\x03" + (1).to_bytes(4, "big"), "truncated IDX header"),
        (b"\x00\x00\x0d\x01" + (1).to_bytes(4, "big") + b"\x00" * 4, "wrong IDX magic number 0x00000D01"),
        (b"\x12\x34\x08\x01" + (1).to_bytes(4, "big") + b"\x00", "wrong IDX magic number"),
        (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x00\x01", "truncated data"),
        (b"\x00\x00\x08\x01" + (1).to_bytes(4, "big") + b"\x00\x01", "trailing data"),
        (b"\x00\x00", "too short"),
    ],
)
def test_malformed_bytes_raise_a_clear_error(data, message):
    with pytest.raises(DataError, match=message):
        parse_idx(data)


def test_corrupt_gzip_and_missing_file(tmp_path):
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(encode_idx(np.zeros(10, np.uint8)))[:-8] + b"garbage!")
    with pytest.raises(DataError, match="corrupt gzip"):
        read_idx(bad)
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "absent.gz")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_files_give_an_array_or_a_data_error(data):
    """Fuzz: flip, cut and extend valid IDX bytes (header included); never any other exception."""
    original = bytearray(encode_idx(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)))
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.integers(0, len(original) - 1))
        original[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(original)))
    blob = bytes(original[:cut]) + data.draw(st.binary(max_size=8))
    try:
        array = parse_idx(blob)
    except DataError as exc:
        assert str(exc)
    else:
        assert array.dtype == np.uint8 and array.size == len(blob) - 4 - 4 * array.ndim


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64), st.sampled_from(["raw", "gzip magic", "gzip"]))
def test_random_bytes_never_crash_the_reader(tmp_path_factory, blob, form):
    path = tmp_path_factory.mktemp("fuzz") / "x.gz"
    content = {"raw": blob, "gzip magic": b"\x1f\x8b" + blob, "gzip": gzip.compress(blob)}[form]
    path.write_bytes(content)
    try:
        read_idx(path)
    except DataError as exc:
        assert str(exc)


def test_a_hostile_header_cannot_overflow():
    header = b"\x00\x00\x08\x04" + b"\xff\xff\xff\xff" * 4
    with pytest.raises(DataError, match="truncated data"):
        parse_idx(header)
