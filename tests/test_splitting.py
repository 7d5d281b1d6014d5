"""Multi-level splitting (Webb et al. 2019) against exact probabilities, naive Monte Carlo and certification."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import scipy.stats
import torch
from torch import nn

from robustdl.verify.bounds import crown_margin
from robustdl.verify.splitting import mh_step, multilevel_splitting, naive_monte_carlo

D = 10
#: The log-estimate's standard deviation is about sqrt(k (1 - rho) / (rho N)), 0.2-0.4 for the
#: k = 3-12 levels here with N = 1000: we allow about three of them.
LOG_TOLERANCE = 1.0


def sum_model(threshold: float) -> nn.Module:
    """Two classes on [0, 1]^D with f_1 - f_0 = sum(x) - threshold: class 1 wins when the sum passes it."""
    linear = nn.Linear(D, 2).double()
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[1] = 1.0
        linear.bias.copy_(torch.tensor([0.0, -threshold]))
    return nn.Sequential(linear).eval()


def irwin_hall_tail(n: int, t: Fraction) -> float:
    """P(U_1 + ... + U_n >= t) for i.i.d. uniform U_i on [0, 1], exactly (Irwin-Hall, by symmetry)."""
    a = n - t
    return float(sum((-1) ** k * math.comb(n, k) * (a - k) ** n for k in range(math.floor(a) + 1)) / math.factorial(n))


# x = 0.5 and eps = 0.5: x' is uniform on the whole cube [0, 1]^D, the violation is sum(x') >= t.
X, Y, EPS = torch.full((1, D), 0.5, dtype=torch.float64), torch.tensor([0]), 0.5


@pytest.mark.parametrize("threshold", [Fraction(9), Fraction(39, 4)])
def test_estimates_a_known_rare_probability(seeded, threshold):
    exact = math.log(irwin_hall_tail(D, threshold))  # 1/10! = 2.8e-7, and 0.25^10/10! = 2.6e-13
    found = multilevel_splitting(sum_model(float(threshold)), X, Y, EPS, generator=seeded())
    assert abs(found.log_prob - exact) <= LOG_TOLERANCE
    assert found.levels[-1] == 0 and all(a < b for a, b in itertools.pairwise(found.levels))


def test_agrees_with_naive_monte_carlo_where_it_sees_the_event(seeded):
    threshold = Fraction(7)  # P = 1.4e-2
    model, exact = sum_model(float(threshold)), math.log(irwin_hall_tail(D, threshold))
    mc = naive_monte_carlo(model, X, Y, EPS, samples=200_000, generator=seeded())
    amls = multilevel_splitting(model, X, Y, EPS, generator=seeded())
    assert abs(mc.log_prob - exact) <= 0.1  # ~2800 hits: relative error ~2%
    assert abs(amls.log_prob - mc.log_prob) <= 0.5


def test_finite_where_monte_carlo_sees_nothing_and_minus_infinity_where_certified(seeded):
    rare, robust = sum_model(9.75), sum_model(10.5)  # P = 2.6e-13; sum(x') <= 10 < 10.5: P = 0
    assert naive_monte_carlo(rare, X, Y, EPS, samples=100_000, generator=seeded()).log_prob == -math.inf
    estimate = multilevel_splitting(rare, X, Y, EPS, generator=seeded()).log_prob
    assert math.isfinite(estimate)
    assert (crown_margin(robust, X, Y, EPS) > 0).all(), "CROWN certifies the robust model"
    certified = multilevel_splitting(robust, X, Y, EPS, particles=300, log_min_prob=math.log(1e-15), generator=seeded())
    assert certified.log_prob == -math.inf < estimate
    assert all(level < 0 for level in certified.levels)


def test_metropolis_hastings_keeps_the_uniform_law_on_the_box(seeded):
    """With no level the target is uniform on the box: the window's Hastings correction keeps it there."""
    n, x = 20_000, torch.full((1, 1), 0.1, dtype=torch.float64)
    lo, hi = torch.zeros_like(x), torch.full_like(x, 0.6)
    model = nn.Linear(1, 2).double().eval()
    z = lo + (hi - lo) * torch.rand(n, 1, generator=seeded(), dtype=torch.float64)
    s, width, g = torch.zeros(n, dtype=torch.float64), torch.full((n,), 0.25, dtype=torch.float64), seeded(1)
    with torch.no_grad():
        for _ in range(20):
            z, s, _ = mh_step(model, z, s, Y.expand(n), -math.inf, width, lo, hi, g)
    assert scipy.stats.kstest(z.squeeze(1).numpy(), "uniform", args=(0.0, 0.6)).pvalue > 0.01


def test_rejects_bad_inputs():
    model = sum_model(9.0)
    with pytest.raises(ValueError, match="one example"):
        multilevel_splitting(model, X.repeat(2, 1), Y.repeat(2), EPS)
    with pytest.raises(ValueError, match="eps"):
        multilevel_splitting(model, X, Y, 0.0)
    with pytest.raises(ValueError, match="quantile"):
        multilevel_splitting(model, X, Y, EPS, quantile=1.0)
    with pytest.raises(ValueError, match="particles"):
        multilevel_splitting(model, X, Y, EPS, particles=0)
    with pytest.raises(ValueError, match="samples"):
        naive_monte_carlo(model, X, Y, EPS, samples=0)
    with pytest.raises(ValueError, match="lie in"):
        naive_monte_carlo(model, X + 1, Y, EPS)
