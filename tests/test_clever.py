"""CLEVER (Weng et al. 2018): exact on linear models, the Weibull fit, and agreement with ART's clever_u."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from art.estimators.classification import PyTorchClassifier
from art.metrics import clever_u
from torch import nn

from robustdl.verify.clever import clever, reverse_weibull_location

#: ART's clever_u and ours draw different random points (ART resamples batches from one pool):
#: with the same budget of gradients the scores agree to this relative tolerance.
ART_TOLERANCE = 0.2


def linear_model(inputs: int = 6, classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(inputs, classes).double().eval()


def exact_distance(model: nn.Linear, x: torch.Tensor, y: torch.Tensor, dual: float, eps: float) -> torch.Tensor:
    """min over j of (f_y - f_j)(x) / ||w_y - w_j||_q, capped at eps: the distance to the boundary."""
    with torch.no_grad():
        logits = model(x)
    out = []
    for i in range(len(x)):
        yi = int(y[i])
        dists = [
            (logits[i, yi] - logits[i, j]) / torch.linalg.vector_norm(model.weight[yi] - model.weight[j], ord=dual)
            for j in range(logits.shape[1])
            if j != yi
        ]
        out.append(min(min(dists).item(), eps))
    return torch.tensor(out, dtype=x.dtype)


@pytest.mark.parametrize(("norm", "dual"), [(2, 2.0), ("linf", 1.0), (1, math.inf)])
@pytest.mark.parametrize("eps", [0.05, 10.0])
def test_linear_model_score_is_the_exact_distance_to_the_boundary(norm, dual, eps):
    model = linear_model()
    x = torch.rand(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(dim=1)
    scores = clever(model, x, y, eps, norm=norm, batches=5, samples_per_batch=8, generator=torch.Generator())
    torch.testing.assert_close(scores, exact_distance(model, x, y, dual, eps), rtol=1e-9, atol=1e-12)


def test_targeted_score_uses_only_the_target_margin():
    model = linear_model()
    x = torch.rand(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = model(x).argmax(dim=1)
    target = (y + 1) % 4
    scores = clever(model, x, y, 10.0, target=target, batches=3, samples_per_batch=4)
    with torch.no_grad():
        g = model(x).gather(1, y[:, None]) - model(x).gather(1, target[:, None])
    w = model.weight[y] - model.weight[target]
    torch.testing.assert_close(scores, (g[:, 0] / w.norm(dim=1)).detach())
    assert (scores >= clever(model, x, y, 10.0, batches=3, samples_per_batch=4)).all()


def test_a_misclassified_example_scores_zero():
    model = linear_model()
    x = torch.rand(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    wrong = (model(x).argmax(dim=1) + 1) % 4
    assert (clever(model, x, wrong, 1.0, batches=2, samples_per_batch=4) == 0).all()


@pytest.mark.parametrize("shape", [1.5, 3.0, 6.0])
def test_weibull_location_recovers_the_end_of_the_support(shape):
    maxima = scipy.stats.weibull_max.rvs(shape, loc=3.0, scale=0.5, size=400, random_state=0)
    estimate = reverse_weibull_location(maxima)
    assert maxima.max() <= estimate <= 3.0 + 0.05
    assert estimate == pytest.approx(3.0, abs=0.05)


def test_constant_maxima_give_their_value():
    assert reverse_weibull_location(np.full(20, 2.5)) == 2.5


def tanh_net() -> nn.Module:
    """A smooth 3-class net on 2-D points: gradient norms vary continuously, as extreme value theory wants."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    with torch.no_grad():
        for layer in model[::2]:
            layer.weight.mul_(3)
    return model.eval()


@pytest.mark.parametrize(("norm", "art_norm"), [(2, 2), ("linf", np.inf)])
def test_agrees_with_art_clever_u(norm, art_norm):
    model, radius = tanh_net(), 0.5
    x = torch.rand(8, 2, generator=torch.Generator().manual_seed(1))[[1, 2, 3, 7]]
    y = model(x).argmax(dim=1)
    generator = torch.Generator().manual_seed(0)
    ours = clever(model, x, y, radius, norm=norm, batches=50, samples_per_batch=50, generator=generator)
    art = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(2,), nb_classes=3,
                            clip_values=(0.0, 1.0))
    np.random.seed(0)
    theirs = np.array(
        [clever_u(art, xi.numpy(), nb_batches=50, batch_size=50, radius=radius, norm=art_norm, pool_factor=50,
                  verbose=False) for xi in x]
    )  # the same budget: 2500 gradients per example and class
    assert (0 < theirs).all() and (theirs < radius).all(), "choose examples whose score is below the cap"
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=ART_TOLERANCE)


def test_rejects_bad_inputs():
    model = linear_model()
    x = torch.rand(2, 6, dtype=torch.float64)
    y = model(x).argmax(dim=1)
    with pytest.raises(ValueError, match="eps"):
        clever(model, x, y, -1.0)
    with pytest.raises(ValueError, match="batches"):
        clever(model, x, y, 1.0, batches=0)
    with pytest.raises(ValueError, match="norm"):
        clever(model, x, y, 1.0, norm=3)
    with pytest.raises(ValueError, match="target"):
        clever(model, x, y, 1.0, target=y)
    with pytest.raises(ValueError, match="lie in"):
        clever(model, x + 2, y, 1.0)
    with pytest.raises(TypeError, match="model"):
        clever(lambda z: z, x, y, 1.0)


def test_a_cliff_never_sampled_is_never_seen():
    """In 100-d the region x_1 > 0.7 holds ~3e-7 of the L2 ball of radius 0.4 about 0.5: CLEVER sees a
    zero gradient everywhere and reports the cap, above the true minimum distortion 0.2 + 1/50."""
    cliff = nn.Sequential(nn.Linear(100, 1), nn.ReLU(), nn.Linear(1, 2)).double()
    with torch.no_grad():
        cliff[0].weight.zero_()
        cliff[0].weight[0, 0], cliff[0].bias[0] = 1.0, -0.7
        cliff[2].weight.copy_(torch.tensor([[0.0], [50.0]]))
        cliff[2].bias.copy_(torch.tensor([1.0, 0.0]))
    x = torch.full((1, 100), 0.5, dtype=torch.float64)
    score = clever(cliff, x, torch.tensor([0]), 0.4, batches=20, samples_per_batch=20, generator=torch.Generator())
    assert score.item() == 0.4 > 0.2 + 1 / 50
