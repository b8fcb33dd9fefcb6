"""The cost of CUDA's deterministic algorithms: `mnistlab train` with and without --nondeterministic.

Alternates the two settings over the seeds, each run a fresh process, and prints the medians of the
training time (summary.json's train_seconds) and of the whole command, with the ratio, as a Markdown
table. On the CPU the flag changes nothing (the plumbing can be checked there).

Usage: python benchmarks/bench_determinism.py [--device cuda] [--preset fast] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(preset: str, device: str, seed: int, deterministic: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "mnistlab", "train", "--preset", preset, "--device", device, "--seed", str(seed),
               "--out", str(out), *([] if deterministic else ["--nondeterministic"])]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - start
        summary = json.loads((out / "summary.json").read_text())
    return {"wall": wall, "train": summary["train_seconds"], "acc": summary["valid_acc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    args = parser.parse_args()
    rows = {True: [], False: []}
    for seed in (int(s) for s in args.seeds.split(",")):
        for deterministic in (True, False):
            rows[deterministic].append(run(args.preset, args.device, seed, deterministic))
            r = rows[deterministic][-1]
            name = "deterministic" if deterministic else "nondeterministic"
            print(f"seed {seed} {name}: training {r['train']:.2f} s, whole {r['wall']:.2f} s, "
                  f"valid_acc {100 * r['acc']:.2f}%", flush=True)

    def med(det: bool, key: str) -> float:
        return statistics.median(r[key] for r in rows[det])

    print(f"\n`mnistlab train --preset {args.preset} --device {args.device}`, median of {len(rows[True])} seeds")
    print("| setting | training s | whole command s | valid acc (mean) |")
    print("|---|---|---|---|")
    for det, name in ((True, "deterministic (default)"), (False, "--nondeterministic")):
        acc = statistics.fmean(r["acc"] for r in rows[det])
        print(f"| {name} | {med(det, 'train'):.2f} | {med(det, 'wall'):.2f} | {100 * acc:.2f}% |")
    print(f"\ncost of determinism: training {med(True, 'train') / med(False, 'train'):.2f}x, "
          f"whole command {med(True, 'wall') / med(False, 'wall'):.2f}x")


if __name__ == "__main__":
    main()
