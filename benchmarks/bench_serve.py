"""Serving speed: in-process predict latency, and /predict throughput on loopback.

Starts `mnistlab serve` on a free 127.0.0.1 port, then runs --clients concurrent clients
for --duration seconds (bounded: it stops by itself) posting JSON pixel requests, a
--bad-fraction of them malformed (wrong shape, non-numbers, corrupt images). Reports
requests/s, latency percentiles, status counts (any 5xx or dropped connection is a
failure) and the server's memory (RSS) at the start and the end.

Usage: python benchmarks/bench_serve.py [RUN_DIR] [--clients 8] [--duration 10] [--bad-fraction 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

import mnistlab
from mnistlab.data import load_dataset

DEFAULT_RUN = Path(__file__).resolve().parents[1] / "tests" / "data" / "cnn-seed0"


def percentile(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def in_process(run_dir, images, n=1000):
    clf = mnistlab.load_run(run_dir)
    times = []
    for i in range(n):
        start = time.perf_counter()
        clf.predict_proba(images[i % len(images)][None])
        times.append(time.perf_counter() - start)
    return times


def rss_kb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def bad_request(i):
    kinds = [
        {"json": {"pixels": [0] * 100}},
        {"json": {"pixels": ["x"] * 784}},
        {"content": b"\x89PNG garbage", "headers": {"content-type": "image/png"}},
        {"content": b"{oops", "headers": {"content-type": "application/json"}},
    ]
    return kinds[i % len(kinds)]


async def load(url, images, clients, duration, bad_fraction):
    latencies, statuses, errors = [], Counter(), Counter()
    stop = time.monotonic() + duration
    rng = np.random.default_rng(0)

    async def client(k):
        async with httpx.AsyncClient(timeout=10) as http:
            i = k
            while time.monotonic() < stop:
                if rng.random() < bad_fraction:
                    kwargs = bad_request(i)
                else:
                    kwargs = {"json": {"pixels": images[i % len(images)].tolist()}}
                start = time.perf_counter()
                try:
                    r = await http.post(url + "/predict", **kwargs)
                    statuses[r.status_code] += 1
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - start)
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                i += clients

    start = time.monotonic()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return latencies, statuses, errors, time.monotonic() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default=str(DEFAULT_RUN))
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--duration", type=float, default=10, help="seconds of load (default: 10)")
    parser.add_argument("--bad-fraction", type=float, default=0.0, help="share of malformed requests (default: 0)")
    args = parser.parse_args()
    images = load_dataset().images[50000:50500]

    t = in_process(args.run_dir, images)
    print(f"in-process predict, 1 image: median {1000 * statistics.median(t):.2f} ms, "
          f"p99 {1000 * percentile(t, 99):.2f} ms (n={len(t)})")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mnistlab", "serve", args.run_dir, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/health", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        rss_start = rss_kb(server.pid)
        lat, statuses, errors, elapsed = asyncio.run(load(url, images, args.clients, args.duration,
                                                          args.bad_fraction))
        rss_end = rss_kb(server.pid)
        alive = server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=10)
    total = sum(statuses.values())
    print(f"/predict JSON pixels, {args.clients} clients, {elapsed:.1f} s, {100 * args.bad_fraction:.0f}% bad: "
          f"{total / elapsed:.0f} requests/s, ok latency median {1000 * statistics.median(lat):.1f} ms, "
          f"p99 {1000 * percentile(lat, 99):.1f} ms")
    print(f"statuses {dict(sorted(statuses.items()))}, connection errors {dict(errors)}, "
          f"5xx {sum(v for k, v in statuses.items() if k >= 500)}, server alive {alive}, "
          f"RSS {rss_start // 1024} MB -> {rss_end // 1024} MB")
    print(json.dumps({"machine": f"{os.cpu_count()} cores", "requests_per_s": total / elapsed}))


if __name__ == "__main__":
    main()
