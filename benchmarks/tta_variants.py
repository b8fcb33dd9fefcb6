"""Test-time augmentation variants scored on finished runs: which views to average.

Usage: python benchmarks/tta_variants.py RUN_DIR [RUN_DIR ...]
Each run's model sees its own validation part (use holdout runs: choices are made there)
under 31 views: the 25 shifts by up to 2 pixels, rotations by ±5 and ±10 degrees, and
scaling by 0.9 and 1.1. Each line is a set of views whose probabilities are averaged: its
accuracy for every run, and the mean over the runs. ``cur9`` is what ``--tta`` does.
About 4 minutes per bncnn run on 2 cores.
"""

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F

from mnistlab.data.shift import shift_images
from mnistlab.evaluation import logits
from mnistlab.run.rundir import load_split, read_config
from mnistlab.run.trained import load_model
from mnistlab.train.augment import affine_theta


def turned(x: torch.Tensor, degrees: float = 0.0, zoom: float = 1.0) -> torch.Tensor:
    """uint8 images (N, ...) rotated and scaled about their centre -> float pixels in [0, 1), (N, 784)."""
    images = x.reshape(-1, 1, 28, 28).float() / 256
    one = torch.ones(1, dtype=torch.float64)  # the matrix in double, rounded once, as for a Python float
    theta = affine_theta(one * math.radians(degrees), one * zoom, 0 * one, 0 * one).float().expand(len(images), 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False).reshape(len(x), -1)


SHIFT = [f"s{dy}_{dx}" for dy in range(-2, 3) for dx in range(-2, 3)]
VIEWS = SHIFT + ["r-10", "r-5", "r5", "r10", "z0.9", "z1.1"]
CUR9 = [f"s{dy}_{dx}" for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
PLUS5 = ["s0_0", "s-1_0", "s1_0", "s0_-1", "s0_1"]
SETS = {
    "none": ["s0_0"], "cur9": CUR9, "plus5": PLUS5, "shifts25": SHIFT,
    "cur9+rot5": CUR9 + ["r-5", "r5"], "cur9+rot10": CUR9 + ["r-10", "r-5", "r5", "r10"],
    "cur9+zoom": CUR9 + ["z0.9", "z1.1"], "cur9+rot5+zoom": CUR9 + ["r-5", "r5", "z0.9", "z1.1"],
    "none+rot5": ["s0_0", "r-5", "r5"], "plus5+rot5": PLUS5 + ["r-5", "r5"],
}


def view(x: torch.Tensor, name: str) -> torch.Tensor:
    if name.startswith("s"):
        dy, dx = map(int, name[1:].split("_"))
        return shift_images(x, dy, dx)
    if name.startswith("r"):
        return turned(x, degrees=float(name[1:]))
    return turned(x, zoom=float(name[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    args = parser.parse_args()
    table = {name: [] for name in SETS}
    for run in args.run_dirs:
        model = load_model(run)
        _, _, x_valid, y_valid = load_split(read_config(run))
        x = torch.from_numpy(x_valid)
        proba = {v: torch.softmax(logits(model, view(x, v), 2048), dim=1).numpy() for v in VIEWS}
        for name, views in SETS.items():
            mean = np.mean([proba[v] for v in views], axis=0)
            table[name].append(100 * float((mean.argmax(axis=1) == y_valid).mean()))
        print(f"{run}: done", flush=True)
    print("| views | " + " | ".join(args.run_dirs) + " | mean |")
    print("|---" * (len(args.run_dirs) + 2) + "|")
    for name, accs in table.items():
        print(f"| {name} | " + " | ".join(f"{a:.2f}%" for a in accs) + f" | {np.mean(accs):.3f}% |")


if __name__ == "__main__":
    main()
