"""Export a trained run for use outside mnistlab: ONNX or TorchScript.

Both take ``pixels``: float32 (N, 784), MNIST-style images with values in [0, 1) (uint8
pixels divided by 256), and return ``logits``: float32 (N, num_classes).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ..errors import UsageError
from ..run.trained import load_model

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}


def export_run(run_dir: str | os.PathLike, fmt: str = "onnx", out: str | os.PathLike | None = None) -> Path:
    """Write the run's model as ``fmt`` (default file: RUN_DIR/model.onnx or model.pt)."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    model = load_model(run_dir)
    model = model.float().eval()
    out = Path(out) if out is not None else Path(run_dir) / f"model{FORMATS[fmt]}"
    example = torch.rand(2, 784)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter deprecation notices are not the user's business
            if fmt == "onnx":
                _export_onnx(model, example, tmp)
            else:
                torch.jit.trace(model, example).save(str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise UsageError("ONNX export needs the onnx package: pip install 'mnistlab[export]'") from None
    torch.onnx.export(model, (example,), str(path), input_names=["pixels"], output_names=["logits"],
                      dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
