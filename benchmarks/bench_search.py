"""Searches on this machine: trials per hour with one worker on 2 threads against two workers on one
thread each, and what the storage costs per trial (SQLite, and PostgreSQL with --postgres URL).

Trials are `--preset fast`-sized: the fast preset's recipe for --epochs epochs on the holdout split
(50,000 training images), its learning rate drawn from a narrow range so every trial does the same
work. Both layouts run the same number of trials, one after the other, in fresh folders. The storage's
cost is timed apart: Optuna's whole trial protocol (fail stale trials, ask, suggest, the epochs'
reports with the pruner's check, tell, heartbeats on) around an objective that does nothing else,
against a trial's wall time with one worker (the first part's wall time over its trials).

Usage: python benchmarks/bench_search.py [--trials 6] [--epochs 2] [--postgres URL]
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
from mnistlab.lab.studies import make_storage

SPACE = {"base": {"preset": "fast"}, "params": {"lr": {"type": "float", "low": 0.35, "high": 0.45}}}


def run_workers(out: Path, trials: int, workers: int, threads: int, epochs: int) -> float:
    """Wall seconds for ``workers`` processes of ``threads`` threads to finish ``trials`` trials."""
    space = out / "space-in.json"
    space.write_text(json.dumps({**SPACE, "base": {**SPACE["base"], "epochs": epochs}}))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "mnistlab", "search", str(out), "--trials", str(trials), "--space", str(space)]
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(workers)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"worker failed: {err[-1000:]}")
    return time.perf_counter() - start


def trial_seconds(out: Path) -> list[float]:
    return [json.loads((d / "summary.json").read_text())["train_seconds"] for d in sorted(out.glob("trial-*"))
            if (d / "summary.json").is_file()]


def storage_seconds(url: str, epochs: int, n: int = 20) -> float:
    """Median seconds of Optuna's protocol for one trial of ``epochs`` reports on ``url``."""
    import optuna

    storage = make_storage(url, heartbeat=30)
    study = optuna.create_study(storage=storage, study_name=f"bench-{time.time_ns()}", direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))
    times = []

    def objective(trial):
        trial.suggest_float("lr", 0.35, 0.45)
        for epoch in range(1, epochs + 1):
            trial.report(0.99, epoch)
            trial.should_prune()
        return 0.99

    for _ in range(n):
        start = time.perf_counter()
        optuna.storages.fail_stale_trials(study)
        study.optimize(objective, n_trials=1)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--postgres", default=None, metavar="URL", help="also time the storage on this database")
    args = parser.parse_args()
    print(f"machine: {machine()}; {args.trials} trials of the fast preset's recipe, {args.epochs} epochs each, "
          f"holdout split")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers, threads in ((1, 2), (2, 1)):
            out = Path(tmp) / f"w{workers}"
            out.mkdir()
            wall = run_workers(out, args.trials, workers, threads, args.epochs)
            rows.append((workers, threads, wall, statistics.median(trial_seconds(out))))
        one_trial = rows[0][2] / args.trials  # a trial's wall time with one worker: all it costs
        print("\n| workers × threads | wall s | trials per hour | median training s per trial |")
        print("|---|---|---|---|")
        for workers, threads, wall, median in rows:
            print(f"| {workers} × {threads} | {wall:.1f} | {3600 * args.trials / wall:.0f} | {median:.1f} |")
        storages = [("SQLite", f"sqlite:///{Path(tmp) / 'bench.db'}")]
        if args.postgres:
            storages.append(("PostgreSQL", args.postgres))
        print(f"\n| storage | Optuna's protocol per trial, s (median of 20) | share of a trial ({one_trial:.2f} s "
              f"with 1 × 2) |")
        print("|---|---|---|")
        for name, url in storages:
            seconds = storage_seconds(url, args.epochs)
            print(f"| {name} | {seconds:.4f} | {100 * seconds / one_trial:.2f}% |")


if __name__ == "__main__":
    main()
