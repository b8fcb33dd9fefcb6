"""The web service: JSON and image predictions, every kind of bad request, and the drawing page."""

import io
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import mnistlab
from mnistlab.use.serve import create_app

from .test_use import TRAINED, redraw


@pytest.fixture(scope="module")
def client():
    return TestClient(create_app(TRAINED))


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_health_and_docs(client):
    assert client.get("/health").json() == {"status": "ok", "model": "CNN"}
    assert client.get("/docs").status_code == 200
    assert "/predict" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("shape", ["flat", "square"])
def test_json_pixels_match_the_classifier(client, mnist, shape):
    image = mnist.images[50000]
    pixels = image.tolist() if shape == "flat" else image.reshape(28, 28).tolist()
    body = client.post("/predict", json={"pixels": pixels}).json()
    expected = mnistlab.load_run(TRAINED).predict_proba(image[None])[0]
    assert body["label"] == int(expected.argmax()) == 3
    assert np.allclose(body["probabilities"], expected, atol=1e-5)


def test_fractions_and_bytes_are_one_image_over_http_and_in_python(client, mnist):
    """X[i].tolist() from load_mnist() (fractions) and the same image as bytes 0..255 give one answer,
    the one Classifier.predict gives for either form."""
    classifier = mnistlab.load_run(TRAINED)
    images = mnist.images[50000:50030]
    fractions = images.astype(np.float32) / 256
    expected = classifier.predict(images)
    assert classifier.predict(fractions).tolist() == expected.tolist()
    assert classifier.predict(images.astype(np.int64)).tolist() == expected.tolist()
    for image, fraction, label in zip(images, fractions, expected, strict=True):
        as_bytes = client.post("/predict", json={"pixels": image.tolist()}).json()
        as_fractions = client.post("/predict", json={"pixels": fraction.tolist()}).json()
        assert as_bytes["label"] == as_fractions["label"] == label
        assert as_bytes["probabilities"] == as_fractions["probabilities"]
        assert as_bytes["input"] == as_fractions["input"] == image.reshape(28, 28).tolist()
    # 0..255 written with decimal points is not guessed at: a 422 that says how to send it
    r = client.post("/predict", json={"pixels": [float(v) for v in images[0]]})
    assert r.status_code == 422 and "[0, 1]" in r.json()["error"] and "0..255" in r.json()["error"]


