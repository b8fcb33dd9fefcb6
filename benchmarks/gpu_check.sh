#!/usr/bin/env bash
# The GPU checks in one script: the CUDA tests, `mnistlab bench --device cuda`, the fast recipe's
# choices (benchmarks/bench_gpu.py), the cost of determinism (benchmarks/bench_determinism.py), the
# CUDA-graph step and ten seeds batched against one, with logs and tables written into OUTDIR; each step under its own
# timeout, 8.7 minutes at most in all. For a machine whose
# python3 already has a CUDA PyTorch: the project runs from its source folder (PYTHONPATH=src), and
# the packages that machine lacks come from .whl/ (fetch them here first: benchmarks/gpu_wheels.sh,
# then carry .whl).
# Usage: benchmarks/gpu_check.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mnistlab-site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/mnistlab-site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export MNISTLAB_CACHE=/tmp/mnistlab-cache
{
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  python3 -c "import mnistlab, time; t = time.perf_counter(); import torch; print(f'torch import {time.perf_counter() - t:.2f} s'); t = time.perf_counter(); torch.zeros(1, device='cuda'); torch.cuda.synchronize(); print(f'CUDA start-up {time.perf_counter() - t:.2f} s')"
} 2>&1 | tee "$OUT/env.txt"
status=0
timeout 170 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py -s 2>&1 | tee "$OUT/cuda-tests.log" || status=1
timeout 150 python3 -m mnistlab bench --device cuda --out "$OUT/bench-cuda.md" 2>&1 | tee "$OUT/bench.log" || status=1
timeout 90 python3 benchmarks/bench_gpu.py --device cuda --seeds 0,1,2 --out "$OUT/gpu-choices.md" 2>&1 \
  | tee "$OUT/gpu-choices.log" || status=1
timeout 60 python3 benchmarks/bench_determinism.py --device cuda --seeds 0,1,2 2>&1 \
  | tee "$OUT/determinism.log" || status=1
# one fast-preset seed, the same with every batch full (its step a CUDA graph), and ten seeds batched
# (training time: the goal is at most 2x one seed's)
timeout 50 bash -c 'for args in "--seeds 0" "--seeds 0 --drop-last" "--seeds 0-9 --batched"; do
  python3 -m mnistlab train --preset fast --device cuda $args --out /tmp/mnistlab-batched --force | tail -n 1
  python3 -c "import json; s = json.load(open(\"/tmp/mnistlab-batched/seeds.json\")); print(\"$args: training\", round(sum(r[\"train_seconds\"] for r in s[\"runs\"]), 2), \"s\")"
done' 2>&1 | tee "$OUT/batched.log" || status=1
exit $status
