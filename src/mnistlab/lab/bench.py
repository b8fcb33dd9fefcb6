"""Side-by-side speed of training recipes: ours against the references, in one invocation.

Every recipe runs in a fresh Python process, one after another, so each pays its own
start-up and none shares the CPU with another. For each: seconds of training to 99%
validation accuracy (validation passes excluded), images per second while training,
the training's floating-point rate from the model's counted FLOPs per image (forward and
backward), and that rate as a fraction of this machine's peak, taken as the best rate
of a large fp32 matrix product here (what the CPU's BLAS reaches; the small convolutions
of these models cannot do better), measured before and after the recipes, the higher
kept; runs that trained in bf16 against the best rate of a bf16 matrix product, measured the
same way where the CPU has the bf16 kernels. Our presets also report the whole command's wall
time, where it goes (the run's phases from summary.json), and peak memory (RSS).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import RunError

TARGET = 0.99


@dataclass
class BenchPlan:
    """What ``mnistlab bench`` runs. ``quick``: bounded runs that measure speed, not time to 99%."""

    quick: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)  # for the fast preset
    device: str = "cpu"

    def jobs(self) -> list[dict]:
        if self.quick:
            return [
                {"name": "seed's code as written", "kind": "reference", "recipe": "seed", "epochs": 1,
                 "max_batches": 300, "max_valid": 2000},
                {"name": "pytorch/examples", "kind": "reference", "recipe": "examples", "epochs": 1,
                 "max_batches": 40, "max_valid": 2000},
                {"name": "mnistlab --preset seed", "kind": "preset", "preset": "seed", "epochs": 1},
                {"name": "mnistlab --preset fast", "kind": "preset", "preset": "fast", "seed": 0},
            ]
        return [
            {"name": "seed's code as written", "kind": "reference", "recipe": "seed", "epochs": 15},
            {"name": "pytorch/examples", "kind": "reference", "recipe": "examples", "epochs": 4, "target": TARGET},
            {"name": "mnistlab --preset seed", "kind": "preset", "preset": "seed"},
            *(job for s in self.seeds for job in self._fast(s)),
        ]

    def _fast(self, seed: int) -> list[dict]:
        """The fast preset for one seed; where the kernels have bf16 convolutions (the preset's default
        there), in fp32 and in bf16 right after it, each named."""
        from ..kernels.calls import bf16_available

        job = {"name": "mnistlab --preset fast", "kind": "preset", "preset": "fast", "seed": seed}
        if self.device != "cpu" or not bf16_available():
            return [job]
        return [{**job, "name": f"{job['name']} --precision {p}", "precision": p} for p in ("fp32", "bf16")]


@dataclass
class Measured:
    name: str
    epochs: list[dict] = field(default_factory=list)  # per epoch: train_seconds (cumulative), images, valid_acc
    wall_seconds: float = 0.0
    max_rss_mb: float = 0.0
    flops_per_image: float = 0.0
    seed: int = 0
    timings: dict = field(default_factory=dict)  # our presets: summary.json's phases of the run
    precision: str = "fp32"  # our presets: what the run trained in (summary.json)

    @property
    def train_seconds(self) -> float:
        return self.epochs[-1]["train_seconds"]

    @property
    def images_per_second(self) -> float:
        return self.epochs[-1]["images"] / self.train_seconds

    @property
    def valid_acc(self) -> float:
        return self.epochs[-1]["valid_acc"]

    def time_to(self, target: float = TARGET) -> float | None:
        return next((e["train_seconds"] for e in self.epochs if e["valid_acc"] >= target), None)


def peak_flops(size: int = 2048, repeats: int = 5, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """The best FLOP/s of ``size`` x ``size`` matrix products of ``dtype`` (fp32, or bf16 operands) on
    ``device`` (the CPU: all threads; a GPU: 8192 x 8192, TF32 as PyTorch leaves it for fp32)."""
    size = 8192 if device == "cuda" else size
    a, b = (torch.rand(size, size, device=device).to(dtype) for _ in range(2))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def training_flops_per_image(model: torch.nn.Module, loss_func=None, batch: int = 64) -> float:
    """Counted FLOPs of one training step (forward and backward) per image."""
    from torch.utils.flop_counter import FlopCounterMode

    loss_func = loss_func or torch.nn.functional.cross_entropy
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    model.train()
    with FlopCounterMode(display=False) as counter:
        loss_func(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def _model_flops(job: dict) -> float:
    from ..config import PRESETS
    from ..models import create_model
    from . import reference

    if job["kind"] == "reference":
        if job["recipe"] == "seed":
            return training_flops_per_image(reference.SeedCNN())
        return training_flops_per_image(reference.ExamplesNet(), torch.nn.functional.nll_loss)
    return training_flops_per_image(create_model(PRESETS[job["preset"]]["model"]))


def _run(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` with its stdout in ``log``; returns wall seconds and peak RSS in MB (wait4: this child alone)."""
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE)
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        last = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise RunError(f"{' '.join(cmd[2:6])}... failed (exit status {code}): {last[0]}")
    return wall, usage.ru_maxrss / 1024


