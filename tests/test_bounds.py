"""IBP and CROWN: sound on random networks (dense sampling, PGD), exact where theory says, clear errors.

The comparison with the exact MILP minimum lives in test_milp.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from robustdl.attacks import pgd
from robustdl.models import MLP, ConvSmall, Normalize, SmallCNN
from robustdl.train.certified import ibp_loss, worst_case_logits
from robustdl.train.objectives import make_objective
from robustdl.verify import (
    certified,
    certified_accuracy,
    crown_bounds,
    crown_margin,
    ibp_margin,
    interval_bounds,
    layers,
    margin_spec,
    preactivation_bounds,
)

BOUNDS = {"ibp": interval_bounds, "crown": crown_bounds}


def random_mlp(seed: int, inputs: int = 4, hidden: tuple[int, ...] = (10, 10), classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(inputs, hidden, classes, mean=(0.4,), std=(0.3,)).double()


def random_convnet(seed: int, channels: int = 1, width: int = 4, classes: int = 3) -> nn.Module:
    """A tiny convnet on 4x4 images: 3x3 conv, strided 2x2 conv, linear."""
    torch.manual_seed(seed)
    return nn.Sequential(
        Normalize([0.2, 0.6][:channels], [0.3, 0.5][:channels]),
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 2, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * width, classes),
    ).double()


def network_and_input(seed: int, kind: str, n: int = 3) -> tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return random_mlp(seed, hidden=(12, 8)), torch.rand(n, 4, generator=g, dtype=torch.float64)
    channels = 1 + seed % 2
    return random_convnet(seed, channels), torch.rand(n, channels, 4, 4, generator=g, dtype=torch.float64)


def samples(x: torch.Tensor, eps: float, count: int = 2000, seed: int = 0) -> torch.Tensor:
    """``count`` points of each example's box: corners (random sign patterns) and uniform points, (N, count, ...)."""
    g = torch.Generator().manual_seed(seed)
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    u = torch.rand(count, *x.shape, generator=g, dtype=x.dtype)
    u[: count // 2] = u[: count // 2].round()  # half of them corners
    return (lower + u * (upper - lower)).transpose(0, 1)


def outputs_at(model: nn.Module, points: torch.Tensor) -> torch.Tensor:
    """The model at every sampled point: (N, count, C)."""
    with torch.no_grad():
        return model(points.flatten(0, 1)).view(*points.shape[:2], -1)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["mlp", "conv"]), eps=st.sampled_from([0.02, 0.1, 0.3]))
def test_bounds_contain_every_sampled_output(seed, kind, eps):
    model, x = network_and_input(seed, kind)
    values = outputs_at(model, samples(x, eps, seed=seed))
    y = torch.arange(len(x)) % 3
    spec = margin_spec(y, 3).double()
    margins = torch.einsum("nkc,nsc->nsk", spec, values)
    for name, bound in BOUNDS.items():
        lower, upper = bound(model, x, eps)
        assert (lower.unsqueeze(1) <= values + 1e-10).all() and (values <= upper.unsqueeze(1) + 1e-10).all(), name
        lower, upper = bound(model, x, eps, spec=spec)
        assert (lower.unsqueeze(1) <= margins + 1e-10).all() and (margins <= upper.unsqueeze(1) + 1e-10).all(), name


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("name", ["ibp", "crown"])
def test_zero_radius_gives_the_output(kind, name):
    model, x = network_and_input(3, kind)
    lower, upper = BOUNDS[name](model, x, 0.0)
    expected = model(x)
    assert torch.allclose(lower, expected, atol=1e-12) and torch.allclose(upper, expected, atol=1e-12)


def box_minimum(model: nn.Module, x: torch.Tensor, eps: float, c: torch.Tensor) -> torch.Tensor:
    """min of c . f over the box by enumerating its corners (exact for an affine f), (N,)."""
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    corners = torch.tensor(list(itertools.product([0.0, 1.0], repeat=x[0].numel())), dtype=x.dtype)
    points = lower.unsqueeze(1) + corners.view(1, -1, *x.shape[1:]) * (upper - lower).unsqueeze(1)
    return (outputs_at(model, points) @ c).amin(dim=1)


def test_crown_is_exact_and_ibp_is_not_on_a_linear_network():
    """Without ReLUs CROWN's backward pass is exact; IBP's |W2||W1| is exact for one layer only."""
    torch.manual_seed(0)
    one = nn.Sequential(Normalize([0.3], [0.2]), nn.Flatten(), nn.Linear(5, 3)).double()
    two = nn.Sequential(Normalize([0.3], [0.2]), nn.Flatten(), nn.Linear(5, 6), nn.Linear(6, 3)).double()
    x = torch.rand(4, 5, dtype=torch.float64) * 0.2  # near 0: the box clips the ball
    for j in range(3):
        c = torch.eye(3, dtype=torch.float64)[j]
        for model in (one, two):
            lower, upper = crown_bounds(model, x, 0.15)
            assert torch.allclose(lower[:, j], box_minimum(model, x, 0.15, c), atol=1e-12)
            assert torch.allclose(upper[:, j], -box_minimum(model, x, 0.15, -c), atol=1e-12)
        assert torch.allclose(interval_bounds(one, x, 0.15)[0][:, j], box_minimum(one, x, 0.15, c), atol=1e-12)
    assert (interval_bounds(two, x, 0.15)[0] < crown_bounds(two, x, 0.15)[0] - 1e-3).any()


