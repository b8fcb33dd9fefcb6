"""The kernels' training step in fp32 and in bf16, side by side: where the time of a step goes.

Times one FastCNN training step's three calls into the kernels (features forward, head with the
loss, features backward) on a batch of MNIST images, fp32 and bf16 alternating step by step so
that both see the same phases of a noisy machine; prints the medians per call, their sum and the
ratio. The kernels' share of a step is what ``--precision bf16`` can speed up; the rest of a
training step (batch gathering, the update in NumPy) is the same for both.

Usage: python benchmarks/bench_bf16.py [--widths 16,32,64] [--batch 256] [--steps 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from mnistlab.data import mnist
from mnistlab.errors import first_line
from mnistlab.kernels import calls, fastcnn

CALLS = ("forward", "head", "backward")


def step_times(params, x, y, bf16: bool, buffers: dict) -> dict[str, float]:
    """One training step's calls, timed (the weights are not updated: every step computes the same)."""
    stats = np.zeros((6, calls.MAX_WIDTH), np.float32)
    times = {}
    start = time.perf_counter()
    feats, saved = calls.fastcnn_forward(x, params[:9], stats, False, buffers["saved"], buffers["feats"], bf16)
    times["forward"] = time.perf_counter() - start
    start = time.perf_counter()
    _, gfeat, _, _ = calls.fastcnn_head(feats, params[9], params[10], y, 0.1, buffers["logits"], buffers["head"])
    times["head"] = time.perf_counter() - start
    start = time.perf_counter()
    calls.fastcnn_backward(params[:9], saved, stats, gfeat, buffers["grads"], buffers["scratch"], bf16)
    times["backward"] = time.perf_counter() - start
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="16,32,64", help="FastCNN's widths (fastcnn: 16,32,64; widecnn: 32,64,128)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    try:
        widths = tuple(int(w) for w in args.widths.split(","))
    except ValueError as e:
        print(f"bench_bf16: --widths: {first_line(e)}", file=sys.stderr)
        return 2
    if not calls.widths_supported(widths) or args.batch < 1 or args.steps < 1:
        print(f"bench_bf16: --widths takes three multiples of 16 up to {calls.MAX_WIDTH}, --batch and --steps "
              f"positive whole numbers; got {args.widths!r}, {args.batch}, {args.steps}", file=sys.stderr)
        return 2
    if not calls.bf16_available():
        print("bench_bf16: no bf16 kernels here (the CPU lacks AVX512-BF16, or MNISTLAB_BF16=0)", file=sys.stderr)
        return 2
    data = mnist.load_dataset()
    x = data.images[: args.batch].reshape(args.batch, 784).astype(np.float32) / 256
    y = data.labels[: args.batch].astype(np.int64)
    state = fastcnn.init_state(0, 10, widths)
    params = [np.ascontiguousarray(state[k]) for k in fastcnn.PARAMS]
    n = args.batch
    buffers = {"saved": [np.empty((n, s), np.float32) for s in calls.fast_saved(widths)],
               "scratch": [np.empty((n, s), np.float32) for s in calls.fast_scratch(widths)],
               "feats": np.empty((n, calls.fast_features(widths)), np.float32),
               "logits": np.empty((n, 10), np.float32), "grads": [np.empty_like(p) for p in params[:9]],
               "head": (np.empty((n, calls.fast_features(widths)), np.float32), np.empty_like(params[9]),
                        np.empty_like(params[10]))}
    runs = {False: [], True: []}
    for i in range(args.steps + 10):
        for bf16 in (False, True):
            times = step_times(params, x, y, bf16, buffers)
            if i >= 10:  # warm-up steps left out
                runs[bf16].append(times)
    print(f"FastCNN {widths}, batch {n}, {args.steps} steps each, alternating; medians in ms")
    print("| precision | " + " | ".join(CALLS) + " | step |")
    print("|---|" + "---|" * (len(CALLS) + 1))
    totals = {}
    for bf16, rows in runs.items():
        cells = [statistics.median(r[c] for r in rows) * 1e3 for c in CALLS]
        totals[bf16] = statistics.median(sum(r.values()) for r in rows) * 1e3
        print(f"| {'bf16' if bf16 else 'fp32'} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {totals[bf16]:.2f} |")
    print(f"\nbf16: the kernels' step {totals[False] / totals[True]:.2f}x as fast as fp32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
