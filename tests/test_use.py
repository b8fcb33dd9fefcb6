"""Your own images: MNIST-style preparation, load_run, and `mnistlab predict IMAGE...`."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

import mnistlab
from mnistlab.cli import main
from mnistlab.use.prepare import ImageError, prepare_array, prepare_image

TRAINED = Path(__file__).parent / "data" / "cnn-seed0"  # see tests/data/README.md


@pytest.fixture(scope="module")
def trained():
    """The seed's CNN after `mnistlab train --model cnn` (96.67% validation accuracy)."""
    return TRAINED


def redraw(image, rng):
    """An MNIST digit as a user might draw it: dark ink on white, any size, anywhere on a 300x200 page."""
    digit = Image.fromarray(255 - image.reshape(28, 28))
    size = int(rng.integers(40, 180))
    digit = digit.resize((size, size), Image.Resampling.BICUBIC)
    page = Image.new("L", (300, 200), 255)
    margin = size // 8  # inside MNIST's own empty border, so no ink is cut off
    left = int(rng.integers(-margin, 300 - size + margin))
    top = int(rng.integers(-margin, 200 - size + margin))
    page.paste(digit, (left, top))
    return page


def test_redrawn_validation_digits_are_classified_like_the_originals(trained, mnist):
    classifier = mnistlab.load_run(trained)
    x, y = mnist.images[50000:51000], mnist.labels[50000:51000]
    rng = np.random.default_rng(0)
    original = (classifier.predict(x) == y).mean()
    redrawn = (classifier.predict([redraw(im, rng) for im in x]) == y).mean()
    print(f"accuracy: originals {original:.3f}, redrawn {redrawn:.3f}")
    assert original > 0.95
    assert redrawn >= original - 0.01


def test_preparation_matches_mnist_conventions(mnist):
    rng = np.random.default_rng(1)
    prepared = prepare_image(redraw(mnist.images[50000], rng))
    assert prepared.shape == (28, 28) and prepared.dtype == np.uint8
    ys, xs = np.nonzero(prepared)
    assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 <= 21  # longer side scaled to 20 px
    total = prepared.astype(np.float64).sum()
    cy = (np.arange(28)[:, None] * prepared).sum() / total
    cx = (np.arange(28)[None, :] * prepared).sum() / total
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5  # centre of mass where MNIST's digits have it
    # Light ink on dark and dark ink on light give the same result.
    page = np.asarray(redraw(mnist.images[50000], np.random.default_rng(2)), dtype=np.float32)
    np.testing.assert_array_equal(prepare_array(page), prepare_array(255 - page))


def _centres(images: np.ndarray) -> np.ndarray:
    """Centre of mass (row, column) of each 28x28 image, 0-based pixel coordinates, (N, 2)."""
    images = images.reshape(-1, 28, 28).astype(np.float64)
    total = images.sum(axis=(1, 2))
    rows = (images.sum(axis=2) * np.arange(28)).sum(axis=1) / total
    cols = (images.sum(axis=1) * np.arange(28)).sum(axis=1) / total
    return np.stack([rows, cols], axis=1)


def test_prepared_digits_keep_mnists_centre_of_mass(mnist):
    """Preparing MNIST's own digits, as they are and redrawn elsewhere at other sizes, puts their centre
    of mass where MNIST has it: on average within a quarter pixel of the originals', each within one."""
    originals = mnist.images[60000:60500]
    rng = np.random.default_rng(4)
    for pictures in (originals.reshape(-1, 28, 28), [np.asarray(redraw(im, rng), np.float32) for im in originals]):
        prepared = np.stack([prepare_array(np.asarray(p, np.float32)) for p in pictures])
        moved = _centres(prepared) - _centres(originals)
        assert np.all(np.abs(moved.mean(axis=0)) < 0.25), moved.mean(axis=0)
        assert np.all(np.abs(moved) < 1.0), np.abs(moved).max(axis=0)


