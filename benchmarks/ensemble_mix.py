"""Which mix of recipes makes the best ensemble: every subset of finished runs, grouped by recipe.

Usage: python benchmarks/ensemble_mix.py [--tta] [--size 5] RUN_DIR [RUN_DIR ...]

The runs must share a validation part (use holdout runs: the choice is made there). Runs are
grouped by recipe (every setting but the seed); a mix is how many members each
recipe gives. For each mix of at most ``--size`` members, every subset of the runs with that mix
is scored as ``mnistlab ensemble`` scores it (mean class probabilities), and the line gives the
mean accuracy over those subsets, with their min and max and how many there were
(``mnistlab.lab.ensemble.mixes``).
"""

import argparse
import sys

from mnistlab.errors import MnistlabError
from mnistlab.lab.ensemble import mixes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--tta", action="store_true", help="average each run over the 9 one-pixel shifts first")
    parser.add_argument("--size", type=int, default=5, help="largest ensemble (default 5)")
    args = parser.parse_args()
    try:
        names, rows = mixes(args.runs, size=args.size, tta=args.tta)
    except MnistlabError as exc:
        print(f"ensemble_mix: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    print(f"{'with' if args.tta else 'without'} --tta")
    for i, name in enumerate(names):
        print(f"  recipe {chr(65 + i)}: {name}")
    print("| members | mix | mean accuracy | min – max | subsets |")
    print("|---|---|---|---|---|")
    for r in rows:
        mix = " + ".join(f"{k}{chr(65 + i)}" for i, k in enumerate(r["counts"]) if k)
        print(f"| {r['members']} | {mix} | {100 * r['mean']:.3f}% | {100 * r['min']:.2f} – {100 * r['max']:.2f}% "
              f"| {r['subsets']} |")


if __name__ == "__main__":
    main()