def run_job(job: dict, device: str = "cpu") -> Measured:
    seed = job.get("seed", 0)
    result = Measured(job["name"], seed=seed, flops_per_image=_model_flops(job))
    with tempfile.TemporaryDirectory() as tmp:
        log, run_dir = Path(tmp) / "stdout", Path(tmp) / "run"
        if job["kind"] == "reference":
            cmd = [sys.executable, "-m", "mnistlab.lab.reference", job["recipe"], "--epochs", str(job["epochs"])]
            for key in ("max_batches", "target", "max_valid"):
                if job.get(key):
                    cmd += [f"--{key.replace('_', '-')}", str(job[key])]
        else:
            cmd = [sys.executable, "-m", "mnistlab", "train", "--preset", job["preset"], "--out", str(run_dir)]
            if job.get("epochs"):
                cmd += ["--epochs", str(job["epochs"])]
            if job.get("precision"):
                cmd += ["--precision", job["precision"]]
        result.wall_seconds, result.max_rss_mb = _run(cmd + ["--seed", str(seed), "--device", device], log)
        if job["kind"] == "reference":
            result.epochs = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        else:
            result.epochs = _preset_epochs(run_dir)
            summary = json.loads((run_dir / "summary.json").read_text())
            result.timings, result.precision = summary.get("timings", {}), summary.get("precision", "fp32")
    return result


def _preset_epochs(run_dir: Path) -> list[dict]:
    """A finished run's epochs as the references report theirs: cumulative training seconds and images."""
    n_train = json.loads((run_dir / "summary.json").read_text())["n_train"]
    epochs, total = [], 0.0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        total += record["train_seconds"]
        epochs.append({"epoch": record["epoch"], "train_seconds": total, "images": n_train * record["epoch"],
                       "valid_acc": record["valid_acc"]})
    return epochs


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def summarize(results: list[Measured], peak: float, peak_bf16: float | None = None) -> list[dict]:
    """One row per recipe name (several seeds: medians of speed, mean and min of accuracy); the % of
    peak against ``peak_bf16`` for runs that trained in bf16, where it was measured."""
    import statistics

    rows, by_name = [], {}
    for r in results:
        by_name.setdefault(r.name, []).append(r)
    seed_code = by_name.get("seed's code as written", [None])[0]
    for name, runs in by_name.items():
        ips = statistics.median(r.images_per_second for r in runs)
        reach = [r.time_to() for r in runs]
        row = {
            "recipe": name, "runs": len(runs), "epochs": len(runs[0].epochs),
            "valid_acc_mean": statistics.fmean(r.valid_acc for r in runs),
            "valid_acc_min": min(r.valid_acc for r in runs),
            "train_seconds": statistics.median(r.train_seconds for r in runs),
            "seconds_to_99": statistics.median(reach) if all(t is not None for t in reach) else None,
            "images_per_second": ips,
            "gflops": runs[0].flops_per_image * ips / 1e9,
            "percent_of_peak": 100 * runs[0].flops_per_image * ips / (
                peak_bf16 if peak_bf16 and runs[0].precision == "bf16" else peak),
            "mflops_per_image": runs[0].flops_per_image / 1e6,
            "wall_seconds": statistics.median(r.wall_seconds for r in runs),
            "max_rss_mb": max(r.max_rss_mb for r in runs),
            "speedup_images_per_second": ips / seed_code.images_per_second if seed_code else None,
        }
        if all(r.timings for r in runs):
            # medians per phase; the rest of the wall time is Python start-up, imports and setup
            row["timings"] = {k: statistics.median(r.timings.get(k, 0.0) for r in runs) for k in runs[0].timings}
            row["timings"]["start-up and other"] = statistics.median(
                r.wall_seconds - sum(r.timings.values()) for r in runs)
        rows.append(row)
    return rows


