"""What each hardware choice is worth: training-step throughput under one change at a time.

For the seed's CNN (batch 64), the fast preset's model (batch 256) and widecnn (batch 128),
interleaved, --repeats times each: our settings (the compiled kernels, mnistlab.kernels; for
the FastCNN models whole steps without autograd as the kernel engine trains them, 2 threads, fp32, glibc
malloc keeping freed memory) against the kernels through autograd (FastCNN models), PyTorch's
layers in their place (channels-last, eager), and with them the default NCHW layout, bf16 autocast and torch.compile; 1
thread, other batch sizes (all in this process), and glibc's default malloc settings (in a
child process, since they cannot be restored once changed). Each measurement is --steps
training steps on real MNIST batches after a warm-up; the medians are reported as images/s
and as a ratio to our settings.

Usage: python benchmarks/bench_choices.py [--steps 60] [--repeats 3] [--no-compile] [--models cnn,fastcnn,widecnn]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from mnistlab.data.mnist import load_dataset
from mnistlab.evaluation import prepare
from mnistlab.kernels import autograd as native
from mnistlab.kernels import fastcnn
from mnistlab.lab.bench import machine
from mnistlab.models import create_model
from mnistlab.train.allocator import keep_freed_memory
from mnistlab.train.optim import SGD


def kernel_step(model, momentum: float):
    """The kernel engine's whole training step on NumPy views of ``model``'s tensors (FastCNN models),
    or None where the kernels do not apply."""
    if not (native.kernel_of(model) == "fastcnn" and native.kernels_apply(model)):
        return None
    state = {k: t.numpy() for k, t in model.state_dict().items()}
    return fastcnn.FastCNNStep(state, [np.zeros_like(state[k]) for k in fastcnn.PARAMS], momentum=momentum)


def steps_per_second(name, batch, steps, x, y, threads=2, channels_last=True, bf16=False, compiled=False,
                     kernels=True, whole_step=True):
    """Training images per second. With the kernels, the FastCNN models train as the kernel engine
    does: whole steps without autograd (mnistlab.kernels.fastcnn); ``whole_step=False``: the
    kernels' forward and backward through autograd, with PyTorch's head, loss and optimizer."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(name)
    opt = SGD(model.parameters(), lr=0.01, momentum=0.9)
    stepper = kernel_step(model, 0.9) if kernels and whole_step and not compiled else None
    if channels_last and stepper is None:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compiled else native.forward_for(model, x[:1]) if kernels else model
    order = torch.randperm(len(x))

    def step(b):
        idx = order[(b * batch) % (len(x) - batch):][:batch]
        if stepper is not None:
            stepper.step(prepare(x[idx]).numpy(), y[idx].numpy(), 0.01)
            return
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(prepare(x[idx])), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()

    start = time.perf_counter()
    for b in range(3):  # warm-up (and, compiled, the compilation)
        step(b)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for b in range(steps):
        step(b)
    rate = steps * batch / (time.perf_counter() - start)
    torch.set_num_threads(2)
    return rate, warm


def malloc_defaults(name, batch, steps):
    """The same measurement in a fresh process that leaves glibc's malloc settings alone."""
    out = subprocess.run([sys.executable, __file__, "--child", name, str(batch), str(steps)],
                         check=True, capture_output=True, text=True).stdout
    return tuple(json.loads(out.splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile (slow to compile)")
    parser.add_argument("--models", default="cnn,fastcnn,widecnn", help="which of cnn, fastcnn, widecnn")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "BATCH", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    ds = load_dataset()
    x, y = torch.from_numpy(ds.images[:50000]), torch.from_numpy(ds.labels[:50000]).long()
    if args.child:
        name, batch, steps = args.child
        print(json.dumps(steps_per_second(name, int(batch), int(steps), x, y)))
        return
    keep_freed_memory()
    all_variants = [
        ("ours: compiled kernels, 2 threads, fp32, malloc keeps freed memory", {}),
        ("the kernels through autograd, PyTorch's head, loss and SGD (FastCNN models)", {"whole_step": False}),
        ("PyTorch's layers (oneDNN convolutions) instead of the compiled kernels", {"kernels": False}),
        ("1 thread", {"threads": 1}),
        ("PyTorch's layers, NCHW (default layout)", {"channels_last": False, "kernels": False}),
        ("PyTorch's layers, bf16 autocast", {"bf16": True, "kernels": False}),
        ("batch / 2", {"batch_scale": 0.5}),
        ("batch x 2", {"batch_scale": 2}),
        ("glibc malloc defaults", {"malloc_defaults": True}),
    ]
    if not args.no_compile:
        all_variants.append(("PyTorch's layers, torch.compile", {"compiled": True}))
    print(f"machine: {machine()}; {args.steps} steps, median of {args.repeats}")
    print("| model (batch) | variant | images/s | vs ours | warm-up s |")
    print("|---|---|---|---|---|")
    batches = {"cnn": 64, "fastcnn": 256, "widecnn": 128}
    models = args.models.split(",")
    for name in models:
        if name not in batches:
            parser.error(f"--models: unknown model {name!r}; expected some of: {', '.join(batches)}")
    for name, batch in ((m, batches[m]) for m in models):
        variants = [v for v in all_variants if name != "cnn" or "(FastCNN models)" not in v[0]]
        rates = {label: [] for label, _ in variants}
        warms = {label: [] for label, _ in variants}
        for _ in range(args.repeats):
            for label, kw in variants:
                kw = dict(kw)
                b = int(batch * kw.pop("batch_scale", 1))
                if kw.get("compiled") and warms[label]:
                    rate, warm = rates[label][0], warms[label][0]  # compile once; its rate is stable
                elif kw.pop("malloc_defaults", False):
                    rate, warm = malloc_defaults(name, b, args.steps)
                else:
                    rate, warm = steps_per_second(name, b, args.steps, x, y, **kw)
                rates[label].append(rate)
                warms[label].append(warm)
        base = statistics.median(rates[variants[0][0]])
        for label, _ in variants:
            r, warm = statistics.median(rates[label]), statistics.median(warms[label])
            print(f"| {name} ({batch}) | {label} | {r:,.0f} | {r / base:.2f}x | {warm:.1f} |", flush=True)


if __name__ == "__main__":
    main()
