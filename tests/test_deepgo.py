"""DeepGO (Ruan et al. 2018): converging bounds that enclose known minima, dense grids and exact MILP."""

from __future__ import annotations

import itertools
import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from robustdl.verify.deepgo import logit_of, minimise, oplus, probability_of, reachability, safety
from robustdl.verify.milp import exact_min_margin

# (function, box, exact per-coordinate Lipschitz constant, true minimum)
KNOWN = {
    "sin": (lambda v: math.sin(v[0]), [0.5], [5.0], 1.0, -1.0),
    "shifted quadratic": (lambda v: (v[0] - 0.4) ** 2 + 0.5, [-1.0], [1.0], 2.8, 0.5),
    "abs": (lambda v: abs(v[0]), [-1.0], [1.0], 1.0, 0.0),
    "2-D quadratic + abs": (lambda v: (v[0] - 0.3) ** 2 + abs(v[1] + 0.2), [-1.0, -1.0], [1.0, 1.0], [2.6, 1.0], 0.0),
}
TOL = 1e-2


def assert_monotone(history: tuple[tuple[float, float], ...]) -> None:
    lows, ups = np.array(history).T
    assert (np.diff(lows) >= -1e-12).all(), "l_i must be nondecreasing"
    assert (np.diff(ups) <= 1e-12).all(), "u_i must be nonincreasing"


@pytest.mark.parametrize("name", KNOWN)
def test_exact_lipschitz_encloses_the_minimum_and_closes(name):
    fn, lower, upper, k, true_min = KNOWN[name]
    bounds = minimise(fn, lower, upper, TOL, lipschitz=k)
    assert bounds.lower <= true_min + 1e-12 <= bounds.upper + 2e-12
    assert bounds.gap <= TOL
    assert fn(bounds.argmin) == pytest.approx(bounds.upper)
    assert_monotone(bounds.history)


@pytest.mark.parametrize("name", KNOWN)
def test_dynamic_lipschitz_encloses_the_minimum(name):
    fn, lower, upper, _, true_min = KNOWN[name]
    bounds = minimise(fn, lower, upper, TOL)
    assert bounds.lower <= true_min <= bounds.upper
    assert bounds.gap <= TOL
    _, ups = np.array(bounds.history).T
    assert (np.diff(ups) <= 0).all()


def test_a_flat_start_fools_the_dynamic_estimate_but_not_a_given_constant():
    """sin on [0, 2 pi] is 0 at the ends and the midpoint: no slope seen, K ~ 0, a wrong "minimum" 0."""
    fooled = minimise(lambda v: math.sin(v[0]), [0.0], [2 * math.pi], TOL)
    assert fooled.lower > -1 + TOL
    guaranteed = minimise(lambda v: math.sin(v[0]), [0.0], [2 * math.pi], TOL, lipschitz=1.0)
    assert guaranteed.lower <= -1 <= guaranteed.upper


@settings(max_examples=30, deadline=None)
@given(st.floats(-1, 1), st.floats(-2, 2), st.floats(0.1, 5), st.floats(1e-3, 0.1))
def test_cone_minimum_is_enclosed(centre, offset, slope, tol):
    """w(x) = offset + slope |x - c|: minimum ``offset`` at ``c``, exact constant ``slope``."""
    bounds = minimise(lambda v: offset + slope * abs(v[0] - centre), [-1], [1], tol, lipschitz=slope)
    assert bounds.lower - 1e-9 <= offset <= bounds.upper
    assert bounds.gap <= tol
    assert_monotone(bounds.history)


def relu_net(inputs: int, seed: int, hidden: int = 32, layers: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    widths = [inputs, *[hidden] * layers]
    modules: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        modules += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*modules, nn.Linear(widths[-1], 3)).double().eval()