def test_crown_is_exact_through_a_linear_convolution():
    torch.manual_seed(1)
    model = nn.Sequential(Normalize([0.5, 0.4], [0.2, 0.3]), nn.Conv2d(2, 3, 3, padding=1),
                          nn.Conv2d(3, 2, 2), nn.Flatten(), nn.Linear(2, 2)).double()
    x = torch.rand(2, 2, 2, 2, dtype=torch.float64)  # 8 inputs, 256 corners
    lower, upper = crown_bounds(model, x, 0.1)
    for j in range(2):
        c = torch.eye(2, dtype=torch.float64)[j]
        assert torch.allclose(lower[:, j], box_minimum(model, x, 0.1, c), atol=1e-12)
        assert torch.allclose(upper[:, j], -box_minimum(model, x, 0.1, -c), atol=1e-12)


@pytest.mark.parametrize("name", ["ibp", "crown"])
def test_bounds_respect_the_box(name):
    """A network that is the identity on its input: the bounds are the ball clipped to [0, 1]."""
    identity = nn.Sequential(nn.Flatten())
    x = torch.tensor([[0.0, 0.05, 0.5, 0.97, 1.0]], dtype=torch.float64)
    lower, upper = BOUNDS[name](identity, x, 0.3)
    assert torch.allclose(lower, torch.tensor([[0.0, 0.0, 0.2, 0.67, 0.7]], dtype=torch.float64))
    assert torch.allclose(upper, torch.tensor([[0.3, 0.35, 0.8, 1.0, 1.0]], dtype=torch.float64))


def test_one_relu_by_hand():
    r"""f(x) = ReLU(2x - 1) on x in [0, 1]: z in [-1, 1], chord 0.5 (z + 1), lower slope 0 (u = -l)."""
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2)).double()
    with torch.no_grad():
        model[0].weight.fill_(2.0), model[0].bias.fill_(-1.0)
        model[2].weight.copy_(torch.tensor([[1.0], [-1.0]])), model[2].bias.zero_()
    x = torch.tensor([[0.5]], dtype=torch.float64)
    for bound in BOUNDS.values():
        lower, upper = bound(model, x, 0.5)
        assert torch.allclose(lower, torch.tensor([[0.0, -1.0]], dtype=torch.float64))
        assert torch.allclose(upper, torch.tensor([[1.0, 0.0]], dtype=torch.float64))


def test_crown_can_be_looser_than_ibp():
    r"""-ReLU(3x - 1) on x in [0, 1]: z in [-1, 2], so CROWN's lower line is z itself (u > -l) and
    bounds -ReLU(z) <= -z <= 1, while IBP's -ReLU(l) = 0 is the true maximum."""
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1)).double()
    with torch.no_grad():
        model[0].weight.fill_(3.0), model[0].bias.fill_(-1.0)
        model[2].weight.fill_(-1.0), model[2].bias.zero_()
    x = torch.tensor([[0.5]], dtype=torch.float64)
    assert interval_bounds(model, x, 0.5)[1].item() == pytest.approx(0.0)
    assert crown_bounds(model, x, 0.5)[1].item() == pytest.approx(1.0)


def test_crown_is_tighter_than_ibp_on_most_random_networks():
    """Not a theorem (see above), but on random networks CROWN's margins beat IBP's almost always."""
    wins, total = 0, 0
    for seed in range(6):
        for kind in ("mlp", "conv"):
            model, x = network_and_input(seed, kind, n=4)
            y = torch.arange(4) % 3
            ibp, crown = ibp_margin(model, x, y, 0.05), crown_margin(model, x, y, 0.05)
            wins, total = wins + int((crown >= ibp - 1e-12).sum()), total + ibp.numel()
    assert wins >= 0.95 * total


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_crown_preactivation_bounds_lie_within_ibp_ones(kind):
    model, x = network_and_input(5, kind)
    ibp, crown = preactivation_bounds(model, x, 0.1, "ibp"), preactivation_bounds(model, x, 0.1, "crown")
    assert len(ibp) == len(crown) == 2
    assert torch.equal(ibp[0][0], crown[0][0])  # one mixing layer below: interval arithmetic is exact
    assert (crown[1][0] >= ibp[1][0]).all() and (crown[1][1] <= ibp[1][1]).all()
    assert (crown[1][1] - crown[1][0]).sum() < (ibp[1][1] - ibp[1][0]).sum()
    for bound in (*ibp, *crown):
        assert (bound[0] <= bound[1]).all()
    assert torch.allclose(crown_bounds(model, x, 0.0, intermediate="ibp")[0], model(x), atol=1e-12)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["mlp", "conv"]))
