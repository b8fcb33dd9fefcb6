import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import mnistlab
from mnistlab.config import TrainConfig
from mnistlab.errors import TrainingDiverged, UsageError
from mnistlab.evaluation import evaluate, predict_proba


@pytest.fixture(scope="module")
def slices(mnist):
    x, y = mnist.images, mnist.labels
    return x[:5000], y[:5000], x[50000:51000], y[50000:51000]


def test_a_short_run_measurably_learns(slices):
    x_train, y_train, x_valid, y_valid = slices
    torch.manual_seed(0)
    model = mnistlab.models.CNN()
    before = evaluate(model, x_valid, y_valid)
    history = mnistlab.fit(model, x_train, y_train, x_valid, y_valid, epochs=4, device="cpu")
    assert [e["epoch"] for e in history.epochs] == [1, 2, 3, 4]
    assert history.train_loss[-1] < history.train_loss[0]
    assert history.valid_acc[-1] > before["acc"] + 0.4  # from ~10% (chance) to over 50%
    assert history.valid_loss[-1] < before["loss"] / 2


def test_float_and_uint8_inputs_train_identically(slices):
    x_train, y_train, x_valid, y_valid = (a[:640] for a in slices)
    results = []
    for xt, xv in ((x_train, x_valid), (x_train.astype(np.float32) / 256, x_valid.astype(np.float32) / 256)):
        torch.manual_seed(0)
        model = mnistlab.models.FeedForward()
        h = mnistlab.fit(model, xt, y_train, xv, y_valid, epochs=2, device="cpu")
        results.append((h.valid_loss, model.lin.weight.detach().clone()))
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1])


def test_same_seed_same_result(slices):
    x_train, y_train, x_valid, y_valid = slices
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = mnistlab.models.CNN()
        mnistlab.fit(model, x_train[:1000], y_train[:1000], x_valid, y_valid, epochs=1, device="cpu")
        weights.append(model.conv2.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])


def test_training_matches_the_seeds_code_batch_for_batch(slices):
    """Reference: the seed's loop with its DataLoaders, seeded the same way."""
    x_train, y_train, x_valid, y_valid = (a[:1000] for a in slices)
    xt = torch.from_numpy(x_train.astype(np.float32) / 256)
    xv = torch.from_numpy(x_valid.astype(np.float32) / 256)
    torch.manual_seed(7)
    train_dl = DataLoader(TensorDataset(xt, torch.from_numpy(y_train)), batch_size=64, shuffle=True)
    valid_dl = DataLoader(TensorDataset(xv, torch.from_numpy(y_valid)), batch_size=128)
    seed_model = mnistlab.models.CNN()
    opt = torch.optim.SGD(seed_model.parameters(), lr=0.1, momentum=0.9)
    seed_valid = []
    for _ in range(2):
        seed_model.train()
        for xb, yb in train_dl:
            F.cross_entropy(seed_model(xb), yb).backward()
            opt.step()
            opt.zero_grad()
        seed_model.eval()
        with torch.no_grad():
            seed_valid.append(sum(F.cross_entropy(seed_model(xb), yb).tolist() for xb, yb in valid_dl) / len(valid_dl))

    torch.manual_seed(7)
    ours = mnistlab.models.CNN()
    history = mnistlab.fit(ours, x_train, y_train, x_valid, y_valid, epochs=2, device="cpu")
    assert history.valid_loss == pytest.approx(seed_valid, rel=1e-4)
    # Rounding differs (channels-last layout, the compiled kernels, mnistlab.kernels) and
    # momentum carries it through 32 steps: ~5e-4 at most; another batch order moves weights by 4e-3 to 5e-2.
    for a, b in zip(ours.parameters(), seed_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert torch.rand(()) == _rng_after_seed_code(7, x_train, xt, xv, y_train, y_valid)


def _rng_after_seed_code(seed, x_train, xt, xv, y_train, y_valid):
    """The global generator's next draw after the seed's two epochs: fit consumes it the same way."""
    torch.manual_seed(seed)
    train_dl = DataLoader(TensorDataset(xt, torch.from_numpy(y_train)), batch_size=64, shuffle=True)
    valid_dl = DataLoader(TensorDataset(xv, torch.from_numpy(y_valid)), batch_size=128)
    mnistlab.models.CNN()
    for _ in range(2):
        for _batch in train_dl:
            pass
        for _batch in valid_dl:
            pass
    return torch.rand(())


def test_validation_loss_is_the_seeds_mean_of_batch_means(slices):
    """Reference: the seed's own expression over a DataLoader with batch 128."""
    _, _, x_valid, y_valid = slices
    x_valid, y_valid = x_valid[:1000], y_valid[:1000]  # 7 full batches of 128 and one of 104
    torch.manual_seed(0)
    model = mnistlab.models.CNN().eval()
    xf = torch.from_numpy(x_valid.astype(np.float32) / 256)
    valid_dl = DataLoader(TensorDataset(xf, torch.from_numpy(y_valid)), batch_size=128)
    with torch.no_grad():
        expected = sum(F.cross_entropy(model(xb), yb).tolist() for xb, yb in valid_dl) / len(valid_dl)
        expected_acc = float((model(xf).argmax(1) == torch.from_numpy(y_valid)).float().mean())
    got = evaluate(model, x_valid, y_valid, batch_size=128)
    assert got["loss"] == pytest.approx(expected, rel=1e-6)
    assert got["acc"] == pytest.approx(expected_acc)
    plain_mean = float(F.cross_entropy(model(xf), torch.from_numpy(y_valid)).detach())
    assert abs(got["loss"] - plain_mean) > 1e-7  # the last, smaller batch is weighted as the seed weights it


def test_recipe_defaults_follow_the_tutorial():
    assert (TrainConfig(model="linear").lr, TrainConfig(model="linear").momentum) == (0.5, 0.0)
    assert (TrainConfig(model="cnn").lr, TrainConfig(model="cnn").momentum) == (0.1, 0.9)
    assert TrainConfig(model="cnn", lr=0.05).lr == 0.05


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": 0}, "epochs must be a positive integer, got 0"),
        ({"batch_size": -1}, "batch_size must be a positive integer, got -1"),
        ({"lr": 0.0}, "lr must be a positive number, got 0.0"),
        ({"lr": float("nan")}, "lr must be a positive number"),
        ({"momentum": 1.5}, r"momentum must be a number in \[0, 1\)"),
        ({"device": "tpu"}, "unknown device 'tpu'; expected one of: auto, cpu, cuda"),
        ({"split": "half"}, "unknown split 'half'"),
    ],
)
def test_bad_config_values_are_rejected(kwargs, message):
    with pytest.raises(UsageError, match=message):
        TrainConfig(**kwargs)


