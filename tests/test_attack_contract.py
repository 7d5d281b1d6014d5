"""The attack contract (DESIGN.md, Conventions), once, for every public attack of robustdl.attacks.

Every attack returns a new detached tensor, never mutates its inputs, leaves no gradients on the
model's parameters, restores the model's train/eval mode, and stays in [0, 1] and in its threat
model. Attacks bounded by an Lp ball are checked against it. Those that are not check only what
applies, as each case says:

* C&W (L2, Linf, L0), L-BFGS and DeepFool look for a minimal distortion: no radius to check;
* stAdv is a flow field: ``stadv`` is checked in the box, ``stadv_flow`` returns the flow itself
  (finite, of shape (N, 2, H, W)), neither in a ball;
* UAP returns one perturbation for all images (checked in its ball), GUAP a flow and a
  perturbation whose ``apply`` is checked in the box.

Attack-specific properties (exact values, reproducibility, agreement with peers) stay in each
attack's own test file. :func:`test_every_public_attack_has_a_case` fails when a name of
``robustdl.attacks.__all__`` is neither a case here nor listed in :data:`NOT_ATTACKS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import robustdl.attacks as attacks
from robustdl.attacks import (
    GeneralizedPerturbation,
    apgd,
    cw_l0,
    cw_l2,
    cw_linf,
    deepfool,
    fgsm,
    guap,
    lbfgs,
    pgd,
    square,
    stadv,
    stadv_flow,
    uap,
    zoo_adam,
)
from robustdl.threat import LpBall

#: Names of robustdl.attacks that are not attacks, and what they are.
NOT_ATTACKS = {
    "GeneralizedPerturbation": "the result of guap",
    "QueryBudgetError": "an exception",
    "QueryOracle": "the black-box attacks' query counter",
    "dlr_loss": "a loss",
    "flow_loss": "a loss",
    "flow_warp": "warps images by a flow",
    "fooling_rate": "a measure",
}


@dataclass(frozen=True)
class Case:
    """``run(model, x, y, generator)``; ``ball``: the threat model the result must respect, if any;
    ``output``: "images" (like x), "flow" (N, 2, H, W), "universal" (1, C, H, W) or "guap"."""

    run: Callable[[nn.Module, Tensor, Tensor, torch.Generator], object]
    ball: LpBall | None = None
    output: str = "images"


CASES: dict[str, Case] = {
    "fgsm": Case(lambda m, x, y, g: fgsm(m, x, y, 0.1), LpBall("linf", 0.1)),
    "fgsm[l2-targeted]": Case(lambda m, x, y, g: fgsm(m, x, y, 0.5, norm="l2", target=(y + 1) % 3), LpBall("l2", 0.5)),
    **{f"pgd[{norm}]": Case(lambda m, x, y, g, norm=norm, eps=eps: pgd(m, x, y, eps, norm=norm, steps=3, restarts=2,
                                                                       generator=g), LpBall(norm, eps))
       for norm, eps in (("linf", 0.1), ("l2", 0.5), ("l1", 2.0))},
    "apgd[dlr]": Case(lambda m, x, y, g: apgd(m, x, y, 0.1, steps=5, restarts=2, loss="dlr", generator=g),
                      LpBall("linf", 0.1)),
    "apgd[l2]": Case(lambda m, x, y, g: apgd(m, x, y, 0.5, norm="l2", steps=5, generator=g), LpBall("l2", 0.5)),
    "square": Case(lambda m, x, y, g: square(m, x, y, 0.1, queries=30, generator=g), LpBall("linf", 0.1)),
    "square[l2]": Case(lambda m, x, y, g: square(m, x, y, 0.5, norm="l2", queries=30, generator=g), LpBall("l2", 0.5)),
    "zoo_adam": Case(lambda m, x, y, g: zoo_adam(m, x, y, steps=5, batch_coordinates=16, lr=0.05, generator=g)),
    # Minimal-distortion attacks: no ball.
    "lbfgs": Case(lambda m, x, y, g: lbfgs(m, x, y, search_steps=2, max_iter=10)),
    "cw_l2": Case(lambda m, x, y, g: cw_l2(m, x, y, steps=10, lr=0.1, binary_search_steps=2, c_init=1.0)),
    "cw_linf": Case(lambda m, x, y, g: cw_linf(m, x, y, steps=10, lr=0.05, c_init=1.0, tau_min=0.05)),
    "cw_l0": Case(lambda m, x, y, g: cw_l0(m, x, y, steps=10, lr=0.1, c_init=1.0, pixels_per_round=8)),
    "deepfool": Case(lambda m, x, y, g: deepfool(m, x, y, num_classes=3, steps=5)),
    # Spatial: a warp (in the box) and its flow (no box, no ball).
    "stadv": Case(lambda m, x, y, g: stadv(m, x, y, steps=5)),
    "stadv_flow": Case(lambda m, x, y, g: stadv_flow(m, x, y, steps=5), output="flow"),
    # Universal: one perturbation for all images.
    "uap": Case(lambda m, x, y, g: uap(m, x, 0.5, max_passes=2, deepfool_steps=3, generator=g), LpBall("linf", 0.5),
                output="universal"),
    "uap[l2]": Case(lambda m, x, y, g: uap(m, x, 0.5, norm="l2", max_passes=2, deepfool_steps=3, generator=g),
                    LpBall("l2", 0.5), output="universal"),
    "guap": Case(lambda m, x, y, g: guap(m, x, 0.1, tau=5.0, epochs=2, batch_size=3, generator=g), output="guap"),
}


def tiny_cnn() -> nn.Module:
    """A random 3-class CNN on 1x6x6 images, with a non-trivial gradient everywhere."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def test_every_public_attack_has_a_case() -> None:
    cased = {name.split("[")[0] for name in CASES}
    assert cased.isdisjoint(NOT_ATTACKS)
    missing = set(attacks.__all__) - cased - set(NOT_ATTACKS)
    assert not missing, f"public attacks without a contract case (add one to CASES): {sorted(missing)}"


