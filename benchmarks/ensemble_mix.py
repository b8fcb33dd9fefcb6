"""Which mix of recipes makes the best ensemble: every subset of finished runs, grouped by recipe.

Usage: python benchmarks/ensemble_mix.py [--tta] [--size 5] RUN_DIR [RUN_DIR ...]

The runs must share a validation part (use holdout runs: the choice is made there). Runs are
grouped by recipe (model, augmentation, subsample, epochs); a mix is how many members each
recipe gives. For each mix of at most ``--size`` members, every subset of the runs with that mix
is scored as ``mnistlab ensemble`` scores it (mean class probabilities), and the line gives the
mean accuracy over those subsets, with their min and max and how many there were. Each run's
probabilities are computed once.
"""

import argparse
import itertools
from collections import defaultdict

import numpy as np

from mnistlab.data.mnist import load_dataset
from mnistlab.evaluation import predict_proba
from mnistlab.models import load_model
from mnistlab.run.rundir import load_split, read_config


def recipe(config) -> str:
    parts = [config.model, f"{config.epochs} epochs", f"augment {config.augment}"]
    if config.subsample < 1:
        parts.append(f"subsample {config.subsample:g}")
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--tta", action="store_true", help="average each run over the 9 one-pixel shifts first")
    parser.add_argument("--size", type=int, default=5, help="largest ensemble (default 5)")
    args = parser.parse_args()

    configs = [read_config(d) for d in args.runs]
    if len({(c.split, c.data_dir) for c in configs}) != 1:
        raise SystemExit("the runs must share a split and a dataset")
    _, _, x_valid, y_valid = load_split(configs[0], load_dataset(configs[0].data_dir))
    y_valid = np.asarray(y_valid)
    groups = defaultdict(list)
    for d, c in zip(args.runs, configs, strict=True):
        groups[recipe(c)].append(predict_proba(load_model(d), x_valid, tta=args.tta).astype(np.float64))
    names = sorted(groups)
    print(f"{len(y_valid)} images, split {configs[0].split}, {'with' if args.tta else 'without'} --tta")
    for i, name in enumerate(names):
        print(f"  recipe {chr(65 + i)}: {name} ({len(groups[name])} runs)")

    rows = []
    for counts in itertools.product(*(range(len(groups[n]) + 1) for n in names)):
        if not 0 < sum(counts) <= args.size:
            continue
        accs = []
        choices = [itertools.combinations(groups[n], k) for n, k in zip(names, counts, strict=True)]
        for picks in itertools.product(*choices):
            total = sum(p for pick in picks for p in pick)
            accs.append(float((total.argmax(1) == y_valid).mean()))
        mix = " + ".join(f"{k}{chr(65 + i)}" for i, k in enumerate(counts) if k)
        rows.append((sum(counts), -np.mean(accs), mix, np.mean(accs), min(accs), max(accs), len(accs)))
    print("| members | mix | mean accuracy | min – max | subsets |")
    print("|---|---|---|---|---|")
    for size, _, mix, mean, low, high, n in sorted(rows):
        print(f"| {size} | {mix} | {100 * mean:.3f}% | {100 * low:.2f} – {100 * high:.2f}% | {n} |")


if __name__ == "__main__":
    main()
