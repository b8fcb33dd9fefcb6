"""A web service for a trained run: ``POST /predict``, ``GET /health``, and a page to draw on.

``create_app(run_dir)`` builds the FastAPI app; ``mnistlab serve RUN_DIR`` runs it with uvicorn.
Checkpoints are loaded from safetensors + JSON: nothing is unpickled.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from importlib import resources

import numpy as np
import torch

from ..errors import MnistlabError, UsageError
from ..evaluation import prepare
from .classifier import load_run
from .prepare import MAX_BYTES, ImageError, as_pixels, prepare_image

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
except ImportError:  # pragma: no cover - exercised only without the extra
    FastAPI = None

RUN_DIR_ENV = "MNISTLAB_SERVE_RUN_DIR"  # how `serve --workers N` tells each worker process its run


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def _pixels_from_json(body) -> np.ndarray:
    """JSON ``{"pixels": ...}``: 784 values or 28 rows of 28, the ink bright, by the rule of
    :func:`mnistlab.use.prepare.as_pixels`: whole numbers (``0``, ``255``) are grayscale bytes 0..255;
    if any value has a fraction or decimal point (``0.5``, ``1.0``), all are MNIST-style fractions
    in [0, 1] (byte / 256, what ``load_mnist()`` and ``Classifier.predict`` take)."""
    if not isinstance(body, dict) or "pixels" not in body:
        raise _BadRequest(422, 'expected JSON {"pixels": [...]} with 784 values or 28x28 nested lists')
    try:
        arr = np.array(body["pixels"])  # no dtype: strings, booleans and ragged lists stay recognisable
    except (ValueError, TypeError):
        arr = None
    if arr is None or arr.dtype.kind not in "iuf" or arr.shape not in ((784,), (28, 28)):
        if arr is not None and arr.dtype.kind in "iuf":
            raise _BadRequest(422, f"pixels must hold 784 values (flat or 28x28), got shape {list(arr.shape)}")
        raise _BadRequest(422, "pixels must be finite numbers: a list of 784, or 28 lists of 28")
    try:
        return as_pixels(arr, "pixels")
    except ImageError as exc:
        raise _BadRequest(422, str(exc)) from None


_PIXELS_RULE = ("784 values, or 28 lists of 28, the ink bright. Whole numbers are grayscale bytes 0..255; if any "
                "value has a decimal point, all are MNIST-style fractions in [0, 1] (byte / 256), as load_mnist() "
                "gives them and Classifier.predict takes them. Convert fractions to bytes with round(v * 256), "
                "at most 255.")
_EXAMPLE = np.zeros((28, 28), np.uint8)
_EXAMPLE[4:24, 13:16] = 255  # a "1"
_REQUEST_BODY = {
    "description": "An image file (any format Pillow reads, any size, dark ink on light paper or the reverse), "
                   "as the raw body or the multipart field 'file'; or JSON pixels of an MNIST-style image.",
    "content": {
        "application/json": {
            "schema": {"type": "object", "required": ["pixels"], "properties": {"pixels": {
                "description": _PIXELS_RULE, "oneOf": [
                    {"type": "array", "items": {"type": "number"}, "minItems": 784, "maxItems": 784},
                    {"type": "array", "minItems": 28, "maxItems": 28,
                     "items": {"type": "array", "items": {"type": "number"}, "minItems": 28, "maxItems": 28}}]}}},
            "examples": {
                "bytes": {"summary": "grayscale bytes 0..255", "value": {"pixels": _EXAMPLE.tolist()}},
                "fractions": {"summary": "MNIST-style fractions in [0, 1] (byte / 256)",
                              "value": {"pixels": (_EXAMPLE / 256).round(4).tolist()}},
            },
        },
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary"}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
}


def create_app(run_dir: str | os.PathLike):
    if FastAPI is None:
        raise UsageError("serving needs FastAPI and uvicorn: pip install 'mnistlab[serve]'")
    classifier = load_run(run_dir)
    model = classifier.model.eval()
    name = model.__class__.__name__
    page = resources.files(__package__).joinpath("static/draw.html").read_text()
    app = FastAPI(title="mnistlab", description=f"Digit classifier from {run_dir}")

    @app.exception_handler(_BadRequest)
    async def bad_request(request: Request, exc: _BadRequest):
        return JSONResponse(status_code=exc.status, content={"error": exc.message})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": name}

    @app.post("/predict", response_model=None, openapi_extra={"requestBody": _REQUEST_BODY},
              responses={200: {"description": "the label, all probabilities and the 28x28 image the model saw",
                               "content": {"application/json": {"example": {
                                   "label": 7, "probabilities": [0.0] * 7 + [1.0, 0.0, 0.0],
                                   "input": [[0] * 28] * 28}}}},
                         422: {"description": "a body that is not an image, or pixels out of range",
                               "content": {"application/json": {"example": {"error": "pixels: ..."}}}}})
    async def predict(request: Request) -> Response:
        """An uploaded image file (multipart field ``file``, or the raw bytes) or JSON ``{"pixels": ...}``.

        JSON pixels: whole numbers are grayscale bytes 0..255 (``{"pixels": [0, 0, 255, ...]}``);
        if any value has a decimal point, all are MNIST-style fractions in [0, 1] (byte / 256,
        ``{"pixels": [0.0, 0.5, 0.99, ...]}``), as ``mnistlab.load_run(run).predict`` takes them.
        Image files are prepared as MNIST's digits were (inverted if light, cropped, 20 px, centred).

        Answers ``{"label": int, "probabilities": [float, ...] (one per class), "input": [[int] * 28] * 28}``:
        ``input`` is the 28x28 image the model saw, grayscale 0..255 (bytes; fractions times 256).
        """
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            body = await _read_limited(request)
            try:
                pixels = _pixels_from_json(json.loads(body))
            except ValueError:
                raise _BadRequest(422, "invalid JSON body") from None
        elif kind == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=4)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise _BadRequest(422, "expected an image in the multipart field 'file'")
            data = await upload.read(MAX_BYTES + 1)
            pixels = _prepare(data, upload.filename or "upload")
        else:
            pixels = _prepare(await _read_limited(request), "body")
        with torch.inference_mode():  # one (1, 784) image, uint8 or floats in [0, 1): straight to the model
            proba = torch.softmax(model(prepare(torch.from_numpy(pixels))).float(), dim=1)[0].tolist()
        label = max(range(len(proba)), key=proba.__getitem__)
        seen = pixels if pixels.dtype == np.uint8 else np.minimum(np.round(pixels * 256), 255).astype(np.uint8)
        body = json.dumps({"label": label, "probabilities": [round(p, 6) for p in proba],
                           "input": seen.reshape(28, 28).tolist()})
        return Response(body, media_type="application/json")  # skips FastAPI's generic serialisation

    return app


async def _read_limited(request) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BYTES:
            raise _BadRequest(413, f"request body larger than the {MAX_BYTES} bytes allowed")
        chunks.append(chunk)
    return b"".join(chunks)


def _prepare(data: bytes, name: str) -> np.ndarray:
    if len(data) > MAX_BYTES:
        raise _BadRequest(413, f"{name}: larger than the {MAX_BYTES} bytes allowed")
    try:
        return prepare_image(data, name).reshape(1, 784)
    except ImageError as exc:
        raise _BadRequest(413 if "allowed" in str(exc) else 400, str(exc)) from None


def app_from_env():
    """The app of the run named by ``$MNISTLAB_SERVE_RUN_DIR``: what each worker process builds."""
    # One image per request: a second intra-op thread only spins and steals the CPU that
    # the event loop needs (measured: benchmarks/bench_serve.py).
    torch.set_num_threads(1)
    return create_app(os.environ[RUN_DIR_ENV])


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port``, or one line saying why not (port in use, unknown host)."""
    if not 1 <= port <= 65535:
        raise UsageError(f"--port {port}: expected a port in 1..65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise MnistlabError(f"--host {host}: cannot resolve it ({getattr(exc, 'strerror', None) or exc})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart after a stop
        sock.bind(address)
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise MnistlabError(f"{where} is in use; choose another --port") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise MnistlabError(f"--host {host}: not an address of this machine") from None
        if exc.errno == errno.EACCES:
            raise MnistlabError(f"{where}: permission denied (ports below 1024 need privileges); "
                                f"choose another --port") from None
        raise MnistlabError(f"{where}: cannot listen there ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def serve(run_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          on_ready=None) -> None:
    """Serve ``run_dir`` on ``host``:``port`` until interrupted. ``on_ready(url)`` is called once the
    port is bound and the model loaded, before requests are taken."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    os.environ[RUN_DIR_ENV] = str(run_dir)
    if workers == 1:
        app = app_from_env()
        config = uvicorn.Config(app, log_level="warning")
    else:  # uvicorn starts the processes; each imports this module and builds its own app
        create_app(run_dir)  # a bad run directory fails here, once, with a clear message
        config = uvicorn.Config(f"{__name__}:app_from_env", factory=True, workers=workers, log_level="warning")
    sock = bind(host, port)
    with sock:
        if on_ready is not None:
            shown = f"[{host}]" if ":" in host else host
            on_ready(f"http://{shown}:{sock.getsockname()[1]}/")
        if workers == 1:
            uvicorn.Server(config).run(sockets=[sock])
        else:
            Multiprocess(config, sockets=[sock]).run()
