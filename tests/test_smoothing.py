"""Randomised smoothing (Cohen et al. 2019): against a closed form, scipy, and an attack on the smoothed classifier.

A two-class affine model :math:`f(x) = [w^\\top x + b > 0]` has a smoothed classifier known exactly:
under :math:`\\varepsilon \\sim N(0, \\sigma^2 I)` the score :math:`w^\\top(x + \\varepsilon) + b` is normal,
so :math:`p_A = \\Phi(|w^\\top x + b| / (\\sigma \\|w\\|))`, :math:`g(x) = f(x)`, and Theorem 1's radius
:math:`\\sigma \\Phi^{-1}(p_A)` is exactly the distance :math:`|w^\\top x + b| / \\|w\\|` to the hyperplane.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest, norm
from torch import nn
from torch.utils.data import TensorDataset

from robustdl.train import make_objective, standard_loss
from robustdl.train.noise import gaussian_noise_loss
from robustdl.verify import (
    Certificate,
    binomial_test_half,
    certified_radius,
    certify,
    class_counts,
    clopper_pearson_lower,
    smoothed_certified_accuracy,
    smoothed_predict,
)
from robustdl.verify.smoothing import ABSTAIN

SHAPE = (1, 4, 4)


@pytest.fixture
def affine():
    """Logits (0, w.x + b) on 1x4x4 images: class 1 iff w.x + b > 0; the hyperplane passes through x = 0.5."""
    w = torch.randn(16, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.zeros(16), w]))
        model[1].bias.copy_(torch.tensor([0.0, -0.5 * w.sum().item()]))
    return model.eval(), w, -0.5 * w.sum().item()


def exact(x, w, b, sigma):
    """The smoothed class, p_A and the distance to the hyperplane, in closed form."""
    score = x.flatten(1) @ w + b
    distance = score.abs() / w.norm()
    return (score > 0).long(), torch.from_numpy(norm.cdf(distance.numpy() / sigma)), distance


def test_certify_on_an_affine_model_is_sound_and_tight(affine, seeded):
    """p_lower <= p_A, R <= the distance, and for n = 20000 R is within 0.1 sigma of it where p_A <= 0.99."""
    model, w, b = affine
    sigma = 0.5
    x = torch.rand(30, *SHAPE, generator=seeded(1))
    label, p_true, distance = exact(x, w, b, sigma)
    cert = certify(model, x, sigma, n0=100, n=20_000, alpha=0.001, batch_size=10_000, generator=seeded(2))
    assert (cert.p_lower <= p_true.double()).all()
    assert (cert.radius <= distance.double() + 1e-6).all()
    certified = cert.prediction != ABSTAIN
    assert certified.sum() >= 25 and (cert.prediction[certified] == label[certified]).all()
    assert (cert.radius[~certified] == 0).all()
    moderate = certified & (p_true <= 0.99)
    assert moderate.sum() >= 10
    gap = (distance.double() - cert.radius)[moderate]
    assert gap.max() <= 0.1 * sigma  # measured: about 0.02 sigma


def test_the_radius_grows_with_n_towards_the_distance(affine, seeded):
    """More samples tighten the bound: the mean gap to the true distance shrinks from n = 1000 to n = 30000."""
    model, w, b = affine
    x = torch.rand(10, *SHAPE, generator=seeded(3))
    distance = exact(x, w, b, 0.25)[2].double()
    gaps = [(distance - certify(model, x, 0.25, n=n, batch_size=10_000, generator=seeded(4)).radius).mean()
            for n in (1000, 30_000)]
    assert 0 <= gaps[1] < gaps[0]


def test_abstention_on_the_decision_boundary_and_prediction_far_from_it(affine, seeded):
    model, w, b = affine
    x = torch.rand(20, *SHAPE, generator=seeded(5))
    on_plane = x - ((x.flatten(1) @ w + b) / w.dot(w)).view(-1, 1, 1, 1) * w.view(1, *SHAPE)
    on_plane = on_plane.clamp(0, 1)
    near = exact(on_plane, w, b, 0.5)[2]
    on_plane = on_plane[near < 1e-3]  # those that clamping left on the plane
    assert len(on_plane) >= 10
    assert (smoothed_predict(model, on_plane, 0.5, n=1000, generator=seeded(6)) == ABSTAIN).all()
    assert (certify(model, on_plane, 0.5, n=1000, generator=seeded(7)).prediction == ABSTAIN).all()
    label, p_true, _ = exact(x, w, b, 0.1)
    clear = p_true > 0.8
    pred = smoothed_predict(model, x[clear], 0.1, n=1000, generator=seeded(8))
    assert clear.sum() >= 5 and torch.equal(pred, label[clear])


def test_class_counts_add_up_and_follow_the_closed_form(affine, seeded):
    model, w, b = affine
    x = torch.rand(3, *SHAPE, generator=seeded(9))
    counts = class_counts(model, x, 0.5, 5000, batch_size=700, generator=seeded(0))
    assert counts.dtype == torch.int64 and counts.shape == (3, 2) and (counts.sum(1) == 5000).all()
    label, p_true, _ = exact(x, w, b, 0.5)
    frequency = counts.gather(1, label.view(-1, 1)).squeeze(1) / 5000
    assert torch.allclose(frequency.double(), p_true, atol=4 * 0.5 / 5000**0.5)  # 4 standard errors at most


def test_a_seed_gives_the_same_certificate(affine, seeded):
    model, _, _ = affine
    x = torch.rand(4, *SHAPE, generator=seeded(1))
    first, again = (certify(model, x, 0.5, n=500, generator=seeded(3)) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other = certify(model, x, 0.5, n=500, generator=seeded(4))
    assert not torch.equal(first.p_lower, other.p_lower)


# ------------------------------------------------------------------------------------------------
# Clopper-Pearson and the radius against scipy
# ------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), data=st.data(), alpha=st.floats(1e-4, 0.2))
def test_clopper_pearson_matches_scipys_exact_interval(n, data, alpha):
    """The one-sided bound at alpha is the lower end of scipy's two-sided exact interval at 1 - 2 alpha."""
    k = data.draw(st.integers(0, n))
    ours = clopper_pearson_lower(k, n, alpha).item()
    theirs = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
    assert ours == pytest.approx(theirs, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 3000), data=st.data())