def test_divergence_stops_with_advice(slices):
    x_train, y_train, x_valid, y_valid = slices
    torch.manual_seed(0)
    with pytest.raises(TrainingDiverged, match=r"diverged.*nan in epoch 1.*lower learning rate than 1e\+38"):
        mnistlab.fit(mnistlab.models.FeedForward(), x_train, y_train, x_valid, y_valid,
                     epochs=2, lr=1e38, device="cpu")


def test_cuda_request_without_cuda_is_a_usage_error(slices):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    x_train, y_train, x_valid, y_valid = slices
    with pytest.raises(UsageError, match="CUDA is not available"):
        mnistlab.fit(mnistlab.models.FeedForward(), x_train, y_train, x_valid, y_valid, epochs=1, device="cuda")


def test_ema_validates_and_leaves_the_averaged_weights(slices):
    x_train, y_train, x_valid, y_valid = (a[:2000] for a in slices)
    finals = []
    for ema in (0.0, 0.95):
        torch.manual_seed(0)
        model = mnistlab.create_model("fastcnn")
        history = mnistlab.fit(model, x_train, y_train, x_valid, y_valid, epochs=2, batch_size=64, device="cpu",
                               ema=ema)
        scored = evaluate(model, x_valid, y_valid, batch_size=128)
        assert scored["loss"] == pytest.approx(history.valid_loss[-1], rel=1e-5)  # the model is what was validated
        finals.append(model.head.weight.detach().clone())
    assert not torch.equal(finals[0], finals[1])  # the same steps, averaged weights


@pytest.mark.parametrize("tta", [False, True])
def test_evaluate_keeps_the_probabilities_predict_proba_gives(slices, tta):
    _, _, x_valid, y_valid = slices
    torch.manual_seed(0)
    model = mnistlab.models.CNN()
    got = evaluate(model, x_valid, y_valid, tta=tta, keep_proba=True)
    expected = predict_proba(model, x_valid, tta=tta)
    assert got["proba"].shape == (len(x_valid), 10) and got["proba"].dtype == np.float32
    np.testing.assert_allclose(got["proba"], expected, rtol=1e-5, atol=1e-7)
    assert got["acc"] == pytest.approx(float((expected.argmax(1) == y_valid).mean()))
    assert "proba" not in evaluate(model, x_valid, y_valid, tta=tta)


def test_fit_keeps_the_last_epochs_validation_probabilities(slices):
    x_train, y_train, x_valid, y_valid = slices
    torch.manual_seed(0)
    model = mnistlab.models.CNN()
    history = mnistlab.fit(model, x_train[:1000], y_train[:1000], x_valid, y_valid, epochs=2, device="cpu")
    proba = history.valid_proba
    assert float((proba.argmax(1) == y_valid).mean()) == pytest.approx(history.valid_acc[-1])
    np.testing.assert_allclose(proba, predict_proba(model, x_valid), rtol=1e-5, atol=1e-7)
