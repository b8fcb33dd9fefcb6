"""Coverage-guided fuzzing (atheris) of the two readers of untrusted bytes.

``idx``: ``mnistlab.data.idx.parse_idx`` on arbitrary bytes (raw or gzip). ``image``:
``mnistlab.use.prepare.prepare_image`` on arbitrary bytes, as ``predict`` and ``serve`` get them.
Anything but the documented errors (``DataError`` and its ``ImageError``) is a crash and
stops the fuzzer with the input saved; so does a single input taking longer than
``-timeout`` seconds (a hang). The seeds are the shipped MNIST files' first bytes and a
small PNG of a digit. ``tests/test_idx.py`` and ``tests/test_use.py`` keep a fast
hypothesis slice of the same properties in the test suite.

Usage (needs ``pip install atheris``):
    python fuzz/fuzz_inputs.py idx -max_total_time=60 -timeout=5
    python fuzz/fuzz_inputs.py image -max_total_time=60 -timeout=5
"""

from __future__ import annotations

import gzip
import io
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["mnistlab"]):
    from mnistlab.data.idx import parse_idx
    from mnistlab.errors import DataError
    from mnistlab.use.prepare import prepare_image


def fuzz_idx(data: bytes) -> None:
    try:
        parse_idx(data, "fuzz")
    except DataError:
        pass


def fuzz_image(data: bytes) -> None:
    try:
        prepare_image(data, "fuzz")
    except DataError:
        pass


def seeds(target: str, folder: Path) -> None:
    import numpy as np
    from PIL import Image

    from mnistlab.data.idx import encode_idx
    from mnistlab.data.mnist import load_dataset

    ds = load_dataset()
    if target == "idx":
        samples = [encode_idx(ds.images[:3].reshape(-1, 28, 28)), encode_idx(ds.labels[:20].astype(np.uint8))]
        samples.append(gzip.compress(samples[0]))
    else:
        samples = []
        for fmt in ("PNG", "JPEG", "BMP"):
            buf = io.BytesIO()
            Image.fromarray(255 - ds.images[0].reshape(28, 28)).save(buf, format=fmt)
            samples.append(buf.getvalue())
    for i, sample in enumerate(samples):
        (folder / f"seed-{i}").write_bytes(sample)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("idx", "image"):
        sys.exit(__doc__)
    target = sys.argv[1]
    corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-"))
    seeds(target, corpus)
    atheris.Setup([sys.argv[0], *sys.argv[2:], str(corpus)], fuzz_idx if target == "idx" else fuzz_image)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