def test_classifier_accepts_every_documented_input(trained, mnist, tmp_path):
    classifier = mnistlab.load_run(trained)
    x = mnist.images[50000:50004]
    expected = classifier.predict(x)
    assert classifier.predict(x.reshape(4, 28, 28)).tolist() == expected.tolist()
    assert classifier.predict(x.astype(np.float32) / 256).tolist() == expected.tolist()
    proba = classifier.predict_proba(x)
    assert proba.shape == (4, 10) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    path = tmp_path / "digit.png"
    redraw(x[0], np.random.default_rng(3)).save(path)
    assert classifier.predict([path]).shape == (1,)
    assert classifier.predict(str(path)).tolist() == classifier.predict(Image.open(path)).tolist()
    with pytest.raises(ValueError, match=r"shape \(N, 28, 28\) or \(N, 784\)"):
        classifier.predict(np.zeros((2, 10)))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        classifier.predict(np.full((1, 784), 3.0))
    # integers are grayscale bytes, whatever their dtype; out of 0..255 they are refused
    assert classifier.predict(x.astype(np.int32)).tolist() == expected.tolist()
    with pytest.raises(ValueError, match=r"0\.\.255"):
        classifier.predict(np.full((1, 784), 256))


def test_predict_cli_on_image_files(trained, mnist, tmp_path, capsys):
    rng = np.random.default_rng(4)
    paths = []
    for i, fmt in enumerate(["png", "jpeg", "bmp"]):
        path = tmp_path / f"d{i}.{fmt}"
        redraw(mnist.images[50000 + i], rng).save(path)
        paths.append(str(path))
    assert main(["predict", str(trained), *paths, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in rows] == paths
    for r in rows:
        assert len(r["probabilities"]) == 10 and abs(sum(r["probabilities"]) - 1) < 1e-3
        assert r["label"] == int(np.argmax(r["probabilities"]))
    assert main(["predict", str(trained), paths[0]]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{paths[0]}: {rows[0]['label']}  (") and line.count(":") == 4


def _png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b"this is plain text, not a picture", "not an image Pillow can read"),
        (_png_bytes(np.full((50, 50), 255, np.uint8))[:60], "corrupt or truncated image"),
        (_png_bytes(np.full((50, 50), 255, np.uint8)), "blank image"),
    ],
)
def test_bad_images_give_one_line_errors(trained, tmp_path, capsys, content, message):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    assert main(["predict", str(trained), str(path)]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ImageError, match=message):
        prepare_image(path)


def test_size_limits(monkeypatch, tmp_path):
    from mnistlab.use import prepare

    path = tmp_path / "big.png"
    path.write_bytes(_png_bytes(np.zeros((300, 300), np.uint8)))
    monkeypatch.setattr(prepare, "MAX_PIXELS", 10_000)
    with pytest.raises(ImageError, match="300x300 pixels, more than the 10000 allowed"):
        prepare_image(path)
    monkeypatch.setattr(prepare, "MAX_BYTES", 100)
    with pytest.raises(ImageError, match="larger than the 100 allowed"):
        prepare_image(path)
    with pytest.raises(ImageError, match="file not found"):
        prepare_image(tmp_path / "absent.png")


@settings(max_examples=60, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_preparation_never_fails_except_with_its_documented_error(array):
    try:
        out = prepare_array(array)
    except ImageError as exc:
        assert "blank image" in str(exc)
    else:
        assert out.shape == (28, 28) and out.dtype == np.uint8 and out.max() > 0


_DIGIT_PNG = _png_bytes(255 - np.kron(np.eye(8, dtype=np.uint8) * 255, np.ones((4, 4), np.uint8)))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_mutated_image_files_give_a_picture_or_an_image_error(data):
    """Fuzz the file path of predict: corrupt, cut and extend a real PNG."""
    blob = bytearray(_DIGIT_PNG)
    for _ in range(data.draw(st.integers(0, 6))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    blob = bytes(blob[: data.draw(st.integers(0, len(blob)))]) + data.draw(st.binary(max_size=16))
    try:
        out = prepare_image(blob)
    except ImageError as exc:
        assert str(exc)
    else:
        assert out.shape == (28, 28) and out.dtype == np.uint8
