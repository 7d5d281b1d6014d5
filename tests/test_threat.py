"""Threat models: projection, random start and steepest step, checked as properties."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from robustdl.threat import LpBall, as_ball, parse_norm

NORMS = [math.inf, 2.0, 1.0]
settings.register_profile("robustdl", max_examples=60, deadline=None)
settings.load_profile("robustdl")


@st.composite
def problems(draw: st.DrawFn) -> tuple[LpBall, torch.Tensor, torch.Tensor]:
    """A ball, clean images x in [0, 1] and arbitrary points z (possibly far outside)."""
    p = draw(st.sampled_from(NORMS))
    eps = draw(st.floats(0.0, 3.0))
    n, d = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, d, generator=g, dtype=torch.float64)
    scale = draw(st.floats(0.01, 5.0))
    z = x + scale * torch.randn(n, 1, d, generator=g, dtype=torch.float64)
    return LpBall(p, eps), x, z


@given(problems())
def test_projection_lands_inside_ball_and_box(problem):
    ball, x, z = problem
    u = ball.project(z, x)
    assert ball.contains(u, x, atol=1e-9).all()


@given(problems())
def test_projection_is_idempotent(problem):
    ball, x, z = problem
    u = ball.project(z, x)
    # Exact up to the last bit of float64: at eps near machine epsilon the L2 rescaling of a point already
    # on the sphere can move it by one ulp.
    assert torch.allclose(ball.project(u, x), u, rtol=0, atol=1e-12)


@given(problems())
def test_projection_leaves_inside_points_unchanged(problem):
    ball, x, _ = problem
    inside = ball.random(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ball.project(inside, x), inside)


@given(problems())
def test_projection_is_the_nearest_feasible_point(problem):
    """No feasible point (random or a convex mix with the projection) is closer to z."""
    ball, x, z = problem
    u = ball.project(z, x)
    dist = (u - z).flatten(1).norm(dim=1)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        w = ball.random(x, generator=g)
        for t in (1.0, 0.1):
            v = t * w + (1 - t) * u  # feasible: the set is convex
            assert ((v - z).flatten(1).norm(dim=1) >= dist - 1e-7).all()


@given(problems())
def test_random_start_is_feasible(problem):
    ball, x, _ = problem
    assert ball.contains(ball.random(x, generator=torch.Generator().manual_seed(0)), x, atol=1e-9).all()


@given(problems(), st.floats(0.0, 2.0))
def test_step_has_norm_alpha_and_ascends(problem, alpha):
    ball, _, z = problem
    grad = z - 0.5
    v = ball.step(grad, alpha)
    assert torch.allclose(ball.norm(v), torch.full((len(v),), alpha, dtype=v.dtype))
    # The steepest step attains the dual norm: <g, v> = alpha * ||g||_q.
    assert torch.allclose((grad * v).flatten(1).sum(1), alpha * ball.dual_norm(grad))


def test_linf_random_start_covers_the_cube():
    x = torch.full((1, 1, 20000), 0.5)
    delta = LpBall("linf", 0.1).random(x, generator=torch.Generator().manual_seed(0)) - x
    assert delta.min() < -0.099 and delta.max() > 0.099
    assert abs(delta.mean().item()) < 2e-3


def test_l2_random_start_is_uniform_in_radius():
    # Uniform in a d-ball: P(||delta|| <= r eps) = r^d. In d = 2, half the mass lies within 0.707 eps.
    x = torch.full((4000, 2), 0.5)
    r = LpBall(2, 0.2).norm(LpBall(2, 0.2).random(x, generator=torch.Generator().manual_seed(0)) - x) / 0.2
    assert abs((r <= 2 ** -0.5).float().mean().item() - 0.5) < 0.03


def test_l1_random_start_is_uniform_in_the_cross_polytope():
    # In d = 1 the L1 ball is an interval: |delta| uniform on [0, eps].
    x = torch.full((4000, 1), 0.5)
    delta = (LpBall(1, 0.3).random(x, generator=torch.Generator().manual_seed(0)) - x).abs() / 0.3
    assert abs(delta.mean().item() - 0.5) < 0.02


def test_known_projections():
    x = torch.tensor([[0.5, 0.5]])
    assert torch.allclose(LpBall("linf", 0.1).project(torch.tensor([[0.9, 0.45]]), x), torch.tensor([[0.6, 0.45]]))
    u = LpBall(2, 0.1).project(torch.tensor([[0.8, 0.9]]), x)
    assert torch.allclose(u, torch.tensor([[0.56, 0.58]]), atol=1e-6)
    # L1: soft-threshold z - x = (0.3, 0.1) at lambda = 0.2, the smallest giving L1 norm 0.1.
    assert torch.allclose(LpBall(1, 0.1).project(torch.tensor([[0.8, 0.6]]), x), torch.tensor([[0.6, 0.5]]), atol=1e-6)
    # The box binds: the exact projection is not "clip after ball projection".
    x = torch.tensor([[0.95, 0.5]])
    u = LpBall(2, 0.1).project(torch.tensor([[1.5, 0.6]]), x)
    assert torch.allclose(u, torch.tensor([[1.0, 0.5 + math.sqrt(0.1**2 - 0.05**2)]]), atol=1e-6)


def test_eps_zero_is_the_identity():
    x = torch.rand(3, 1, 4, 4)
    for p in NORMS:
        assert torch.equal(LpBall(p, 0.0).project(torch.rand(3, 1, 4, 4), x), x)


@pytest.mark.parametrize("p", ["linf", "inf", "l2", "L1", 2, 1, math.inf])
def test_parse_norm_accepts_names(p):
    assert parse_norm(p) in NORMS


@pytest.mark.parametrize("p", [3, 0, "l3", None, True])
def test_bad_norm_is_rejected(p):
    with pytest.raises(ValueError, match="norm p"):
        LpBall(p, 0.1)


@pytest.mark.parametrize("eps", [-0.1, math.nan, math.inf])
def test_bad_eps_is_rejected(eps):
    with pytest.raises(ValueError, match="eps"):
        LpBall("linf", eps)


def test_eps_must_be_a_number():
    with pytest.raises(TypeError, match="eps"):
        LpBall("linf", "0.3")


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="x_adv"):
        LpBall(2, 0.1).project(torch.rand(2, 3), torch.rand(2, 4))


def test_random_rejects_images_outside_the_box():
    with pytest.raises(ValueError, match="x must lie in"):
        LpBall(2, 0.1).random(torch.full((1, 4), 2.0))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.01, 5.0), st.sampled_from(["linf", "l2", "l1"]))
def test_project_perturbation_ignores_the_box(seed, eps, norm):
    v = 3 * torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ball = LpBall(norm, eps)
    projected = ball.project_perturbation(v)
    assert (ball.norm(projected) <= eps * (1 + 1e-6)).all()
    assert torch.allclose(ball.project_perturbation(projected), projected, atol=1e-9)  # idempotent
    if norm == "linf":
        assert torch.allclose(projected, v.clamp(-eps, eps))
    if norm == "l2":
        assert torch.allclose(projected, v * (eps / ball.norm(v)).clamp(max=1).view(-1, 1, 1, 1), atol=1e-9)


@given(problems(), st.integers(1, 3))
def test_concretise_is_a_sound_lower_bound_attained_without_the_box(problem, k):
    r"""min over the set of <A_k, x'>: below A_k . x' at points of the set (inside, on the sphere, at
    Hölder's minimiser clipped), and equal to <A_k, x> - eps ||A_k||_q when the box does not bind."""
    ball, x, _ = problem
    g = torch.Generator().manual_seed(k)
    A = torch.randn(len(x), k, *x.shape[1:], generator=g, dtype=torch.float64)
    bound = ball.concretise(A, x)
    assert bound.shape == (len(x), k)
    minimiser = x.unsqueeze(1) - ball.step(A.flatten(0, 1), ball.eps).view_as(A)  # Hölder's, per row
    sphere = x + ball.step(torch.randn(x.shape, generator=g, dtype=torch.float64), ball.eps)
    for point in (ball.random(x, generator=g), sphere.clamp(0, 1)):
        assert (bound <= (A * point.unsqueeze(1)).flatten(2).sum(-1) + 1e-9).all()
    assert (bound <= (A * minimiser.clamp(0, 1)).flatten(2).sum(-1) + 1e-9).all()
    lower, upper = ball.box(x)
    if ((minimiser >= lower.unsqueeze(1)) & (minimiser <= upper.unsqueeze(1))).all():  # the box does not bind
        assert torch.allclose(bound, (A * minimiser).flatten(2).sum(-1), atol=1e-9)
    assert torch.allclose(ball.concretise(A[:1], x), ball.concretise(A[:1].expand_as(A), x), atol=1e-12)


def test_concretise_keeps_the_box_where_it_is_tighter():
    """At a corner of [0, 1] the box halves the L2 ball's reach; for Linf the box is the set."""
    x = torch.zeros(1, 4, dtype=torch.float64)
    A = torch.ones(1, 1, 4, dtype=torch.float64)
    assert LpBall("l2", 0.5).concretise(A, x).item() == 0.0  # Hölder alone: -0.5 * 2 = -1
    assert LpBall("l2", 0.5).concretise(-A, x).item() == pytest.approx(-1.0)  # Hölder: -eps ||A||_2
    assert LpBall("linf", 0.5).concretise(-A, x).item() == pytest.approx(-2.0)
    assert LpBall("l1", 0.5).concretise(-A, x).item() == pytest.approx(-0.5)
    assert LpBall("l2", 0.5).dual_exponent == 2 and LpBall("l1", 1).dual_exponent == math.inf
    assert torch.allclose(LpBall("l2", 0.3).box(torch.tensor([[0.1, 0.9]]))[0], torch.tensor([[0.0, 0.6]]))


@given(p=st.sampled_from(["linf", "l2", "l1", math.inf, 2, 1]), eps=st.floats(0, 10, allow_nan=False))
def test_as_ball_takes_a_ball_as_it_is_and_floats_as_their_ball(p, eps):
    ball = LpBall(p, eps)
    assert as_ball(ball) is ball and as_ball(ball, ball.name) is ball
    assert as_ball(eps, p) == ball
