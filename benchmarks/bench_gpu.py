"""What each choice is worth for the fast preset's recipe on a GPU: time to 99% validation accuracy.

The fast preset's recipe (FastCNN, batch 256, one-cycle Nesterov SGD peak 0.4, weight decay 5e-4,
label smoothing 0.1) on the seed's split, the whole dataset resident on the device, in a loop of
its own so that one choice changes at a time: fp32 without TF32 (the reference), TF32 matmuls and
convolutions, bf16 autocast, channels-last, torch.compile (its compile time counted in the
training time), the images kept as uint8 and converted per batch (the default) or stored as float32
up front, and batch sizes 512 and 1024 (peak lr scaled linearly). Training seconds (validation
excluded, the device synchronised) to the first epoch at or above 99%; medians over --seeds.

Usage: python benchmarks/bench_gpu.py [--device cuda] [--seeds 0,1,2] [--epochs 2] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from mnistlab.data.mnist import load_dataset, split
from mnistlab.models import create_model
from mnistlab.train.optim import SGD
from mnistlab.train.schedule import learning_rate

VARIANTS = {
    "fp32, TF32 off (reference)": {},
    "TF32 on": {"tf32": True},
    "bf16 autocast": {"bf16": True},
    "channels-last": {"channels_last": True},
    "torch.compile (compile time counted)": {"compile": True},
    "images stored as float32 (not uint8)": {"float_data": True},
    "batch 512, peak lr 0.8": {"batch": 512},
    "batch 1024, peak lr 1.6": {"batch": 1024},
    "TF32 + channels-last + batch 512": {"tf32": True, "channels_last": True, "batch": 512},
}


def time_to_99(device, data, seed, epochs, tf32=False, bf16=False, channels_last=False, compile=False,
               float_data=False, batch=256):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    x_train, y_train, x_valid, y_valid = data
    if float_data:
        x_train, x_valid = x_train.float().mul_(1 / 256), x_valid.float().mul_(1 / 256)
    torch.manual_seed(seed)
    model = create_model("fastcnn").to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile else model
    peak = 0.4 * batch / 256
    opt = SGD(model.parameters(), lr=peak, momentum=0.9, nesterov=True, weight_decay=5e-4)
    n = len(x_train)
    steps = math.ceil(n / batch)

    def prepare(xb):
        xb = xb if float_data else xb.float().mul_(1 / 256)
        xb = xb.reshape(-1, 1, 28, 28)
        return xb.contiguous(memory_format=torch.channels_last) if channels_last else xb

    trained, reached, acc = 0.0, None, 0.0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, device=device)
        sync(device)
        start = time.perf_counter()
        for b in range(steps):
            for g in opt.param_groups:
                g["lr"] = learning_rate("onecycle", peak, epoch * steps + b, epochs * steps)
            idx = order[b * batch : (b + 1) * batch]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(forward(prepare(x_train[idx])), y_train[idx], label_smoothing=0.1)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        trained += time.perf_counter() - start
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            correct = sum(int((forward(prepare(x_valid[i : i + 4096])).argmax(1) == y_valid[i : i + 4096]).sum())
                          for i in range(0, len(x_valid), 4096))
        acc = correct / len(x_valid)
        if acc >= 0.99 and reached is None:
            reached = trained
            break
    return reached, trained, acc


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=2,
                        help="epochs of the one-cycle schedule, as the fast preset (default: 2)")
    parser.add_argument("--variants", default=None, help="comma-separated names' first words to keep (default: all)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: no CUDA GPU here; --device cpu times the same loop on the CPU")
    ds = load_dataset()
    x_train, y_train, x_valid, y_valid = split(ds.images, ds.labels, "seed", n_train=ds.n_train)
    data = [torch.from_numpy(a).to(device) for a in (x_train, y_train, x_valid, y_valid)]
    data[1], data[3] = data[1].long(), data[3].long()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"Device: {name}; torch {torch.__version__}; seeds {args.seeds}; medians.", "",
             "| variant | s to 99% (median) | runs reaching 99% | final valid acc (median) | speed vs reference |",
             "|---|---|---|---|---|"]
    reference = None
    for label, options in VARIANTS.items():
        if args.variants and not any(label.startswith(v) for v in args.variants.split(",")):
            continue
        runs = [time_to_99(device, data, int(s), args.epochs, **options) for s in args.seeds.split(",")]
        reached = [r[0] for r in runs if r[0] is not None]
        median = statistics.median(reached) if reached else None
        reference = reference if reference is not None else median
        ratio = f"{reference / median:.2f}x" if median and reference else "—"
        cell = f"{median:.3f}" if median is not None else "not reached"
        lines.append(f"| {label} | {cell} | {len(reached)}/{len(runs)} | "
                     f"{100 * statistics.median(r[2] for r in runs):.2f}% | {ratio} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
