"""mnistlab: train, inspect and serve classifiers for MNIST-style 28x28 grayscale images.

The seed's walk-through, step by step::

    import mnistlab
    X, Y = mnistlab.load_mnist()                       # (70000, 784) float32, (70000,) int64
    x_train, y_train, x_valid, y_valid = mnistlab.split(X, Y)
    model = mnistlab.models.CNN()
    history = mnistlab.fit(model, x_train, y_train, x_valid, y_valid, epochs=15, lr=0.1, momentum=0.9)
"""

__version__ = "0.1.0"

# The API is imported on first use (PEP 562), so that `import mnistlab.cli` and the fast preset's
# training, which need no PyTorch, do not pay for importing it (1.7-2.5 s on 2 cores).
_API = {
    "Classifier": "use.classifier", "load_run": "use.classifier", "load_dataset": "data.mnist",
    "load_mnist": "data.mnist", "split": "data.mnist", "evaluate": "evaluation", "predict": "evaluation",
    "predict_proba": "evaluation", "create_model": "models", "list_models": "models", "register_model": "models",
    "prepare_image": "use.prepare", "resume_run": "run.driver", "train_run": "run.driver", "History": "config",
    "TrainConfig": "config", "fit": "train.loop",
}

__all__ = [
    "Classifier", "History", "TrainConfig", "create_model", "evaluate", "fit", "list_models", "load_dataset",
    "load_mnist", "load_run", "models", "predict", "predict_proba", "prepare_image", "register_model",
    "resume_run", "split", "train_run",
]


def __getattr__(name: str):
    import importlib

    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    elif name == "models":
        value = importlib.import_module(".models", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