def test_the_binomial_test_of_one_half_is_scipys(m, data):
    k = data.draw(st.integers(0, m))
    ours = binomial_test_half(torch.tensor([k]), torch.tensor([m])).item()
    assert ours == pytest.approx(binomtest(k, m, 0.5).pvalue, rel=1e-7, abs=1e-300)


def test_clopper_pearson_covers_the_true_proportion():
    """Over 4000 binomial draws the bound lies below p at least 1 - alpha of the time (less 3 standard errors)."""
    draws = torch.from_numpy(np.random.default_rng(0).binomial(200, 0.8, size=4000))
    coverage = (clopper_pearson_lower(draws, 200, 0.05) <= 0.8).double().mean().item()
    assert coverage >= 0.95 - 3 * (0.05 * 0.95 / 4000) ** 0.5


def test_clopper_pearson_of_tensors_keeps_shape_and_extremes():
    bound = clopper_pearson_lower(torch.tensor([[0, 50], [100, 99]]), 100, 0.001)
    assert bound.dtype == torch.float64 and bound.shape == (2, 2)
    assert bound[0, 0] == 0 and bound[1, 0] == pytest.approx(0.001 ** (1 / 100))


@settings(max_examples=60, deadline=None)
@given(p=st.floats(0.0, 1.0), q=st.floats(0.0, 1.0), sigma=st.floats(0.01, 2.0))
def test_radius_is_zero_up_to_one_half_and_increasing_after(p, q, sigma):
    low, high = sorted((p, q))
    r_low, r_high = certified_radius(low, sigma).item(), certified_radius(high, sigma).item()
    assert 0 <= r_low <= r_high
    if high <= 0.5:
        assert r_high == 0
    elif high < 1:
        assert r_high == pytest.approx(sigma * norm.ppf(high), rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# No attack on the smoothed classifier gets closer than the certified radius
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moons_model():
    """A small MLP, trained for a second or two under Gaussian noise of sigma 0.1, on a disc: points of the
    unit square labelled by whether they lie within 0.3 of its centre (a curved decision boundary)."""
    torch.manual_seed(0)
    points = torch.rand(400, 2)
    data = TensorDataset(points, ((points - 0.5).norm(dim=1) < 0.3).long())
    model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        optimiser.zero_grad()
        gaussian_noise_loss(model, *data.tensors, sigma=0.1).backward()
        optimiser.step()
    return model.eval(), data


def test_certified_radius_is_below_the_distance_to_any_adversarial_example_found(moons_model, seeded):
    """Search 16 directions x 20 distances for points that the smoothed classifier (PREDICT, n = 1000,
    alpha 0.001) puts in another class; the nearest must lie no closer than the certified radius."""
    model, data = moons_model
    sigma = 0.1
    x, y = data.tensors[0][:10], data.tensors[1][:10]
    cert = certify(model, x, sigma, n=5000, generator=seeded(0))
    assert smoothed_certified_accuracy(cert, y, 0.0) >= 0.75
    angles = torch.arange(16) * (2 * torch.pi / 16)
    directions = torch.stack([angles.cos(), angles.sin()], 1)
    steps = torch.linspace(0.02, 0.4, 20)
    found = 0
    for i in torch.nonzero(cert.prediction != ABSTAIN).flatten().tolist():
        candidates = (x[i] + steps.view(-1, 1, 1) * directions.view(1, -1, 2)).reshape(-1, 2).clamp(0, 1)
        pred = smoothed_predict(model, candidates, sigma, n=1000, generator=seeded(i))
        broken = (pred != ABSTAIN) & (pred != cert.prediction[i])
        if broken.any():
            found += 1
            nearest = (candidates[broken] - x[i]).norm(dim=1).min().item()
            assert cert.radius[i].item() <= nearest
    assert found >= 5  # the search is not vacuous


# ------------------------------------------------------------------------------------------------
# Certified accuracy, the training objective, bad inputs
# ------------------------------------------------------------------------------------------------


def test_certified_accuracy_counts_correct_predictions_with_a_large_enough_radius():
    cert = Certificate(torch.tensor([0, 1, ABSTAIN, 2]), torch.tensor([0.3, 1.0, 0.0, 0.6], dtype=torch.float64),
                       torch.tensor([0.9, 0.99, 0.4, 0.95], dtype=torch.float64))
    y = torch.tensor([0, 1, 2, 1])
    assert smoothed_certified_accuracy(cert, y, [0.0, 0.3, 0.5, 1.0, 1.5]) == [0.5, 0.5, 0.25, 0.25, 0.0]
    assert smoothed_certified_accuracy(cert, y, 0.3) == 0.5


def test_gaussian_noise_objective_trains_on_noisy_copies():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(8, *SHAPE), torch.arange(8) % 3
    torch.manual_seed(0)
    first = make_objective("gaussian_noise", sigma=0.5)(model, x, y)
    torch.manual_seed(0)
    assert torch.equal(first, gaussian_noise_loss(model, x, y, sigma=0.5))
    assert first.isfinite() and not torch.equal(first, standard_loss(model, x, y))
    first.backward()
    assert model[1].weight.grad is not None


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda m, x: certify(m, x, 0.0), ValueError, "sigma"),
    (lambda m, x: certify(m, x, 0.5, n=0), ValueError, "n must"),
    (lambda m, x: certify(m, x, 0.5, n0=1.5), TypeError, "n0 must"),
    (lambda m, x: certify(m, x, 0.5, alpha=0.0), ValueError, "alpha"),
    (lambda m, x: smoothed_predict(m, x, 0.5, alpha=1.5), ValueError, "alpha"),
    (lambda m, x: smoothed_predict(m, x, 0.5, batch_size=0), ValueError, "batch_size"),
    (lambda m, x: class_counts(m, x.numpy(), 0.5, 10), TypeError, "x must"),
    (lambda m, x: class_counts(m, x[:0], 0.5, 10), ValueError, "at least one"),
    (lambda m, x: class_counts(lambda t: t, x, 0.5, 10), TypeError, "model must"),
    (lambda m, x: class_counts(nn.Sequential(nn.Flatten(), nn.Linear(16, 1)), x, 0.5, 10), ValueError, "K >= 2"),
    (lambda m, x: clopper_pearson_lower(11, 10, 0.01), ValueError, "successes"),
    (lambda m, x: clopper_pearson_lower(torch.tensor([0.5]), 10, 0.01), TypeError, "successes"),
    (lambda m, x: certified_radius(1.5, 0.5), ValueError, "p_lower"),
    (lambda m, x: certified_radius(0.9, -1.0), ValueError, "sigma"),
    (lambda m, x: smoothed_certified_accuracy((1, 2, 3), torch.tensor([0]), 0.5), TypeError, "certificate"),
    (lambda m, x: gaussian_noise_loss(m, x, torch.zeros(2, dtype=torch.long), sigma=0), ValueError, "sigma"),
])
def test_bad_inputs_are_named(affine, call, error, match):
    model, _, _ = affine
    with pytest.raises(error, match=match):
        call(model, torch.rand(2, *SHAPE))
