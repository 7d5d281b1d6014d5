"""Regularisers: spectral normalisation, Parseval retraction, Lipschitz and weight-correlation penalties."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from robustdl.layers import layer_input_shapes, operator_norm, weight_correlation
from robustdl.models import build_model
from robustdl.train import fit, standard_loss
from robustdl.train.regularisers import (
    attach_parseval,
    lipschitz_penalty,
    parseval_step,
    regularised,
    spectral_normalise,
    weight_correlation_penalty,
)


def norms(model: nn.Module, input_shape: tuple[int, ...]) -> list[float]:
    return [operator_norm(layer, shape, iters=200) for layer, shape in layer_input_shapes(model, input_shape).items()]


@pytest.mark.parametrize("coeff", [1.0, 0.5])
def test_spectral_normalisation_bounds_every_layer_including_convolutions(coeff):
    torch.manual_seed(0)
    model = build_model("convsmall", "mnist", channels=(4, 8), hidden=16)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5)  # every layer well above the bound
    spectral_normalise(model, (1, 28, 28), coeff=coeff, iters=1)
    for _ in range(60):  # the persistent vector converges over training forwards
        model(torch.rand(2, 1, 28, 28))
    model.eval()
    assert max(norms(model, (1, 28, 28))) == pytest.approx(coeff, rel=0.02)
    assert torch.isfinite(model(torch.rand(2, 1, 28, 28))).all()


def test_spectral_normalisation_leaves_a_small_layer_unchanged_and_survives_a_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight.mul_(0.01)
    weight = model[1].weight.detach().clone()
    spectral_normalise(model, (1, 2, 2))
    model(torch.rand(3, 1, 2, 2))
    assert torch.allclose(model[1].weight, weight)
    twin = copy.deepcopy(model)
    x = torch.rand(5, 1, 2, 2)
    assert torch.allclose(twin(x), model(x))


def test_spectral_normalisation_rejects_a_nonpositive_bound():
    with pytest.raises(ValueError, match="coeff"):
        spectral_normalise(nn.Sequential(nn.Linear(2, 2)), (2,), coeff=0.0)


def parseval_distance(w: torch.Tensor) -> float:
    w = w.flatten(1)
    return (w @ w.T - torch.eye(w.shape[0])).norm().item()


def test_parseval_steps_pull_rows_towards_a_tight_frame_and_keep_them_there():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    layer = nn.Linear(8, 5)
    with torch.no_grad():
        layer.weight.copy_(q[:5] + 0.05 * torch.randn(5, 8))
    model = nn.Sequential(layer)
    before = parseval_distance(layer.weight)
    for _ in range(200):
        parseval_step(model, beta=0.05)
    assert parseval_distance(layer.weight) < 1e-3 < before
    with torch.no_grad():
        layer.weight.copy_(q[:5])
    parseval_step(model, beta=0.05)
    assert parseval_distance(layer.weight) < 1e-5  # a tight frame is a fixed point


def test_parseval_hook_runs_after_every_optimiser_step_of_fit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(9, 3))
    conv_model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Flatten(), nn.Linear(8, 3))
    data = DataLoader(TensorDataset(torch.rand(64, 1, 3, 3), torch.randint(0, 3, (64,))), batch_size=8)
    for m in (model, conv_model):
        optimizer = torch.optim.SGD(m.parameters(), lr=1e-3)
        handle = attach_parseval(optimizer, m, beta=0.05)
        before = [parseval_distance(layer.weight) for layer in m if hasattr(layer, "weight")]
        fit(m, data, 20, optimizer, progress=False)
        after = [parseval_distance(layer.weight) for layer in m if hasattr(layer, "weight")]
        assert all(a < 0.5 * b for a, b in zip(after, before, strict=True)), (before, after)
        handle.remove()


def test_lipschitz_penalty_is_the_squared_input_gradient_and_differentiable():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.rand(6, 1, 2, 2), torch.randint(0, 3, (6,))
    # For a linear model the input gradient of the CE is W^T (softmax - onehot), per example.
    p = F.softmax(model(x), 1) - F.one_hot(y, 3)
    expected = (p @ model[1].weight).pow(2).sum(1).mean()
    penalty = lipschitz_penalty(model, x, y)
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    penalty.backward()
    assert model[1].weight.grad is not None and model[1].weight.grad.abs().sum() > 0


def test_weight_correlation_penalty_sums_the_layers_and_training_on_it_decorrelates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    expected = weight_correlation(model[0].weight) + weight_correlation(model[2].weight)
    assert weight_correlation_penalty(model).item() == pytest.approx(expected.item())
    before = weight_correlation_penalty(model).item()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(100):
        optimizer.zero_grad()
        weight_correlation_penalty(model).backward()
        optimizer.step()
    assert weight_correlation_penalty(model).item() < 0.5 * before


def test_regularised_adds_exactly_weight_times_the_penalty():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.rand(6, 1, 2, 2), torch.randint(0, 3, (6,))
    objective = regularised(standard_loss, lipschitz_penalty, 0.3)
    expected = standard_loss(model, x, y) + 0.3 * lipschitz_penalty(model, x, y)
    assert objective(model, x, y).item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="weight"):
        regularised(standard_loss, lipschitz_penalty, -1.0)
