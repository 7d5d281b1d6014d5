"""IBP and CROWN over L2 and L1 balls (and Linf as an LpBall): sound against sampling and PGD-L2, clear errors.

The bounds concretise through the ball's dual norm (:meth:`robustdl.threat.LpBall.concretise`);
the Linf results are pinned by test_bounds.py, which passes bare radii.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_bounds import network_and_input, outputs_at
from torch import nn

from robustdl import zoo
from robustdl.attacks import pgd
from robustdl.models import Normalize
from robustdl.threat import LpBall
from robustdl.verify import (
    certified,
    certified_accuracy,
    crown_bounds,
    crown_margin,
    ibp_margin,
    interval_bounds,
    margin_spec,
    preactivation_bounds,
)

BOUNDS = {"ibp": interval_bounds, "crown": crown_bounds}


def ball_samples(ball: LpBall, x: torch.Tensor, count: int = 1000, seed: int = 0) -> torch.Tensor:
    """``count`` points of each example's set (N, count, ...): half uniform inside, half on the sphere, clipped."""
    g = torch.Generator().manual_seed(seed)
    inside = [ball.random(x, generator=g) for _ in range(count // 2)]
    sphere = [(x + ball.step(torch.randn(x.shape, generator=g, dtype=x.dtype), ball.eps)).clamp(0, 1)
              for _ in range(count - count // 2)]
    return torch.stack(inside + sphere, dim=1)


def margins_at(model: nn.Module, points: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The margins f_y - f_j, j != y, at every point: (N, count, C-1)."""
    values = outputs_at(model, points)
    return torch.einsum("nkc,nsc->nsk", margin_spec(y, values.shape[-1]).to(values), values)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["mlp", "conv"]), norm=st.sampled_from(["l2", "l1"]),
       eps=st.sampled_from([0.05, 0.3, 1.0]))
def test_lp_bounds_contain_every_sampled_output(seed, kind, norm, eps):
    model, x = network_and_input(seed, kind)
    ball = LpBall(norm, eps)
    points = ball_samples(ball, x, seed=seed)
    values, y = outputs_at(model, points), torch.arange(len(x)) % 3
    margins = margins_at(model, points, y)
    for name, bound in BOUNDS.items():
        lower, upper = bound(model, x, ball)
        assert (lower.unsqueeze(1) <= values + 1e-10).all() and (values <= upper.unsqueeze(1) + 1e-10).all(), name
        lower, upper = bound(model, x, ball, spec=margin_spec(y, 3).double())
        assert (lower.unsqueeze(1) <= margins + 1e-10).all() and (margins <= upper.unsqueeze(1) + 1e-10).all(), name


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_pgd_l2_never_goes_below_the_l2_bounds(kind):
    model, x = network_and_input(11, kind, n=16)
    with torch.no_grad():
        y = model(x).argmax(1)
    for eps in (0.1, 0.5):
        ball = LpBall("l2", eps)
        x_adv = pgd(model, x, y, eps, norm="l2", steps=50, early_stop=False, generator=torch.Generator().manual_seed(0))
        assert ball.contains(x_adv, x, atol=1e-9).all()
        reached = margins_at(model, x_adv.unsqueeze(1), y)[:, 0]
        for bound in (ibp_margin, crown_margin):
            assert (bound(model, x, y, ball) <= reached + 1e-10).all()


def test_a_bare_radius_is_the_linf_ball():
    model, x = network_and_input(2, "conv")
    y = torch.arange(len(x)) % 3
    for bound in (ibp_margin, crown_margin):
        assert torch.equal(bound(model, x, y, 0.1), bound(model, x, y, LpBall("linf", 0.1)))
    for method in ("ibp", "crown"):
        for (lo, up), (lo2, up2) in zip(preactivation_bounds(model, x, 0.1, method),
                                        preactivation_bounds(model, x, LpBall("linf", 0.1), method), strict=True):
            assert torch.equal(lo, lo2) and torch.equal(up, up2)


def test_crown_is_exact_on_a_linear_network_inside_the_box():
    r"""Without ReLUs, over an L2 ball that stays in [0, 1]: c f(x) - eps ||c W||_2, attained."""
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.3], [0.2]), nn.Flatten(), nn.Linear(5, 6), nn.Linear(6, 3)).double()
    x = torch.full((2, 5), 0.5, dtype=torch.float64)
    ball = LpBall("l2", 0.2)
    W = (model[3].weight @ model[2].weight) / 0.2  # the whole linear map of x
    lower, upper = crown_bounds(model, x, ball)
    with torch.no_grad():
        centre = model(x)
    assert torch.allclose(lower, centre - 0.2 * W.norm(dim=1), atol=1e-12)
    assert torch.allclose(upper, centre + 0.2 * W.norm(dim=1), atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_ibp_first_layer_is_exact_and_crown_mostly_beats_ibp_for_l2(kind):
    """Pre-activations of the first linear/conv layer: the dual norm of its rows, so IBP = CROWN there."""
    wins, total = 0, 0
    for seed in range(4):
        model, x = network_and_input(seed, kind, n=4)
        y = torch.arange(4) % 3
        ball = LpBall("l2", 0.2)
        ibp, crown = preactivation_bounds(model, x, ball, "ibp"), preactivation_bounds(model, x, ball, "crown")
        assert torch.equal(ibp[0][0], crown[0][0]) and torch.equal(ibp[0][1], crown[0][1])
        assert (ibp[0][0] > preactivation_bounds(model, x, LpBall("linf", 0.2), "ibp")[0][0]).any()  # L2 ⊂ Linf
        ibp_m, crown_m = ibp_margin(model, x, y, ball), crown_margin(model, x, y, ball)
        wins, total = wins + int((crown_m >= ibp_m - 1e-12).sum()), total + ibp_m.numel()
    assert wins >= 0.9 * total


@pytest.mark.mnist
def test_bounds_on_a_bundled_model_hold_at_sampled_and_pgd_points(mnist):
    """Soundness only: on an IBP-trained network IBP is often tighter than CROWN (Zhang et al. 2020)."""
    model = zoo.load("mnist_ibp")
    x, y = mnist(4)
    for ball in (LpBall("l2", 1.0), LpBall("linf", 0.1)):
        with torch.no_grad():
            ibp, crown = ibp_margin(model, x, y, ball), crown_margin(model, x, y, ball)
            reached = margins_at(model, ball_samples(ball, x, count=200), y).amin(dim=1)
        x_adv = pgd(model, x, y, ball.eps, norm=ball.name, steps=20, early_stop=False,
                    generator=torch.Generator().manual_seed(0))
        reached = torch.minimum(reached, margins_at(model, x_adv.unsqueeze(1), y)[:, 0])
        assert (ibp <= reached + 1e-4).all() and (crown <= reached + 1e-4).all()
    assert certified(model, x, y, LpBall("l2", 0.1)).all()  # a Linf-0.4-trained model: small L2 balls certify


def test_bad_threat_models_raise_clear_errors():
    model, x = network_and_input(0, "mlp")
    y = torch.arange(len(x)) % 3
    with pytest.raises(TypeError, match=r"eps must be a radius .* or a robustdl\.threat\.LpBall, got str"):
        crown_bounds(model, x, "l2")
    with pytest.raises(TypeError, match="LpBall, got tuple"):
        certified_accuracy(model, x, y, ("l2", 0.1))
    with pytest.raises(ValueError, match="norm p must be one of"):
        interval_bounds(model, x, LpBall("l3", 0.1))
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        ibp_margin(model, x, y, -0.1)
