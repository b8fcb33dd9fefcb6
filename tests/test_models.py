import numpy as np
import pytest
import torch

import mnistlab
from mnistlab.errors import UsageError
from mnistlab.models import CNN, FeedForward, count_parameters, create_model, deskew, list_models


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


def _moments(images: np.ndarray):
    """Centre of mass (row, col), horizontal shear cov(row, col) / var(row) and the standard deviation
    across the columns after that shear, of each (28, 28) image."""
    r = np.arange(28.0)
    mass = images.sum((1, 2))
    cy = (images.sum(2) * r).sum(1) / mass
    cx = (images.sum(1) * r).sum(1) / mass
    dy, dx = r[None] - cy[:, None], r[None] - cx[:, None]
    var_y = (images.sum(2) * dy * dy).sum(1) / mass
    cov = (images * dy[:, :, None] * dx[:, None, :]).sum((1, 2)) / mass
    var_x = (images.sum(1) * dx * dx).sum(1) / mass
    skew = cov / var_y
    return cy, cx, skew, np.sqrt(var_x - skew * cov)


def _sheared_by_rows(images: np.ndarray, limit: float = 1.0, width: float | None = None) -> np.ndarray:
    """The deskewing written out by hand: row r of the result samples row r of the image at columns
    cx + s (c - cx) + alpha (r - cy), linearly interpolated, zero outside (s = 1 without ``width``)."""
    cy, cx, alpha, std_x = _moments(images)
    assert np.abs(alpha).max() < limit  # so the deskewed width is std_x
    s = np.ones_like(alpha) if width is None else np.clip(std_x / width, 1 / 2.5, 2.5)
    out = np.zeros_like(images)
    cols = np.arange(28.0)
    for i, image in enumerate(images):
        for r in range(28):
            at = cx[i] + s[i] * (cols - cx[i]) + alpha[i] * (r - cy[i])
            out[i, r] = np.interp(at, cols, image[r], left=0.0, right=0.0)
    return out


def test_deskew_matches_the_shear_written_out_by_hand(mnist):
    images = mnist.images[60000:60200].reshape(-1, 28, 28).astype(np.float64) / 256
    out = deskew(torch.from_numpy(images[:, None]).float())[:, 0].double().numpy()
    assert np.abs(out - _sheared_by_rows(images)).max() < 1e-4
    cy0, cx0, skew0, std0 = _moments(images)
    cy1, cx1, skew1, _ = _moments(out)
    assert np.abs(skew0).mean() > 0.1  # MNIST's digits lean
    assert np.abs(skew1).max() < 0.02  # and no longer do
    assert np.abs(cy1 - cy0).max() < 0.05 and np.abs(cx1 - cx0).max() < 0.1  # the centre stays where it was

    narrow = deskew(torch.from_numpy(images[:, None]).float(), width=4.0)[:, 0].double().numpy()
    assert np.abs(narrow - _sheared_by_rows(images, width=4.0)).max() < 1e-4
    _, cx2, skew2, std2 = _moments(narrow)
    free = (std0 > 4 / 2.5 + 0.2) & (std0 < 4 * 2.5 - 0.2)  # not at the stretch's cap
    assert free.sum() > 150 and (~free).sum() > 5  # thin ones (1s) among them
    assert np.abs(std2[free] - 4.0).max() < 0.15  # bilinear sampling blurs the ink a little
    assert np.abs(skew2).max() < 0.05 and np.abs(cx2 - cx0).max() < 0.1  # the stretch scales what is left


def test_deskew_straightens_a_leaning_bar_and_keeps_blank_and_upright_images():
    images = np.zeros((4, 28, 28), np.float32)
    for r in range(6, 22):
        images[0, r, 20 - (r - 6) // 2] = 1.0  # a bar leaning right, 1 column per 2 rows
        images[1, r, 13:15] = 1.0  # upright
    images[3, 10:12, 2:26] = 1.0  # a flat band: its shear is capped, not a division blow-up
    out = deskew(torch.from_numpy(images[:, None]))[:, 0].numpy()
    assert np.isfinite(out).all()
    assert np.ptp(np.nonzero(out[0] > 0.25)[1]) <= 2  # the bar now stands in 1-2 columns (was 8)
    assert np.abs(out[1] - images[1]).max() < 1e-5  # float32 rounding of the grid
    assert (out[2] == 0).all()  # blank stays blank
    assert abs(out[3].sum() - images[3].sum()) / images[3].sum() < 0.2


def test_deskewcnn_sees_deskewed_images():
    torch.manual_seed(0)
    model = create_model("deskewcnn").eval()
    plain = create_model("widecnn").eval()
    plain.load_state_dict(model.state_dict())
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(deskew(x)), atol=1e-6)
        assert not torch.allclose(model(x), plain(x), atol=1e-3)
