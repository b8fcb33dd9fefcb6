"""The seed's CNN code as written vs ``mnistlab train`` on the same recipe, side by side.

Both train the seed's CNN on the seed's split (batch 64, SGD lr 0.1 momentum 0.9) for the
same number of epochs, in fresh processes, alternating, ``--repeats`` times each (the seed's
code is ``python -m mnistlab.lab.reference seed``). Reports medians of the training time (the
training steps, validation excluded) and of the whole process (start-up and data load
included), the ratio seed / mnistlab, and both accuracies. ``mnistlab bench`` runs one of
each beside the other recipes; this script repeats the pair to see the spread.

Usage: python benchmarks/bench_seed.py [--epochs 15] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, out.stdout


def run_seed(epochs: int, seed: int) -> dict:
    wall, stdout = _timed([sys.executable, "-m", "mnistlab.lab.reference", "seed", "--epochs", str(epochs),
                           "--seed", str(seed)])
    return {**json.loads(stdout.strip().splitlines()[-1]), "wall_seconds": wall}


def run_ours(epochs: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        wall, _ = _timed([sys.executable, "-m", "mnistlab", "train", "--model", "cnn", "--epochs", str(epochs),
                          "--seed", str(seed), "--device", "cpu", "--out", str(out)])
        summary = json.loads((out / "summary.json").read_text())
        epochs = (out / "metrics.jsonl").read_text().splitlines()
    train_seconds = sum(json.loads(line)["train_seconds"] for line in epochs)
    return {"recipe": "mnistlab train --model cnn", "train_seconds": train_seconds, "valid_acc": summary["valid_acc"],
            "wall_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="epochs per run (default: 15)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, alternating (default: 1)")
    args = parser.parse_args()
    seed_runs, our_runs = [], []
    for r in range(args.repeats):
        seed_runs.append(run_seed(args.epochs, r))
        our_runs.append(run_ours(args.epochs, r))
        print(f"repeat {r}: seed {seed_runs[-1]['train_seconds']:.1f}s ({100 * seed_runs[-1]['valid_acc']:.2f}%), "
              f"mnistlab {our_runs[-1]['train_seconds']:.1f}s ({100 * our_runs[-1]['valid_acc']:.2f}%)", flush=True)

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{args.epochs} epochs, median of {args.repeats}")
    print("| recipe | training s | whole process s | valid acc |")
    print("|---|---|---|---|")
    for name, runs in (("seed code as written (DataLoader)", seed_runs), ("`mnistlab train --model cnn`", our_runs)):
        print(f"| {name} | {med(runs, 'train_seconds'):.1f} | {med(runs, 'wall_seconds'):.1f} | "
              f"{100 * med(runs, 'valid_acc'):.2f}% |")
    train_ratio = med(seed_runs, "train_seconds") / med(our_runs, "train_seconds")
    wall_ratio = med(seed_runs, "wall_seconds") / med(our_runs, "wall_seconds")
    print(f"\nspeed-up (seed / mnistlab): training {train_ratio:.2f}x, whole process {wall_ratio:.2f}x")


if __name__ == "__main__":
    main()
