#!/usr/bin/env bash
# Fetch, here, the wheels that the GPU machine lacks (its Python 3.12 has a CUDA PyTorch but no web
# stack), into .whl/ (ignored by git), for benchmarks/gpu_check.sh to install there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for spec in fastapi starlette pydantic pydantic-core annotated-types typing-inspection uvicorn python-multipart \
            annotated-doc typing-extensions opentelemetry-api importlib-metadata zipp; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$spec"
done
ls -la .whl
