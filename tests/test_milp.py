"""The exact MILP margin: it sits between the sound bounds (IBP, CROWN) and every attack, and is attained."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_bounds import network_and_input, outputs_at, random_mlp, samples
from torch import nn

from robustdl.attacks import pgd
from robustdl.verify import crown_margin, exact_margin, exact_min_margin, ibp_margin, margin_spec


def margins_at(model: nn.Module, points: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """f_y - f_j, j != y, at each point: (count, C-1) for one example's points (count, ...)."""
    values = outputs_at(model, points.unsqueeze(0))[0]
    return values @ margin_spec(y, values.shape[1])[0].double().T


def pgd_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, classes: int) -> torch.Tensor:
    """For each j != y, the margin f_y - f_j where a PGD run minimising it ends, (C-1,)."""
    found = []
    for j in (j for j in range(classes) if j != int(y)):
        def loss(logits: torch.Tensor, labels: torch.Tensor, j: int = j) -> torch.Tensor:
            return logits[:, j] - logits.gather(1, labels[:, None])[:, 0]

        x_adv = pgd(model, x, y, eps, steps=60, loss=loss, early_stop=False, restarts=1,
                    generator=torch.Generator().manual_seed(j))
        found.append(margins_at(model, x_adv, y)[0, len(found)])
    return torch.stack(found)


@settings(max_examples=8, deadline=None, derandomize=True)  # derandomized: MILP times vary a lot by network
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["mlp", "conv"]), eps=st.sampled_from([0.03, 0.1]))
def test_bounds_exact_minimum_and_attacks_are_ordered(seed, kind, eps):
    """IBP, CROWN <= exact minimum <= what PGD and dense sampling find; the minimiser attains it."""
    model, x = network_and_input(seed, kind, n=1)
    y = torch.tensor([seed % 3])
    result = exact_margin(model, x, y, eps)
    exact = result.margins
    assert result.status == "optimal" and result.classes.tolist() == [j for j in range(3) if j != int(y)]
    assert (ibp_margin(model, x, y, eps)[0] <= exact + 1e-7).all()
    assert (crown_margin(model, x, y, eps)[0] <= exact + 1e-7).all()
    # The minimisers lie in the ball and the box, and attain the minimum there.
    assert (result.inputs - x).abs().max() <= eps + 1e-9 and result.inputs.min() >= 0 and result.inputs.max() <= 1
    attained = torch.stack([margins_at(model, result.inputs[k:k + 1], y)[0, k] for k in range(2)])
    assert torch.allclose(attained, exact, atol=1e-6)
    assert (exact <= margins_at(model, samples(x, eps, count=3000, seed=seed)[0], y).amin(dim=0) + 1e-9).all()
    assert (exact <= pgd_margins(model, x, y, eps, 3) + 1e-9).all()


def test_crown_is_exact_when_every_relu_is_stable():
    """At a radius so small that no ReLU changes state, the network is affine on the ball: CROWN = MILP."""
    model, x = network_and_input(11, "mlp", n=1)
    y = torch.tensor([0])
    exact = exact_margin(model, x, y, 1e-4).margins
    assert torch.allclose(crown_margin(model, x, y, 1e-4)[0], exact, atol=1e-9)


def test_the_gap_grows_with_the_radius():
    """Relaxations lose tightness as more ReLUs become unstable; at eps 0 all three agree."""
    model, x = network_and_input(4, "mlp", n=1)
    y = torch.tensor([1])
    gaps = []
    for eps in (0.0, 0.05, 0.2):
        exact = exact_min_margin(model, x, y, eps)
        ibp, crown = ibp_margin(model, x, y, eps).min().item(), crown_margin(model, x, y, eps).min().item()
        gaps.append((exact - ibp, exact - crown))
    assert gaps[0] == pytest.approx((0.0, 0.0), abs=1e-7)
    assert 0 <= gaps[1][1] <= gaps[1][0] and gaps[1][0] < gaps[2][0]


def test_one_hidden_neuron_by_hand():
    r"""f_0 - f_1 = ReLU(2x - 1) - 0.25 on x in [0.3, 0.7]: the minimum -0.25 is attained on [0.3, 0.5]."""
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2)).double()
    with torch.no_grad():
        model[0].weight.fill_(2.0), model[0].bias.fill_(-1.0)
        model[2].weight.copy_(torch.tensor([[1.0], [0.0]])), model[2].bias.copy_(torch.tensor([0.0, 0.25]))
    result = exact_margin(model, torch.tensor([[0.5]], dtype=torch.float64), torch.tensor([0]), 0.2)
    assert result.margins.item() == pytest.approx(-0.25) and 0.3 - 1e-9 <= result.inputs.item() <= 0.5 + 1e-9


def test_the_model_is_left_unchanged():
    model = random_mlp(0).float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exact_margin(model, torch.rand(1, 4), torch.tensor([0]), 0.1)
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_errors():
    model, x = network_and_input(0, "mlp", n=2)
    with pytest.raises(ValueError, match="one example"):
        exact_margin(model, x, torch.tensor([0, 1]), 0.1)
    with pytest.raises(TypeError, match="MaxPool2d"):
        exact_margin(nn.Sequential(nn.MaxPool2d(2), nn.Flatten()), torch.rand(1, 1, 2, 2), torch.tensor([0]), 0.1)
    wide = random_mlp(1, inputs=6, hidden=(40, 40))
    with pytest.raises(RuntimeError, match="not solved to optimality"):
        exact_margin(wide, torch.rand(1, 6, dtype=torch.float64), torch.tensor([0]), 0.5, time_limit=1e-3)


def test_min_margin_prunes_by_crown_and_agrees_with_all_margins():
    for seed in range(3):
        model, x = network_and_input(seed, "mlp", n=1)
        y = torch.tensor([seed % 3])
        assert exact_min_margin(model, x, y, 0.1) == pytest.approx(exact_margin(model, x, y, 0.1).margins.min().item())
    assert exact_margin(model, x, y, 0.1, classes=[1, 2]).classes.tolist() == [j for j in (1, 2) if j != int(y)]
