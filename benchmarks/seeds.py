"""Final validation accuracy of the default recipes over several seeds (mean ± std, min, max).

Usage: python benchmarks/seeds.py [--model cnn] [--seeds 0,1,2,3,4] [--epochs 15]
Also prints, per seed, whether the 3x3 grid of validation images 0-8 is all correct.
"""

import argparse
import statistics

import numpy as np
import torch

import mnistlab
from mnistlab.config import TrainConfig
from mnistlab.run.rundir import load_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", choices=mnistlab.list_models())
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default: 0,1,2,3,4)")
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    x_train, y_train, x_valid, y_valid = load_split(TrainConfig())
    accs = []
    for seed in map(int, args.seeds.split(",")):
        config = TrainConfig(model=args.model, epochs=args.epochs, seed=seed, device="cpu")
        torch.manual_seed(seed)
        model = mnistlab.create_model(args.model)
        history = mnistlab.fit(model, x_train, y_train, x_valid, y_valid, config)
        grid_ok = bool(np.array_equal(mnistlab.predict(model, x_valid[:9]), y_valid[:9]))
        accs.append(100 * history.valid_acc[-1])
        print(f"seed {seed}: valid_acc {accs[-1]:.2f}%  valid_loss {history.valid_loss[-1]:.4f}  "
              f"grid all correct: {grid_ok}", flush=True)
    spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"{args.model}, {args.epochs} epochs, {len(accs)} seeds: {statistics.mean(accs):.2f} ± {spread:.2f}% "
          f"(min {min(accs):.2f}, max {max(accs):.2f})")


if __name__ == "__main__":
    main()
