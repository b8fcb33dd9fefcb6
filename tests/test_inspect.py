"""evaluate's per-class table, report.html and compare, on a short real run."""

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from mnistlab.cli import main

from .test_plots import assert_picture


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, small_dir):
    root = tmp_path_factory.mktemp("inspect")
    for model in ("cnn", "linear"):
        assert main(["train", "--model", model, "--data-dir", str(small_dir), "--epochs", "2",
                     "--out", str(root / model)]) == 0
    return root / "cnn", root / "linear"


def test_evaluate_reports_per_class_figures(two_runs, capsys):
    run, _ = two_runs
    assert main(["evaluate", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    matrix = np.array(result["confusion"])
    assert matrix.sum() == result["n_valid"] == 229
    assert np.trace(matrix) / matrix.sum() == pytest.approx(result["valid_acc"])
    assert [r["support"] for r in result["per_class"]] == matrix.sum(axis=1).tolist()
    for pair in result["most_confused"]:
        assert matrix[pair["true"], pair["predicted"]] == pair["count"] > 0
    assert main(["evaluate", str(run)]) == 0
    text = capsys.readouterr().out
    assert "precision" in text and "most confused (true->predicted)" in text
    assert len(re.findall(r"^\s+\d\s+\d\.\d{4}", text, re.M)) == 10


def test_report_is_one_self_contained_page(two_runs, capsys):
    run, _ = two_runs
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 5
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.format == "PNG" and im.width > 100
    assert page.count("<tr><td>") == 2  # one metrics row per epoch
    assert "http" not in page.replace("<!DOCTYPE html>", "")  # nothing loaded from elsewhere


def test_compare_draws_both_runs(two_runs, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    assert main(["compare", *map(str, two_runs), "--out", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["cnn", "linear"]
    summary = json.loads((two_runs[1] / "summary.json").read_text())
    assert rows[1]["valid_acc"] == summary["valid_acc"]
    assert_picture(out, (400, 200))
    assert main(["compare", str(two_runs[0]), str(tmp_path / "nope")]) == 2


def _browser():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_browser() is None, reason="headless Chromium is not installed (.ci/run installs it)")
def test_report_renders_in_a_real_browser(two_runs, tmp_path):
    run, _ = two_runs
    assert main(["report", str(run)]) == 0
    shot = tmp_path / "shot.png"
    subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2400",
                    f"--screenshot={shot}", (run / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    # The pictures fill much of the page: many dark pixels (digits on black), not a blank page.
    assert pixels.std() > 30
    assert (pixels < 50).mean() > 0.02
