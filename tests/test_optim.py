import pytest
import torch
import torch.nn.functional as F

from mnistlab.models import create_model
from mnistlab.train.optim import SGD, WeightAverage
from mnistlab.train.schedule import learning_rate


def _train(model, opt, steps=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.rand(16, 784, generator=g), torch.randint(0, 10, (16,), generator=g)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("kwargs", [
    {"lr": 0.1, "momentum": 0.9},
    {"lr": 0.5, "momentum": 0.0},
    {"lr": 0.3, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
    {"lr": 0.2, "momentum": 0.0, "weight_decay": 1e-3},
])
def test_sgd_is_torch_sgd_bit_for_bit(kwargs):
    models = []
    for make_opt in (lambda p: torch.optim.SGD(p, **kwargs), lambda p: SGD(p, **kwargs)):
        torch.manual_seed(0)
        model = create_model("fastcnn")
        _train(model, make_opt(model.parameters()))
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_sgd_state_round_trips_through_torchs_layout():
    torch.manual_seed(0)
    model = create_model("cnn")
    ours = SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, ours, steps=2)
    theirs = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    theirs.load_state_dict(ours.state_dict())  # torch reads what we write
    again = SGD(model.parameters(), lr=0.7, momentum=0.9)
    again.load_state_dict(theirs.state_dict())  # and we read what torch writes
    assert again.param_groups[0]["lr"] == 0.1
    for p in model.parameters():
        assert torch.equal(again.state[p]["momentum_buffer"], ours.state[p]["momentum_buffer"])
    with pytest.raises(ValueError, match="does not match"):
        SGD(create_model("linear").parameters(), lr=0.1).load_state_dict(ours.state_dict())


def test_onecycle_rises_then_falls_to_zero():
    lrs = [learning_rate("onecycle", 0.4, step, 100, warmup=0.25) for step in range(100)]
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(0.4) and peak == 24
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1 : peak + 1], strict=True))
    assert all(a > b for a, b in zip(lrs[peak:-1], lrs[peak + 1 :], strict=True))
    assert 0 < lrs[-1] < 0.01 and lrs[0] == pytest.approx(0.4 / 25)
    assert learning_rate("constant", 0.1, 50, 100) == 0.1
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        learning_rate("cosine", 0.1, 0, 10)


def test_weight_average_is_an_exponential_moving_average_with_warm_up():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    average = WeightAverage(model, decay=0.5)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.add_(2.0)
        model[1].num_batches_tracked.add_(7)
    average.update(model)  # step 1: decay min(0.5, 2/11)
    d = 2 / 11
    avg = average.model.state_dict()
    torch.testing.assert_close(avg["0.weight"], start["0.weight"] * d + model[0].weight * (1 - d))
    torch.testing.assert_close(avg["1.running_mean"], start["1.running_mean"] * d + 2.0 * (1 - d))
    assert avg["1.num_batches_tracked"] == 7  # integer buffers are copied
    previous = avg["0.bias"].clone()
    for _ in range(20):
        average.update(model)
    assert average.steps == 21
    # from step 8 on the decay is 0.5: the gap to the current weights halves every step
    gap = (model[0].bias - average.model[0].bias).abs()
    assert torch.all(gap < (model[0].bias - previous).abs() * 0.5**12)
    assert not any(p.requires_grad for p in average.model.parameters())
    copy = WeightAverage(model, decay=0.5)
    copy.load_state_dict(average.state_dict())
    assert copy.steps == 21 and torch.equal(copy.model[0].weight, average.model[0].weight)
    with pytest.raises(ValueError, match="decay must be in"):
        WeightAverage(model, decay=1.0)


def test_a_learning_rate_held_in_a_tensor_gives_the_same_steps():
    """The CUDA graph's SGD reads its learning rate from a tensor (nothing baked into the graph)."""
    torch.manual_seed(0)
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    a = SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    b = SGD(twins, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for step in range(6):
        lr = 0.05 * (step + 1)
        a.param_groups[0]["lr"] = lr
        b.param_groups[0]["lr"] = torch.tensor(lr)
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, twins, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # (alpha may be fused into one rounding)
    assert isinstance(b.state_dict()["param_groups"][0]["lr"], float)  # a checkpoint's JSON takes it
