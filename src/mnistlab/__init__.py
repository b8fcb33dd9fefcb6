"""mnistlab: train, inspect and serve classifiers for MNIST-style 28x28 grayscale images.

The seed's walk-through, step by step::

    import mnistlab
    X, Y = mnistlab.load_mnist()                       # (70000, 784) float32, (70000,) int64
    x_train, y_train, x_valid, y_valid = mnistlab.split(X, Y)
    model = mnistlab.models.CNN()
    history = mnistlab.fit(model, x_train, y_train, x_valid, y_valid, epochs=15, lr=0.1, momentum=0.9)
"""

__version__ = "0.1.0"

from . import models  # noqa: E402
from .classifier import Classifier, load_run  # noqa: E402
from .data import load_dataset, load_mnist, split  # noqa: E402
from .evaluate import evaluate, predict, predict_proba  # noqa: E402
from .models import create_model, list_models, register_model  # noqa: E402
from .prepare import prepare_image  # noqa: E402
from .runs import resume_run, train_run  # noqa: E402
from .train import History, TrainConfig, fit  # noqa: E402

__all__ = [
    "Classifier", "History", "TrainConfig", "create_model", "evaluate", "fit", "list_models", "load_dataset",
    "load_mnist", "load_run", "models", "predict", "predict_proba", "prepare_image", "register_model",
    "resume_run", "split", "train_run",
]
