import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnistlab import metrics, plots
from mnistlab.cli import main
from mnistlab.evaluation import predict_proba
from mnistlab.run.rundir import load_split, read_config
from mnistlab.run.summary import write_pictures
from mnistlab.run.trained import load_model

ROOT = Path(__file__).resolve().parents[1]


def assert_picture(path, min_size=(150, 150)):
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= min_size[0] and im.height >= min_size[1]
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    assert pixels.std() > 10, f"{path} looks blank"


def test_training_writes_every_picture(tmp_path, small_dir):
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(small_dir), "--epochs", "2", "--out", str(out)]) == 0
    for name in ("example.png", "loss.png", "predictions.png", "confusion.png", "mistakes.png"):
        assert_picture(out / name)
    _, _, x_valid, y_valid = load_split(read_config(out))
    analysis = write_pictures(tmp_path, predict_proba(load_model(out), x_valid), x_valid, y_valid, 10)
    assert analysis["confusion"].sum() == len(y_valid) == 229
    # rows are the true labels; the diagonal is what training's own validation counted right
    assert analysis["confusion"].sum(axis=1).tolist() == np.bincount(y_valid, minlength=10).tolist()
    summary = json.loads((out / "summary.json").read_text())
    assert np.trace(analysis["confusion"]) == round(summary["valid_acc"] * len(y_valid))


def test_metrics_against_a_hand_count():
    preds = np.array([0, 1, 1, 2, 2, 2])
    labels = np.array([0, 1, 2, 2, 2, 1])
    m = metrics.confusion_matrix(preds, labels, 3)
    assert m.tolist() == [[1, 0, 0], [0, 1, 1], [0, 1, 2]]
    rows = metrics.per_class(m)
    assert rows[2]["precision"] == pytest.approx(2 / 3) and rows[2]["recall"] == pytest.approx(2 / 3)
    assert rows[1]["f1"] == pytest.approx(0.5) and rows[0]["support"] == 1
    assert metrics.most_confused(m, top=5) == [{"true": 2, "predicted": 1, "count": 1},
                                               {"true": 1, "predicted": 2, "count": 1}]
    proba = np.array([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]])
    assert metrics.worst_mistakes(proba, np.array([0, 0, 0, 1])).tolist() == [2, 1, 3]


def test_history_picture_has_both_losses(tmp_path):
    epochs = [{"epoch": i, "train_loss": 1 / i, "valid_loss": 1.2 / i, "valid_acc": 0.8 + i / 100} for i in (1, 2, 3)]
    fig = plots.plot_history(epochs)
    labels = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
    assert labels == ["training loss", "validation loss", "validation accuracy"]
    assert_picture(plots.save(fig, tmp_path / "h.png"))


def test_show_writes_the_first_example_and_a_grid(tmp_path, capsys):
    assert main(["show", "--out", str(tmp_path / "one.png")]) == 0
    assert_picture(tmp_path / "one.png")
    assert main(["show", "--part", "valid", "--grid", "3", "3", "--out", str(tmp_path / "grid.png")]) == 0
    assert_picture(tmp_path / "grid.png", (300, 300))
    assert main(["show", "--index", "49999", "--grid", "2", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "the train part has 50000 images" in capsys.readouterr().err
    assert main(["show", "--out", str(tmp_path / "x.jpg")]) == 2


def test_walkthrough_example_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "walkthrough.py"), "--epochs", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "tensor([[3, 8, 6]," in out.stdout
    for name in ("first_example.png", "linear_loss.png", "cnn_loss.png", "predictions.png"):
        assert_picture(tmp_path / name)


def _red_pixels(path) -> int:
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.int32)
    return int(((rgb[..., 0] > 180) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)).sum())


def test_grid_frames_mistakes_in_red_and_scales_each_image(tmp_path, mnist):
    images, labels = mnist.images[:9], mnist.labels[:9]
    right = plots.save(plots.plot_grid(images, labels, 3, 3, labels), tmp_path / "right.png")
    wrong_preds = labels.copy()
    wrong_preds[[1, 7]] = (labels[[1, 7]] + 1) % 10
    wrong = plots.save(plots.plot_grid(images, labels, 3, 3, wrong_preds), tmp_path / "wrong.png")
    assert _red_pixels(right) == 0
    assert _red_pixels(wrong) > 2 * 4 * 100  # two frames around ~120-pixel-wide cells, and red titles
    dim = plots.save(plots.plot_grid(images // 4, labels, 3, 3), tmp_path / "dim.png")
    bright = plots.save(plots.plot_grid(images, labels, 3, 3), tmp_path / "bright.png")
    with Image.open(dim) as a, Image.open(bright) as b:  # each image is scaled to its own range
        assert np.abs(np.asarray(a, dtype=np.int32) - np.asarray(b, dtype=np.int32)).mean() < 2


def test_pictures_are_drawn_side_by_side_and_a_failing_child_is_redone_here(tmp_path):
    import os

    import pytest

    from mnistlab.run.summary import side_by_side

    where = {}

    def first():
        where["first"] = os.getpid()

    def second():
        (tmp_path / "second").write_text(str(os.getpid()))
        where["second"] = os.getpid()

    side_by_side(first, second)
    assert where == {"first": os.getpid()}  # second ran in another process...
    assert int((tmp_path / "second").read_text()) != os.getpid()  # ...and did its work

    calls = []

    def failing():
        calls.append(os.getpid())
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        side_by_side(lambda: None, failing)  # the child failed quietly; here it fails as usual
    assert calls == [os.getpid()]
