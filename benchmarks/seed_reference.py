"""The seed's CNN code as written, as the reference for speed comparisons.

Its gaps are filled the way its text says (``train_dl``/``valid_dl`` DataLoaders with
batch 64 / 128, shuffled training data, ``opt.zero_grad()``, SGD lr 0.1 momentum 0.9).
The data comes from ``mnistlab.load_mnist()`` instead of ``fetch_openml`` (same rows,
no network). Prints one JSON line: training seconds, final validation loss and accuracy.

Usage: python benchmarks/seed_reference.py [--epochs 15] [--seed 0]
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import DataLoader, TensorDataset

import mnistlab


class CNN(nn.Module):
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


def main() -> None:
    parser = argparse.ArgumentParser(description="the seed's CNN code as written")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    X, Y = mnistlab.load_mnist()
    x_train, y_train, x_valid, y_valid = X[:50000, :], Y[:50000], X[50000:, :], Y[50000:]
    x_train, y_train, x_valid, y_valid = map(torch.tensor, (x_train, y_train, x_valid, y_valid))
    train_ds = TensorDataset(x_train, y_train)
    valid_ds = TensorDataset(x_valid, y_valid)
    torch.manual_seed(args.seed)
    train_dl = DataLoader(train_ds, batch_size=64, shuffle=True)
    valid_dl = DataLoader(valid_ds, batch_size=128)

    model = CNN()
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_func = F.cross_entropy

    start = time.perf_counter()
    for _epoch in range(args.epochs):
        model.train()
        for xb, yb in train_dl:
            pred = model(xb)
            loss = loss_func(pred, yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            losses, correct = [], 0
            for xb, yb in valid_dl:  # one pass, as the seed's: loss, and the accuracy beside it
                pred = model(xb)
                losses.append(loss_func(pred, yb).tolist())
                correct += (pred.argmax(1) == yb).sum().item()
            valid_loss = sum(losses) / len(valid_dl)
    seconds = time.perf_counter() - start
    print(json.dumps({"recipe": "seed code as written", "epochs": args.epochs, "train_seconds": seconds,
                      "valid_loss": valid_loss, "valid_acc": correct / len(valid_ds)}))


if __name__ == "__main__":
    main()