def _device_name(plan: BenchPlan) -> str:
    if plan.device == "cuda" and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})"
    return plan.device


def markdown(rows: list[dict], peak: float, plan: BenchPlan, command: str, peak_bf16: float | None = None) -> str:
    def num(v, fmt):
        return "—" if v is None else format(v, fmt)

    bf16 = f"; bf16 matrix product (the bf16 runs' peak): {peak_bf16 / 1e9:.0f} GFLOP/s" if peak_bf16 else ""
    lines = [
        f"Machine: {machine()}; peak (fp32 matrix product): {peak / 1e9:.0f} GFLOP/s{bf16}. "
        f"Device: {_device_name(plan)}.",
        f"Command: `{command}`{' (quick: bounded runs, speed only)' if plan.quick else ''}.",
        "",
        "| recipe | runs | epochs | valid acc (mean / min) | s to 99% | training s | images/s | vs seed code "
        "| MFLOP/image | GFLOP/s | % of peak | whole command s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['runs']} | {r['epochs']} | {100 * r['valid_acc_mean']:.2f}% / "
            f"{100 * r['valid_acc_min']:.2f}% | {num(r['seconds_to_99'], '.1f')} | {r['train_seconds']:.1f} | "
            f"{r['images_per_second']:,.0f} | {num(r['speedup_images_per_second'], '.2f')}x | "
            f"{r['mflops_per_image']:.2f} | {r['gflops']:.1f} | {r['percent_of_peak']:.1f}% | "
            f"{r['wall_seconds']:.1f} | {r['max_rss_mb']:.0f} |"
        )
    by_name = {r["recipe"]: r for r in rows}
    for r in rows:
        base = by_name.get(r["recipe"].replace(" --precision bf16", " --precision fp32"))
        if base is not r and base is not None:
            lines += ["", f"{r['recipe']}: training {base['train_seconds'] / r['train_seconds']:.2f}x as fast as "
                          f"fp32 in this run ({r['train_seconds']:.2f} s against {base['train_seconds']:.2f} s, "
                          f"medians), valid acc {100 * r['valid_acc_mean']:.2f}% against "
                          f"{100 * base['valid_acc_mean']:.2f}%"]
    phased = [r for r in rows if r.get("timings")]
    if phased:
        keys = list(phased[0]["timings"])
        lines += ["", "Where our commands' wall time goes (seconds, medians over the runs):", "",
                  "| recipe | whole command | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for r in phased:
            cells = " | ".join(f"{r['timings'].get(k, 0.0):.2f}" for k in keys)
            lines.append(f"| {r['recipe']} | {r['wall_seconds']:.1f} | {cells} |")
    return "\n".join(lines) + "\n"


def run_bench(plan: BenchPlan, on_result=None) -> dict:
    """Run ``plan``'s jobs one after another; ``on_result(Measured)`` after each. Returns the
    ``rows`` (:func:`summarize`), the Markdown ``table``, the ``peak`` FLOP/s (``peak_bf16``: the bf16
    one, or None where not measured) and the ``machine``."""
    from ..kernels.calls import bf16_available
    from ..train.device import resolve_device

    resolve_device(plan.device)  # a clear error before minutes of work
    dtypes = [torch.float32] + ([torch.bfloat16] if plan.device == "cpu" and bf16_available() else [])
    peaks = [peak_flops(device=plan.device, dtype=d) for d in dtypes]
    results = []
    for job in plan.jobs():
        results.append(run_job(job, plan.device))
        if on_result is not None:
            on_result(results[-1])
    # measured again: a busy moment only lowers the figure
    peaks = [max(p, peak_flops(device=plan.device, dtype=d)) for p, d in zip(peaks, dtypes, strict=True)]
    peak, peak_bf16 = peaks[0], (peaks[1] if len(peaks) > 1 else None)
    rows = summarize(results, peak, peak_bf16)
    command = "mnistlab bench" + (" --quick" if plan.quick else "") + (
        f" --device {plan.device}" if plan.device != "cpu" else "")
    return {"rows": rows, "table": markdown(rows, peak, plan, command, peak_bf16), "peak": peak,
            "peak_bf16": peak_bf16, "machine": machine()}