def test_openapi_documents_the_request_body_and_the_pixel_rule(client):
    body = client.get("/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]["content"]
    pixels = body["application/json"]["schema"]["properties"]["pixels"]
    assert "0..255" in pixels["description"] and "[0, 1]" in pixels["description"]
    examples = body["application/json"]["examples"]
    for example in examples.values():  # every documented example is accepted and means the same digit
        r = client.post("/predict", json=example["value"])
        assert r.status_code == 200, r.text
    answers = {k: client.post("/predict", json=e["value"]).json()["input"] for k, e in examples.items()}
    assert answers["bytes"] == answers["fractions"]
    assert {"multipart/form-data", "image/*"} <= set(body)


def test_uploaded_image_file(client, mnist):
    page = redraw(mnist.images[50001], np.random.default_rng(0))
    buf = io.BytesIO()
    page.save(buf, format="JPEG")
    r = client.post("/predict", files={"file": ("digit.jpg", buf.getvalue(), "image/jpeg")})
    assert r.status_code == 200 and r.json()["label"] == 8
    r = client.post("/predict", content=_png(np.asarray(page)), headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["label"] == 8


@pytest.mark.parametrize(
    "kwargs, status, message",
    [
        ({"files": {"file": ("x.png", b"not an image", "image/png")}}, 400, "not an image"),
        ({"files": {"file": ("x.png", _png(np.zeros((40, 40), np.uint8))[:50], "image/png")}}, 400, "corrupt"),
        ({"files": {"file": ("x.png", b"", "image/png")}}, 400, "empty file"),
        ({"files": {"file": ("x.png", _png(np.full((40, 40), 255, np.uint8)), "image/png")}}, 400, "blank image"),
        ({"files": {"other": ("x.png", b"abc", "image/png")}}, 422, "multipart field 'file'"),
        ({"json": {"pixels": [0] * 783}}, 422, "784 values"),
        ({"json": {"pixels": [[0] * 27] * 28}}, 422, "784 values"),
        ({"json": {"pixels": [[0] * 28] * 27 + [[0] * 27]}}, 422, "finite numbers"),
        ({"json": {"pixels": ["a"] * 784}}, 422, "finite numbers"),
        ({"json": {"pixels": ["1"] * 784}}, 422, "finite numbers"),
        ({"json": {"pixels": [True] * 784}}, 422, "finite numbers"),
        ({"json": {"pixels": 5}}, 422, "784 values"),
        ({"json": {"pixels": [300] * 784}}, 422, "0..255"),
        ({"json": {"pixels": [-1] * 784}}, 422, "0..255"),
        ({"json": {"pixels": [0.5] * 783 + [1.5]}}, 422, "[0, 1]"),
        ({"json": {"pixels": [0.5] * 783 + [-0.1]}}, 422, "[0, 1]"),
        ({"json": {"image": []}}, 422, 'expected JSON {"pixels"'),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "invalid JSON"),
    ],
)
def test_bad_requests_get_4xx_with_a_json_error_and_the_server_keeps_answering(client, kwargs, status, message):
    r = client.post("/predict", **kwargs)
    assert r.status_code == status
    assert message in r.json()["error"]
    assert client.get("/health").status_code == 200


def test_oversized_and_bomb_images_are_refused(client, monkeypatch):
    from mnistlab.use import prepare

    monkeypatch.setattr(prepare, "MAX_PIXELS", 10_000)
    r = client.post("/predict", files={"file": ("big.png", _png(np.zeros((200, 200), np.uint8)), "image/png")})
    assert r.status_code == 413 and "more than the 10000 allowed" in r.json()["error"]
    from mnistlab.use import serve

    monkeypatch.setattr(serve, "MAX_BYTES", 1000)
    r = client.post("/predict", content=b"x" * 5000, headers={"content-type": "image/png"})
    assert r.status_code == 413 and "larger than the 1000 bytes allowed" in r.json()["error"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(*extra):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mnistlab", "serve", str(TRAINED), "--port", str(port), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    assert proc.stdout.readline().decode() == f"serving {TRAINED} on {url}/ (Ctrl-C stops)\n"  # once bound
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                assert json.load(r)["status"] == "ok"
            return proc, url
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.2)


@pytest.fixture(scope="module")
def server():
    proc, url = _start_server()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def test_several_worker_processes_answer(mnist):
    proc, url = _start_server("--workers", "2")
    try:
        expected = mnistlab.load_run(TRAINED).predict(mnist.images[50000:50010])
        for image, label in zip(mnist.images[50000:50010], expected, strict=True):
            request = urllib.request.Request(url + "/predict", data=json.dumps({"pixels": image.tolist()}).encode(),
                                             headers={"content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as r:
                assert json.load(r)["label"] == label
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) is not None


def test_bad_ports_and_hosts_get_one_line_and_no_serving_message():
    def serve(*args):
        return subprocess.run([sys.executable, "-m", "mnistlab", "serve", str(TRAINED), *args],
                              capture_output=True, text=True, timeout=60)

    for port in ("0", "65536", "99999", "-1", "http"):
        r = serve("--port", port)
        assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
        assert "1-65535" in r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for workers in ("1", "2"):
            r = serve("--port", port, "--workers", workers)
            assert r.returncode == 1 and r.stdout == "", r.stdout
            assert r.stderr == f"mnistlab serve: error: 127.0.0.1:{port} is in use; choose another --port\n"
    r = serve("--host", "no-such-host.invalid", "--port", str(_free_port()))
    assert r.returncode == 1 and r.stdout == "" and len(r.stderr.splitlines()) == 1
    assert "no-such-host.invalid" in r.stderr and "resolve" in r.stderr


def test_the_server_binds_to_loopback_by_default(server):
    assert server.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(server + "/") as r:
        assert b"<canvas" in r.read()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed (.ci/run installs it)")
def test_drawing_on_the_page_shows_a_prediction(server):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        page = browser.new_page()
        page.goto(server + "/")
        box = page.locator("#pad").bounding_box()
        # A "1": one vertical stroke down the middle of the pad.
        page.mouse.move(box["x"] + 140, box["y"] + 40)
        page.mouse.down()
        for y in range(40, 241, 10):
            page.mouse.move(box["x"] + 140, box["y"] + y)
        page.mouse.up()
        page.wait_for_function("document.getElementById('label').dataset.label !== ''", timeout=10000)
        assert page.locator("#label").get_attribute("data-label") == "1"
        assert page.locator(".bar.top").get_attribute("data-class") == "1"
        assert int(page.locator("#seen").get_attribute("data-ink")) > 20  # the prepared 28x28 image is shown
        page.click("#clear")
        assert page.locator("#label").inner_text() == "–"
        browser.close()
