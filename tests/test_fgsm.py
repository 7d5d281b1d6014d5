"""FGSM: the paper's equation on an analytic model, its contract, and torchattacks agreement."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from robustdl.attacks import fgsm
from robustdl.threat import LpBall


def analytic_linear_gradient(model, x, y):
    """For logits W x + b, d CE / dx = W^T (softmax(W x + b) - onehot(y)), per example."""
    w = model[1].weight
    p = torch.softmax(model(x), dim=1)
    return ((p - F.one_hot(y, 3).float()) @ w).view_as(x)


def test_fgsm_is_eq_2_on_a_linear_model(linear_model, images):
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    eps = 0.05
    expected = (images + eps * analytic_linear_gradient(linear_model, images, y).sign()).clamp(0, 1)
    assert torch.allclose(fgsm(linear_model, images, y, eps), expected)


def test_targeted_fgsm_descends_the_target_loss(linear_model, images):
    target = torch.full((8,), 2)
    eps = 0.05
    expected = (images - eps * analytic_linear_gradient(linear_model, images, target).sign()).clamp(0, 1)
    x_adv = fgsm(linear_model, images, torch.zeros(8, dtype=torch.long), eps, target=target)
    assert torch.allclose(x_adv, expected)
    before = F.cross_entropy(linear_model(images), target, reduction="none")
    after = F.cross_entropy(linear_model(x_adv), target, reduction="none")
    assert (after <= before + 1e-6).all()


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5, 3.0])
def test_fgsm_respects_ball_and_box(linear_model, images, norm, eps):
    y = torch.arange(8) % 3
    x_adv = fgsm(linear_model, images, y, eps, norm=norm)
    assert LpBall(norm, eps).contains(x_adv, images).all()
    if eps == 0:
        assert torch.equal(x_adv, images)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fgsm_increases_the_loss_of_a_linear_model(linear_model, images, norm):
    # For a linear model, a small step along the gradient increases the convex loss.
    y = torch.arange(8) % 3
    x = images * 0.5 + 0.25  # away from the box so the step is not clipped
    before = F.cross_entropy(linear_model(x), y, reduction="none")
    after = F.cross_entropy(linear_model(fgsm(linear_model, x, y, 0.05, norm=norm)), y, reduction="none")
    assert (after > before).all()


def test_fgsm_works_under_no_grad(linear_model, images):
    with torch.no_grad():
        x_adv = fgsm(linear_model, images, torch.arange(8) % 3, 0.1)
    assert not torch.equal(x_adv, images)


@pytest.mark.parametrize(
    ("x", "y", "eps", "error", "match"),
    [
        (torch.full((2, 1, 2, 2), 1.5), torch.zeros(2, dtype=torch.long), 0.1, ValueError, "x must lie in"),
        (torch.rand(2, 1, 2, 2) * 255, torch.zeros(2, dtype=torch.long), 0.1, ValueError, r"\[0, 1\]"),
        (torch.rand(4), torch.zeros(4, dtype=torch.long), 0.1, ValueError, "batch dimension"),
        (torch.rand(2, 1, 2, 2), torch.zeros(3, dtype=torch.long), 0.1, ValueError, "one label per example"),
        (torch.rand(2, 1, 2, 2), torch.zeros(2), 0.1, TypeError, "integer class"),
        (torch.rand(2, 1, 2, 2).numpy(), torch.zeros(2, dtype=torch.long), 0.1, TypeError, "x must be a torch.Tensor"),
        (torch.rand(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), -0.1, ValueError, "eps"),
        (torch.rand(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), math.nan, ValueError, "eps"),
    ],
)
def test_fgsm_rejects_bad_inputs(linear_model, x, y, eps, error, match):
    with pytest.raises(error, match=match):
        fgsm(linear_model, x, y, eps)


def test_fgsm_rejects_a_model_returning_a_dict(images):
    class DictModel(torch.nn.Module):
        def forward(self, x):
            return {"logits": x.flatten(1)[:, :3]}

    with pytest.raises(TypeError, match="logits"):
        fgsm(DictModel(), images, torch.zeros(8, dtype=torch.long), 0.1)


def test_fgsm_rejects_a_non_module(images):
    with pytest.raises(TypeError, match="model"):
        fgsm(lambda x: x, images, torch.zeros(8, dtype=torch.long), 0.1)