def spectral_lipschitz(model: nn.Module, row: int) -> float:
    """An L2 Lipschitz constant of logit ``row``: the product of the layers' spectral norms."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    k = torch.linalg.vector_norm(linears[-1].weight[row]).item()
    for m in linears[:-1]:
        k *= torch.linalg.matrix_norm(m.weight, ord=2).item()
    return k


def grid(x: torch.Tensor, radius: float, points: int) -> torch.Tensor:
    axes = [torch.linspace(float(max(c - radius, 0)), float(min(c + radius, 1)), points, dtype=x.dtype) for c in x[0]]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, x.shape[1])


@pytest.mark.parametrize(("inputs", "seed"), [(1, 0), (1, 1), (2, 2), (2, 3)])
@pytest.mark.parametrize("given_k", [True, False])
def test_network_reachability_agrees_with_a_dense_grid(inputs, seed, given_k):
    model, radius = relu_net(inputs, seed), 0.3
    x = torch.full((1, inputs), 0.5, dtype=torch.float64)
    k = spectral_lipschitz(model, 0)
    tol = 1e-2 if given_k and inputs == 2 else 1e-3  # the product of norms is loose: a given K costs more samples
    lo, hi = reachability(model, x, list(range(inputs)), radius, logit_of(0), tol, lipschitz=k if given_k else None)
    points = 2001 if inputs == 1 else 201
    with torch.no_grad():
        values = model(grid(x, radius, points))[:, 0]
    spacing = 2 * radius / (points - 1)
    slack = k * spacing * math.sqrt(inputs) / 2 + tol  # a grid min overestimates the true min by <= K h sqrt(n)/2
    assert lo <= values.min().item() and hi >= values.max().item()
    assert lo >= values.min().item() - slack and hi <= values.max().item() + slack


def test_probability_output_is_enclosed():
    model, x = relu_net(2, 4), torch.full((1, 2), 0.5, dtype=torch.float64)
    lo, hi = reachability(model, x, [0, 1], 0.2, probability_of(1), 1e-3)
    with torch.no_grad():
        p = model(grid(x, 0.2, 201)).softmax(dim=1)[:, 1]
    assert lo <= p.min().item() <= lo + 5e-3 and hi - 5e-3 <= p.max().item() <= hi


def test_oplus_is_the_largest_other_logit_minus_the_label_logit():
    logits = torch.tensor([[1.0, 3.0, 2.5], [0.0, -1.0, 4.0]])
    assert oplus(1)(logits).tolist() == [-0.5, 4.0 - (-1.0)]


def test_safety_answers_safe_with_a_small_box_and_unsafe_with_a_witness():
    model = relu_net(2, 6)
    x = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    with torch.no_grad():
        values = model(grid(x, 0.5, 201))
    label = int(model(x).argmax())
    assert (values.argmax(dim=1) != label).any(), "the whole square must hold another class"
    small, large = safety(model, x, [0, 1], 1e-3, 1e-3), safety(model, x, [0, 1], 0.5, 1e-3)
    assert small.status == "safe" and small.upper < 0 and small.label == label
    assert large.status == "unsafe" and large.lower >= 0
    assert int(model(large.witness).argmax()) != label or oplus(label)(model(large.witness)).item() >= 0
    assert (large.witness - x).abs().max() <= 0.5 + 1e-12


def test_safety_agrees_with_the_exact_milp_margin():
    model, x = relu_net(2, 6), torch.tensor([[0.3, 0.7]], dtype=torch.float64)
    y = model(x).argmax(dim=1)
    statuses = []
    for eps in (0.05, 0.2, 0.5):
        exact = exact_min_margin(model, x, y, eps)  # min over the ball of f_y - max_j f_j
        found = safety(model, x, [0, 1], eps, 1e-4)
        assert found.lower - 1e-9 <= -exact <= found.upper + 1e-9
        assert found.upper - found.lower <= 1e-4
        statuses.append(found.status)
        assert found.status == ("safe" if exact > 1e-4 else "unsafe" if exact < -1e-4 else found.status)
    assert statuses == ["safe", "safe", "unsafe"]


def test_pixels_of_an_image_are_free_and_the_others_fixed():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.ReLU(), nn.Linear(5, 3)).double().eval()
    x = torch.rand(1, 1, 4, 4, dtype=torch.float64)
    dims = [5, 10]
    lo, hi = reachability(model, x, dims, 0.1, logit_of(2), 1e-4, lipschitz=spectral_lipschitz(model[1:], 2))
    z = x.flatten().repeat(201 * 201, 1)
    z[:, dims] = grid(x.flatten()[dims][None], 0.1, 201)
    with torch.no_grad():
        values = model(z.view(-1, 1, 4, 4))[:, 2]
    assert lo <= values.min().item() <= lo + 1e-3 and hi - 1e-3 <= values.max().item() <= hi


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tol": 0.0}, "tol"),
        ({"tol": -1.0}, "tol"),
        ({"lower": [1.0], "upper": [0.0]}, "lower <= upper"),
        ({"lower": [0.0, 0.0], "upper": [1.0]}, "one length"),
        ({"lipschitz": 0.0}, "lipschitz"),
        ({"lipschitz": [1.0, 2.0]}, "lipschitz"),
        ({"max_evals": 2}, "max_evals"),
        ({"fn": lambda v: float("nan")}, "finite"),
    ],
)
def test_minimise_rejects_bad_inputs(kwargs, match):
    args = {"fn": lambda v: v[0], "lower": [0.0], "upper": [1.0], "tol": 0.1} | kwargs
    with pytest.raises(ValueError, match=match):
        minimise(**args)


def test_network_functions_reject_bad_inputs():
    model, x = relu_net(2, 0), torch.full((1, 2), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="dims"):
        reachability(model, x, [2], 0.1, logit_of(0), 0.1)
    with pytest.raises(ValueError, match="dims"):
        safety(model, x, [], 0.1, 0.1)
    with pytest.raises(ValueError, match="one example"):
        safety(model, x.repeat(2, 1), [0], 0.1, 0.1)
    with pytest.raises(ValueError, match="radius"):
        safety(model, x, [0], -0.1, 0.1)
    with pytest.raises(TypeError, match="model"):
        safety(lambda z: z, x, [0], 0.1, 0.1)