def _no_grad_history(t: Tensor) -> None:
    assert not t.requires_grad and t.grad_fn is None


@pytest.mark.parametrize("name", CASES)
def test_attack_contract(name: str, seeded) -> None:
    case = CASES[name]
    model = tiny_cnn().train()
    x = torch.rand(6, 1, 6, 6, generator=seeded(1))
    y = torch.arange(6) % 3
    x_copy, y_copy = x.clone(), y.clone()
    out = case.run(model, x, y, seeded())
    # Inputs untouched, no gradients left on the model, its mode restored.
    assert torch.equal(x, x_copy) and torch.equal(y, y_copy)
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    if case.output == "images":
        assert out is not x and out.shape == x.shape and out.dtype == x.dtype
        _no_grad_history(out)
        assert out.min() >= 0 and out.max() <= 1
        if case.ball is not None:
            assert case.ball.contains(out, x).all()
    elif case.output == "flow":
        _no_grad_history(out)
        assert out.shape == (6, 2, 6, 6) and torch.isfinite(out).all()
    elif case.output == "universal":
        _no_grad_history(out)
        assert out.shape == (1, 1, 6, 6) and case.ball.norm(out).item() <= case.ball.eps * (1 + 1e-5)
    else:
        assert isinstance(out, GeneralizedPerturbation)
        _no_grad_history(out.flow)
        _no_grad_history(out.delta)
        x_adv = out.apply(x)
        assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1


#: Attacks in an Lp ball take their threat model as a value too: ``attack(model, x, y, LpBall(...))``.
BALL_TAKERS: dict[str, Callable[..., Tensor]] = {
    "fgsm": lambda m, x, y, g, eps, **kw: fgsm(m, x, y, eps, **kw),
    "pgd": lambda m, x, y, g, eps, **kw: pgd(m, x, y, eps, steps=3, generator=g, **kw),
    "apgd": lambda m, x, y, g, eps, **kw: apgd(m, x, y, eps, steps=5, generator=g, **kw),
    "square": lambda m, x, y, g, eps, **kw: square(m, x, y, eps, queries=30, generator=g, **kw),
    "uap": lambda m, x, y, g, eps, **kw: uap(m, x, eps, max_passes=2, deepfool_steps=3, generator=g, **kw),
}


@pytest.mark.parametrize("ball", [LpBall("linf", 0.1), LpBall("l2", 0.5)], ids=lambda b: b.name)
@pytest.mark.parametrize("name", BALL_TAKERS)
def test_an_lpball_is_the_same_threat_model_as_its_floats(name: str, ball: LpBall, seeded) -> None:
    attack, model = BALL_TAKERS[name], tiny_cnn()
    x, y = torch.rand(6, 1, 6, 6, generator=seeded(1)), torch.arange(6) % 3
    by_value = attack(model, x, y, seeded(), ball)
    by_floats = attack(model, x, y, seeded(), ball.eps, norm=ball.name)
    assert torch.equal(by_value, by_floats)


def test_a_ball_and_a_different_norm_beside_it_is_an_error() -> None:
    x, y = torch.rand(2, 1, 6, 6), torch.arange(2)
    with pytest.raises(ValueError, match="contradicts the ball"):
        pgd(tiny_cnn(), x, y, LpBall("l2", 0.5), norm="l1")
    with pytest.raises(TypeError, match="eps must be a radius"):
        fgsm(tiny_cnn(), x, y, "0.1")
