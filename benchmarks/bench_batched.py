"""Seeds trained one after another vs together (``--batched``), side by side in fresh processes.

For each of ``--repeats`` rounds, runs ``mnistlab train --preset P --seeds 0..N-1`` three ways, in
alternation: one after another on the engine the rule picks (the kernel engine for FastCNN on the
CPU), one after another with the kernels off (``MNISTLAB_NATIVE=0``: PyTorch's autograd, the engine
a GPU uses), and batched. Prints the medians of the whole command and of the training time summed
over the seeds, and the batched run's ratio to each.

Usage: python benchmarks/bench_batched.py [--preset fast] [--seeds 3] [--repeats 3] [--device cpu]
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

WAYS = {"one by one (engine by the rule)": ([], {}), "one by one, autograd (MNISTLAB_NATIVE=0)":
        ([], {"MNISTLAB_NATIVE": "0"}), "batched": (["--batched"], {})}


def run(preset: str, seeds: int, device: str, extra: list[str], env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "seeds"
        cmd = [sys.executable, "-m", "mnistlab", "train", "--preset", preset, "--seeds", f"0-{seeds - 1}",
               "--device", device, "--out", str(out), *extra]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, **env})
        wall = time.perf_counter() - start
        summary = json.loads((out / "seeds.json").read_text())
    return {"wall": wall, "train": sum(r["train_seconds"] for r in summary["runs"]),
            "acc": summary["valid_acc"]["mean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: 3)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the three ways (default: 3)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    rows = {name: [] for name in WAYS}
    for r in range(args.repeats):
        for name, (extra, env) in WAYS.items():
            rows[name].append(run(args.preset, args.seeds, args.device, extra, env))
            m = rows[name][-1]
            print(f"round {r} {name}: whole {m['wall']:.1f} s, training {m['train']:.1f} s, "
                  f"valid_acc {100 * m['acc']:.2f}%", flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(m[key] for m in rows[name])

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, device {args.device}; --preset {args.preset}, "
          f"{args.seeds} seeds, median of {args.repeats}")
    print("| way | whole command s | training s (all seeds) | batched is faster by (training) | mean valid acc |")
    print("|---|---|---|---|---|")
    for name in WAYS:
        ratio = med(name, "train") / med("batched", "train")
        acc = statistics.fmean(m["acc"] for m in rows[name])
        print(f"| {name} | {med(name, 'wall'):.1f} | {med(name, 'train'):.1f} | {ratio:.2f}x | {100 * acc:.2f}% |")


if __name__ == "__main__":
    main()
