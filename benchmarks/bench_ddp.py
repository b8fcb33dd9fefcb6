"""One run in 2 processes of 1 thread against 1 process of 2 threads, side by side on this machine.

The seed's CNN (`mnistlab train --model cnn`, the PyTorch engine with the compiled kernels) for
--epochs epochs on the seed's split, both layouts alternated --repeats times; medians of the training
seconds (summary.json, validation included), the whole command's wall time and the final accuracy.

Usage: python benchmarks/bench_ddp.py [--epochs 3] [--repeats 3] [--model cnn]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mnistlab.lab.bench import machine

LAYOUTS = {"1 process × 2 threads": (1, "2"), "2 processes × 1 thread": (2, "1")}


def run(out: Path, model: str, epochs: int, nproc: int, threads: str) -> dict:
    cmd = [sys.executable, "-m", "mnistlab", "train", "--model", model, "--epochs", str(epochs), "--device", "cpu",
           "--out", str(out), "--nproc", str(nproc)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": threads})
    wall = time.perf_counter() - start
    s = json.loads((out / "summary.json").read_text())
    return {"train": s["train_seconds"], "wall": wall, "acc": s["valid_acc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="cnn")
    args = parser.parse_args()
    results = {name: [] for name in LAYOUTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, (nproc, threads) in LAYOUTS.items():
                results[name].append(run(Path(tmp) / f"{nproc}-{r}", args.model, args.epochs, nproc, threads))
    print(f"machine: {machine()}; --model {args.model}, {args.epochs} epochs, medians of {args.repeats}\n")
    print("| layout | training s (validation included) | whole command s | valid acc | training speed vs 1 × 2 |")
    print("|---|---|---|---|---|")
    base = statistics.median(x["train"] for x in results[next(iter(LAYOUTS))])
    for name, runs in results.items():
        train = statistics.median(x["train"] for x in runs)
        print(f"| {name} | {train:.1f} | {statistics.median(x['wall'] for x in runs):.1f} | "
              f"{100 * statistics.median(x['acc'] for x in runs):.2f}% | {base / train:.2f}x |")


if __name__ == "__main__":
    main()
