"""The reference recipes ``mnistlab bench`` measures ours against, written as their authors wrote them.

``seed``: the seed's CNN code as written: a ``TensorDataset`` of float pixels, ``DataLoader``
batches of 64 (shuffled) and 128, SGD lr 0.1 momentum 0.9, with the gaps filled the way
its text says. ``examples``: the pytorch/examples MNIST recipe: inputs standardised with
mean 0.1307 / std 0.3081, two 3x3 convs (32, 64), max-pool, dropout 0.25, FC 9216->128,
dropout 0.5, FC 10; Adadelta lr 1.0, StepLR gamma 0.7 per epoch, batch 64. Both train on
the seed's split (first 50,000) and are scored on its last 20,000 images, read from the
shipped MNIST instead of the network.

Run as ``python -m mnistlab.lab.reference RECIPE [--epochs N] [--max-batches B] [--target ACC] [--max-valid N]``;
it prints one JSON object per epoch: cumulative training seconds (validation excluded),
images trained on, validation accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import DataLoader, TensorDataset

RECIPES = ("seed", "examples")


class SeedCNN(nn.Module):
    """The seed's ``CNN``, line for line."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 16, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(16, 10, kernel_size=3, stride=2, padding=1)

    def forward(self, xb):
        xb = xb.view(-1, 1, 28, 28)
        xb = F.relu(self.conv1(xb))
        xb = F.relu(self.conv2(xb))
        xb = F.relu(self.conv3(xb))
        xb = F.avg_pool2d(xb, 4)
        return xb.view(-1, xb.size(1))


class ExamplesNet(nn.Module):
    """pytorch/examples ``mnist/main.py``'s ``Net``."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


def _data(recipe: str):
    from ..data.mnist import load_mnist

    X, Y = load_mnist()  # (70000, 784) pixels / 256, as the seed's
    if recipe == "examples":  # ToTensor (/255) then Normalize((0.1307,), (0.3081,)), image-shaped
        X = ((X * (256 / 255) - 0.1307) / 0.3081).reshape(-1, 1, 28, 28)
    x_train, y_train, x_valid, y_valid = X[:50000], Y[:50000], X[50000:], Y[50000:]
    return map(torch.tensor, (x_train, y_train, x_valid, y_valid))


def run(recipe: str, epochs: int, seed: int = 0, max_batches: int | None = None, target: float | None = None,
        device: str = "cpu", max_valid: int | None = None):
    """Train ``recipe``; yields one dict per epoch (see the module's docstring).

    ``max_batches`` ends each epoch early, ``max_valid`` scores on the first images only
    (for quick speed measurements).
    """
    x_train, y_train, x_valid, y_valid = _data(recipe)
    x_valid, y_valid = x_valid[:max_valid], y_valid[:max_valid]
    torch.manual_seed(seed)
    train_ds, valid_ds = TensorDataset(x_train, y_train), TensorDataset(x_valid, y_valid)
    if recipe == "seed":
        train_dl = DataLoader(train_ds, batch_size=64, shuffle=True)
        valid_dl = DataLoader(valid_ds, batch_size=128)
        model = SeedCNN().to(device)
        opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss_func, scheduler = F.cross_entropy, None
    else:
        train_dl = DataLoader(train_ds, batch_size=64, shuffle=True)
        valid_dl = DataLoader(valid_ds, batch_size=1000)
        model = ExamplesNet().to(device)
        opt = optim.Adadelta(model.parameters(), lr=1.0)
        loss_func, scheduler = F.nll_loss, optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    seconds, images = 0.0, 0
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        model.train()
        for b, (xb, yb) in enumerate(train_dl):
            if max_batches is not None and b >= max_batches:
                break
            xb, yb = xb.to(device), yb.to(device)
            loss = loss_func(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
            images += len(xb)
        if scheduler is not None:
            scheduler.step()
        if device != "cpu":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        model.eval()
        correct = 0
        with torch.no_grad():
            for xb, yb in valid_dl:
                correct += (model(xb.to(device)).argmax(1) == yb.to(device)).sum().item()
        acc = correct / len(valid_ds)
        yield {"recipe": recipe, "epoch": epoch, "train_seconds": seconds, "images": images, "valid_acc": acc}
        if target is not None and acc >= target:
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnistlab.lab.reference", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", choices=RECIPES)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batches", type=int, default=None, help="stop each epoch after this many batches")
    parser.add_argument("--target", type=float, default=None, help="stop after the first epoch at this accuracy")
    parser.add_argument("--max-valid", type=int, default=None, help="score on this many validation images only")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for record in run(args.recipe, args.epochs, args.seed, args.max_batches, args.target, args.device,
                      args.max_valid):
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
