"""The seed's walk-through, section by section, with the mnistlab API.

Run: python examples/walkthrough.py [--epochs 15] [--out walkthrough]
Writes the seed's pictures (first example, loss curves of both models, the 3x3 grid)
into --out and prints what the seed prints.
"""

import argparse
from pathlib import Path

import torch

import mnistlab
from mnistlab import plots

parser = argparse.ArgumentParser(description="the seed's walk-through with mnistlab")
parser.add_argument("--epochs", type=int, default=15, help="epochs for each model (default: 15)")
parser.add_argument("--out", default="walkthrough", help="folder for the pictures (default: walkthrough)")
args = parser.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

# ## Import MNIST: 70,000 flattened 28x28 images, pixels / 256, labels int64.
X, Y = mnistlab.load_mnist()  # (70000, 784) float32, (70000,) int64
print("X", X.shape, X.dtype, "Y", Y.shape, Y.dtype)

# The 5:2 split: first 50,000 train, last 20,000 validation.
x_train, y_train, x_valid, y_valid = mnistlab.split(X, Y)

# Take a look at the first training example!
plots.save(plots.plot_example(x_train[0], int(y_train[0])), out / "first_example.png")

# Some technical steps: torch tensors (fit batches them from memory; no DataLoader needed).
x_train, y_train, x_valid, y_valid = map(torch.tensor, (x_train, y_train, x_valid, y_valid))

# ## Model, optimizer & loss: the linear model, SGD with learning rate 0.5, cross-entropy.
torch.manual_seed(0)
model = mnistlab.models.FeedForward()
# ## Training and validation: 15 passes, reshuffled each time, validation loss after each.
history = mnistlab.fit(model, x_train, y_train, x_valid, y_valid, epochs=args.epochs, lr=0.5, momentum=0.0)
for e in history.epochs:
    print(f"linear epoch {e['epoch']}: train {e['train_loss']:.4f}  valid {e['valid_loss']:.4f}")
# Can also plot both losses over epochs.
plots.save(plots.plot_history(history.epochs, "Linear model"), out / "linear_loss.png")

# ## Make a prediction: the first nine validation images and the predicted labels.
with torch.no_grad():
    print(torch.argmax(model(x_valid[0:9]), axis=1).reshape(3, 3))  # vs [[3, 8, 6], [9, 6, 4], [5, 3, 8]]

# # CNN: three stride-2 convolutions and an average pool; SGD lr 0.1, momentum 0.9.
torch.manual_seed(0)
model = mnistlab.models.CNN()
history = mnistlab.fit(model, x_train, y_train, x_valid, y_valid, epochs=args.epochs, lr=0.1, momentum=0.9)
for e in history.epochs:
    print(f"cnn epoch {e['epoch']}: train {e['train_loss']:.4f}  valid {e['valid_loss']:.4f}  "
          f"acc {100 * e['valid_acc']:.2f}%")
plots.save(plots.plot_history(history.epochs, "CNN"), out / "cnn_loss.png")

model.eval()
with torch.no_grad():
    predictions = torch.argmax(model(x_valid[0:9]), axis=1)
print(predictions.reshape(3, 3))  # Pred
plots.save(plots.plot_grid(x_valid[:9], y_valid[:9], 3, 3, predictions), out / "predictions.png")
print(f"pictures in {out}/")
