"""Time ``mnistlab.load_mnist()``: first load (empty cache) and cached load, each in a fresh process.

Usage: python benchmarks/bench_load.py [--repeats 5]
Prints the median and the range over the repeats. Import time of the package is not counted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

SNIPPET = """
import time, mnistlab
t = time.perf_counter()
X, Y = mnistlab.load_mnist()
t1 = time.perf_counter()
X.sum(dtype="float64")
print(t1 - t, time.perf_counter() - t)
"""


def one(cache: str) -> tuple[float, float]:
    env = {**os.environ, "MNISTLAB_CACHE": cache}
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, check=True)
    load, touched = map(float, out.stdout.split())
    return load, touched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per case (default: 5)")
    args = parser.parse_args()
    first, cached, touched = [], [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            first.append(one(cache)[0])
            load, touch = one(cache)
            cached.append(load)
            touched.append(touch)
    cases = (("first load (verify + decode + cache)", first), ("cached load", cached),
             ("cached load + one read of every pixel", touched))
    for name, xs in cases:
        print(f"{name:40s} median {statistics.median(xs):.3f} s  (min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})")


if __name__ == "__main__":
    main()
