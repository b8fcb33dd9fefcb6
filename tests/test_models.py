import pytest
import torch

import mnistlab
from mnistlab.errors import UsageError
from mnistlab.models import CNN, FeedForward, count_parameters, create_model, list_models


def test_registry_lists_the_seed_models():
    assert {"linear", "cnn"} <= set(list_models())
    assert isinstance(create_model("linear"), FeedForward)
    assert isinstance(create_model("cnn"), CNN)


def test_unknown_model_name_says_what_is_allowed():
    with pytest.raises(UsageError, match=r"unknown model 'resnet'; expected one of: .*cnn.*linear"):
        create_model("resnet")


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("shape", [(5, 784), (5, 1, 28, 28)])
def test_forward_and_backward(name, shape):
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.rand(shape)
    out = model(x)
    assert out.shape == (5, 10)
    torch.nn.functional.cross_entropy(out, torch.arange(5)).backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_num_classes(name):
    assert create_model(name, num_classes=3)(torch.rand(2, 784)).shape == (2, 3)


def test_seed_layers_and_shapes():
    cnn = CNN()
    assert [tuple(c.weight.shape) for c in (cnn.conv1, cnn.conv2, cnn.conv3)] == [
        (16, 1, 3, 3), (16, 16, 3, 3), (10, 16, 3, 3)]
    x = torch.rand(2, 1, 28, 28)
    h1 = cnn.conv1(x)
    h2 = cnn.conv2(h1)
    h3 = cnn.conv3(h2)
    assert h1.shape[1:] == (16, 14, 14) and h2.shape[1:] == (16, 7, 7) and h3.shape[1:] == (10, 4, 4)
    assert count_parameters(FeedForward()) == 784 * 10 + 10
    assert tuple(FeedForward().lin.weight.shape) == (10, 784)


def test_models_match_the_seed_code_with_the_same_seed():
    """Same initialisation as the seed's classes: built under one seed, equal weights."""

    class SeedFeedForward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(784, 10)

    torch.manual_seed(1)
    ours = mnistlab.models.FeedForward()
    torch.manual_seed(1)
    seed = SeedFeedForward()
    assert torch.equal(ours.lin.weight, seed.lin.weight) and torch.equal(ours.lin.bias, seed.lin.bias)