def test_pgd_never_breaks_what_crown_certifies(seed, kind):
    model, x = network_and_input(seed, kind, n=16)
    with torch.no_grad():
        y = model(x).argmax(1)
    for eps in (0.01, 0.05):
        safe = certified(model, x, y, eps)
        x_adv = pgd(model, x, y, eps, steps=50, restarts=2, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            assert (model(x_adv).argmax(1)[safe] == y[safe]).all()
        assert certified_accuracy(model, x, y, eps, batch_size=5) == pytest.approx(safe.double().mean().item())


def test_margin_spec_rows():
    spec = margin_spec(torch.tensor([0, 2]), 3)
    expected = torch.tensor([[[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]], [[-1.0, 0.0, 1.0], [0.0, -1.0, 1.0]]])
    assert torch.equal(spec, expected)
    with pytest.raises(ValueError, match="class indices"):
        margin_spec(torch.tensor([3]), 3)


@pytest.mark.parametrize("layer", [nn.MaxPool2d(2), nn.BatchNorm2d(1), nn.Sigmoid()])
def test_unsupported_layers_raise_a_type_error_naming_them(layer):
    model = nn.Sequential(nn.Conv2d(1, 1, 3), layer, nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=f"layer 1 is {type(layer).__name__}"):
        interval_bounds(model, torch.rand(1, 1, 4, 4), 0.1)


def test_other_models_raise_type_errors():
    with pytest.raises(TypeError, match="MaxPool2d"):
        crown_bounds(SmallCNN(image_size=8), torch.rand(1, 1, 8, 8), 0.1)
    with pytest.raises(TypeError, match=r"nn\.Sequential"):
        layers(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="zero padding"):
        layers(nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")))
    assert len(layers(ConvSmall(image_size=8))) == 9


def test_bad_arguments_raise_clear_errors():
    model, x = network_and_input(0, "mlp")
    with pytest.raises(ValueError, match="eps"):
        interval_bounds(model, x, -0.1)
    with pytest.raises(ValueError, match="spec must be a tensor of shape"):
        crown_bounds(model, x, 0.1, spec=torch.ones(3, 2, 4))
    with pytest.raises(ValueError, match="intermediate"):
        crown_bounds(model, x, 0.1, intermediate="lp")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        interval_bounds(model, x + 2, 0.1)


def test_worst_case_logits_bound_the_loss_everywhere_in_the_ball():
    r"""CE(\hat z, y) >= CE(f(x'), y) at PGD's points and at random ones; at eps 0, \hat z = z - z_y."""
    model, x = network_and_input(7, "conv", n=8)
    y = torch.arange(8) % 3
    logits = model(x)
    assert torch.allclose(worst_case_logits(model, x, y, 0.0), logits - logits.gather(1, y[:, None]), atol=1e-12)
    bound = F.cross_entropy(worst_case_logits(model, x, y, 0.1), y, reduction="none")
    for x_adv in (pgd(model, x, y, 0.1, steps=30, early_stop=False), samples(x, 0.1, 50)[:, 7]):
        assert (F.cross_entropy(model(x_adv), y, reduction="none") <= bound + 1e-10).all()


def test_ibp_loss_mixes_clean_and_worst_case_cross_entropy():
    model, x = network_and_input(2, "mlp", n=8)
    y = torch.arange(8) % 3
    clean = F.cross_entropy(model(x), y)
    worst = F.cross_entropy(worst_case_logits(model, x, y, 0.2), y)
    assert torch.allclose(ibp_loss(model, x, y, eps=0.0), clean)  # eps 0: the worst case is the clean loss
    assert torch.allclose(ibp_loss(model, x, y, eps=0.2, kappa=0.5), (clean + worst) / 2)
    assert torch.allclose(ibp_loss(model, x, y, eps=0.2, kappa=1.0), clean)
    # Gowal et al.'s schedule: half-way up the ramp, kappa is half-way from 1 to its final 0.5.
    assert torch.allclose(ibp_loss(model, x, y, eps=0.2, kappa=0.5, full_eps=0.4), 0.75 * clean + 0.25 * worst)
    with pytest.raises(ValueError, match="kappa"):
        ibp_loss(model, x, y, eps=0.2, kappa=1.5)


def test_ibp_objective_by_name_trains_with_a_ramp():
    model, x = network_and_input(4, "mlp", n=32)
    y = torch.arange(32) % 3
    objective = make_objective("ibp", eps=0.1, kappa=0.5, full_eps=0.1, warmup=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = ibp_loss(model, x, y, eps=0.1).item()
    for _ in range(30):
        loss = objective(model, x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert objective.current_eps() == 0.1 and ibp_loss(model, x, y, eps=0.1).item() < before
