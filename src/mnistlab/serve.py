"""A web service for a trained run: ``POST /predict``, ``GET /health``, and a page to draw on.

``create_app(run_dir)`` builds the FastAPI app; ``mnistlab serve RUN_DIR`` runs it with uvicorn.
Checkpoints are loaded from safetensors + JSON: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from importlib import resources

import numpy as np
import torch

from .classifier import load_run
from .errors import UsageError
from .evaluation import prepare
from .prepare import MAX_BYTES, ImageError, prepare_image

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
    """JSON ``{"pixels": ...}``: 784 values or 28 rows of 28, grayscale 0..255 with the ink bright."""
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
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise _BadRequest(422, "pixels must be finite numbers")
    if arr.min() < 0 or arr.max() > 255:
        raise _BadRequest(422, "pixel values must lie in 0..255")
    return (arr / 256).reshape(1, 784)


def create_app(run_dir: str | os.PathLike):
    if FastAPI is None:
        raise UsageError("serving needs FastAPI and uvicorn: pip install 'mnistlab[serve]'")
    classifier = load_run(run_dir)
    model = classifier.model.eval()
    name = model.__class__.__name__
    page = resources.files("mnistlab").joinpath("static/draw.html").read_text()
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

    @app.post("/predict", response_model=None, responses={200: {"description": "the label and all probabilities",
                                                             "content": {"application/json": {"example": {
                                                                 "label": 7, "probabilities": [0.0] * 10}}}}})
    async def predict(request: Request) -> Response:
        """An uploaded image file (multipart field ``file``, or the raw bytes) or JSON ``{"pixels": ...}``.

        Answers ``{"label": int, "probabilities": [float, ...]}`` (one per class).
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
        body = json.dumps({"label": label, "probabilities": [round(p, 6) for p in proba]})
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


def serve(run_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    import uvicorn

    os.environ[RUN_DIR_ENV] = str(run_dir)
    if workers == 1:
        uvicorn.run(app_from_env(), host=host, port=port, log_level="warning")
    else:  # uvicorn starts the processes; each imports this module and builds its own app
        create_app(run_dir)  # a bad run directory fails here, once, with a clear message
        uvicorn.run("mnistlab.serve:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level="warning")
