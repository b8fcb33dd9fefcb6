"""Serving speed: in-process predict latency, and /predict throughput on loopback.

Starts `mnistlab serve` on a free 127.0.0.1 port, then runs --clients concurrent clients
for --duration seconds (bounded: it stops by itself) posting JSON pixel requests, a
--bad-fraction of them malformed (wrong shape, non-numbers, corrupt images). Reports
requests/s, latency percentiles, status counts (any 5xx or dropped connection is a
failure) and the server's memory (RSS), sampled every 2 seconds: at the start, the end, and
the peak of the first and of the last minute (a soak test: --duration 180 --bad-fraction 0.3).
Exits with status 1 when any request got a 5xx or a dropped connection.

With --wrk the load comes from wrk (C, from Debian's wrk package) instead of Python
clients, so the load generator takes far less of the CPU the server shares with it; wrk
reports the same figures except RSS windows, which are sampled by this script meanwhile.
--workers starts that many server processes.

Usage: python benchmarks/bench_serve.py [RUN_DIR] [--clients 8] [--duration 10] [--bad-fraction 0]
                                        [--wrk] [--workers 1]
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
from mnistlab.data.mnist import load_dataset

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


async def sample_rss(pid, stop, samples, every=2.0):
    start = time.monotonic()
    while time.monotonic() < stop:
        samples.append((time.monotonic() - start, rss_kb(pid)))
        await asyncio.sleep(every)
    samples.append((time.monotonic() - start, rss_kb(pid)))


async def load(url, images, clients, duration, bad_fraction, server_pid, samples):
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
    await asyncio.gather(sample_rss(server_pid, stop, samples), *(client(k) for k in range(clients)))
    return latencies, statuses, errors, time.monotonic() - start


WRK_SCRIPT = """
local bodies, i = {}, 0
function init(args)
  local n = tonumber(args[1])
  for k = 1, n do
    local f = io.open(args[2] .. "/" .. k .. ".json"); bodies[k] = f:read("*a"); f:close()
  end
  math.randomseed(0)
end
request = function()
  i = i + 1
  return wrk.format("POST", "/predict", {["Content-Type"] = "application/json"}, bodies[(i % #bodies) + 1])
end
done = function(summary, latency, requests)
  io.write(string.format("WRK %d %d %.3f %.3f %.3f\\n", summary.requests, summary.errors.connect +
    summary.errors.read + summary.errors.write + summary.errors.timeout + summary.errors.status,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, summary.duration / 1e6))
end
"""


def wrk_load(url, images, clients, duration, server_pid, samples):
    """Load from wrk: good JSON pixel requests, 200 validation images in turn."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        n = 200
        for k in range(1, n + 1):
            Path(tmp, f"{k}.json").write_text(json.dumps({"pixels": images[k % len(images)].tolist()}))
        script = Path(tmp, "load.lua")
        script.write_text(WRK_SCRIPT)
        stop = time.monotonic() + duration + 1
        proc = subprocess.Popen(["wrk", "-t1", f"-c{clients}", f"-d{int(duration)}s", "-s", str(script), url, "--",
                                 str(n), tmp], stdout=subprocess.PIPE, text=True)

        async def sample():
            await sample_rss(server_pid, stop, samples)

        asyncio.run(sample())
        out, _ = proc.communicate(timeout=duration + 30)
    line = next(x for x in out.splitlines() if x.startswith("WRK "))
    requests, errors, p50, p99, elapsed = line.split()[1:]
    return int(requests), int(errors), float(p50), float(p99), float(elapsed)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default=str(DEFAULT_RUN))
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--duration", type=float, default=10, help="seconds of load (default: 10)")
    parser.add_argument("--bad-fraction", type=float, default=0.0, help="share of malformed requests (default: 0)")
    parser.add_argument("--wrk", action="store_true", help="generate the load with wrk instead of Python clients")
    parser.add_argument("--workers", type=int, default=1, help="server processes (default: 1)")
    args = parser.parse_args()
    if args.wrk and args.bad_fraction:
        parser.error("--wrk sends good requests only; measure --bad-fraction with the Python clients")
    images = load_dataset().images[50000:50500]

    t = in_process(args.run_dir, images)
    print(f"in-process predict, 1 image: median {1000 * statistics.median(t):.2f} ms, "
          f"p99 {1000 * percentile(t, 99):.2f} ms (n={len(t)})")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mnistlab", "serve", args.run_dir, "--port", str(port),
                               "--workers", str(args.workers)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/health", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        samples = []
        if args.wrk:
            return report_wrk(args, wrk_load(url, images, args.clients, args.duration, server.pid, samples),
                              samples, server)
        lat, statuses, errors, elapsed = asyncio.run(load(url, images, args.clients, args.duration,
                                                          args.bad_fraction, server.pid, samples))
        alive = server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=10)
    total = sum(statuses.values())
    fivexx = sum(v for k, v in statuses.items() if k >= 500)
    window = min(60.0, elapsed / 2)
    first = max(kb for t, kb in samples if t <= window)
    last = max(kb for t, kb in samples if t >= elapsed - window)
    print(f"/predict JSON pixels, {args.clients} clients, {elapsed:.1f} s, {100 * args.bad_fraction:.0f}% bad: "
          f"{total / elapsed:.0f} requests/s, ok latency median {1000 * statistics.median(lat):.1f} ms, "
          f"p99 {1000 * percentile(lat, 99):.1f} ms")
    print(f"statuses {dict(sorted(statuses.items()))}, connection errors {dict(errors)}, "
          f"5xx {fivexx}, server alive {alive}")
    print(f"server RSS: start {samples[0][1] / 1024:.1f} MB, end {samples[-1][1] / 1024:.1f} MB; peak in the first "
          f"{window:.0f} s {first / 1024:.1f} MB, in the last {window:.0f} s {last / 1024:.1f} MB "
          f"({len(samples)} samples)")
    print(json.dumps({"machine": f"{os.cpu_count()} cores", "requests_per_s": total / elapsed, "5xx": fivexx,
                      "connection_errors": sum(errors.values()), "rss_first_window_kb": first,
                      "rss_last_window_kb": last}))
    return 1 if fivexx or errors or not alive else 0


def report_wrk(args, result, samples, server):
    requests, errors, p50, p99, elapsed = result
    alive = server.poll() is None
    print(f"/predict JSON pixels from wrk, {args.clients} connections, {args.workers} server process(es), "
          f"{elapsed:.1f} s: {requests / elapsed:.0f} requests/s, latency median {p50:.1f} ms, p99 {p99:.1f} ms; "
          f"socket errors or non-2xx answers {errors}, server alive {alive}")
    print(f"server RSS (first process): start {samples[0][1] / 1024:.1f} MB, end {samples[-1][1] / 1024:.1f} MB")
    return 0 if alive and errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
