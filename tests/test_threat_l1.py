"""The sparse L1 step of LpBall.step (SLIDE, Tramèr and Boneh 2019): its support, norm and ascent."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from robustdl.threat import LpBall

L1 = LpBall("l1", 1.0)


@st.composite
def gradients(draw: st.DrawFn) -> torch.Tensor:
    n, d = draw(st.integers(1, 4)), draw(st.integers(1, 40))
    return torch.randn(n, 1, d, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1))),
                       dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(gradients(), st.floats(0.0, 1.0), st.one_of(st.just(0.0), st.floats(1e-6, 2.0)))  # no subnormal steps
def test_sparse_step_spreads_alpha_evenly_over_the_top_coordinates(grad, sparsity, alpha):
    v = L1.step(grad, alpha, sparsity=sparsity).flatten(1)
    g = grad.flatten(1)
    k = max(1, math.ceil((1 - sparsity) * g.shape[1] - 1e-9))
    assert ((v != 0).sum(dim=1) == (k if alpha > 0 else 0)).all()
    assert torch.allclose(L1.norm(v), torch.full((len(v),), alpha, dtype=v.dtype))
    # The support is the k largest |g_i|, the signs are g's: <g, v> = alpha * mean of the top-k |g_i|.
    top = g.abs().topk(k, dim=1).values
    assert torch.allclose((g * v).sum(dim=1), alpha * top.mean(dim=1))


def test_sparsity_one_is_the_exact_steepest_step_and_zero_the_scaled_sign():
    g = torch.tensor([[0.1, -3.0, 2.0, 0.5]])
    assert torch.equal(L1.step(g, 0.4), torch.tensor([[0.0, -0.4, 0.0, 0.0]]))
    assert torch.equal(L1.step(g, 0.4, sparsity=1.0), L1.step(g, 0.4))
    assert torch.allclose(L1.step(g, 0.4, sparsity=0.0), 0.1 * g.sign())
    assert torch.allclose(L1.step(g, 0.4, sparsity=0.5), torch.tensor([[0.0, -0.2, 0.2, 0.0]]))


def test_zero_gradient_coordinates_in_the_top_set_do_not_shrink_the_step():
    g = torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    v = L1.step(g, 0.3, sparsity=0.0)
    assert torch.allclose(v, torch.tensor([[0.0, 0.3, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("p", ["linf", "l2"])
def test_dense_norms_ignore_sparsity(p):
    g = torch.randn(3, 1, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(LpBall(p, 1.0).step(g, 0.2, sparsity=0.5), LpBall(p, 1.0).step(g, 0.2))


@pytest.mark.parametrize(("sparsity", "error"), [(1.5, ValueError), (-0.1, ValueError), (math.nan, ValueError),
                                                 ("0.9", TypeError)])
def test_bad_sparsity_is_rejected(sparsity, error):
    with pytest.raises(error, match="sparsity"):
        L1.step(torch.ones(1, 4), 0.1, sparsity=sparsity)
