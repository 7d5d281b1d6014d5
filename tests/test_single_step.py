"""Single-step training without catastrophic overfitting: N-FGSM and GradAlign."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustdl.attacks import fgsm
from robustdl.data import gaussian_clusters
from robustdl.models import build_model
from robustdl.threat import LpBall
from robustdl.train import fit, make_objective, seed_everything
from robustdl.train.adversarial import fast_at_loss
from robustdl.train.single_step import gradalign_loss, gradient_alignment, input_gradient, n_fgsm_loss

EPS = 0.1


def small_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", "points", hidden=(32,), classes=3)


def data(seed: int = 1, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    return gaussian_clusters(n, classes=3, seed=seed).tensors


def seen_inputs(model: nn.Module, objective) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x, y = data()
    inputs: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach().clone()))
    objective(model, x, y).backward()
    return x, inputs


def test_n_fgsm_trains_outside_the_ball_within_noise_plus_step():
    """No projection: the training point lies within (k + 1) eps of x, and beyond eps for most coordinates."""
    x, inputs = seen_inputs(small_mlp(), lambda m, a, b: n_fgsm_loss(m, a, b, eps=EPS, noise=2.0))
    trained_on = inputs[-1]
    assert LpBall("linf", 3 * EPS).contains(trained_on, x).all() and trained_on.min() >= 0 and trained_on.max() <= 1
    assert not LpBall("linf", EPS).contains(trained_on, x).all()


def test_n_fgsm_with_clipping_stays_in_the_ball():
    x, inputs = seen_inputs(small_mlp(), lambda m, a, b: n_fgsm_loss(m, a, b, eps=EPS, clip=EPS))
    assert LpBall("linf", EPS).contains(inputs[-1], x).all()


def test_n_fgsm_without_noise_is_fgsm_training():
    model = small_mlp()
    x, y = data()
    expected = fast_at_loss(model, x, y, eps=EPS, step_size=EPS, random_start=False)
    assert n_fgsm_loss(model, x, y, eps=EPS, noise=0.0).item() == pytest.approx(expected.item(), rel=1e-6)
    x, inputs = seen_inputs(model, lambda m, a, b: n_fgsm_loss(m, a, b, eps=EPS, noise=0.0))
    torch.testing.assert_close(inputs[-1], fgsm(model, x, data()[1], eps=EPS))


def test_gradalign_without_the_regulariser_is_fgsm_training():
    model = small_mlp()
    x, y = data()
    expected = fast_at_loss(model, x, y, eps=EPS, step_size=EPS, random_start=False)
    assert gradalign_loss(model, x, y, eps=EPS, lam=0.0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradients_of_a_two_class_linear_model_are_perfectly_aligned():
    """For logits Wx + b with two classes the input gradient is (p_1 - y_1)(w_1 - w_0): one direction."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
    x, y = torch.rand(16, 2), torch.randint(0, 2, (16,))
    g1, g2 = input_gradient(model, x, y), input_gradient(model, LpBall("linf", EPS).random(x), y)
    torch.testing.assert_close(gradient_alignment(g1, g2), torch.ones(16))
    fgsm_only = gradalign_loss(model, x, y, eps=EPS, lam=0.0)
    assert gradalign_loss(model, x, y, eps=EPS, lam=5.0).item() == pytest.approx(fgsm_only.item(), abs=1e-5)


def test_gradalign_regulariser_is_bounded_and_reaches_the_weights_by_double_backprop():
    model = small_mlp()
    x, y = data()
    torch.manual_seed(0)
    regulariser = gradalign_loss(model, x, y, eps=EPS, lam=1.0) - gradalign_loss(model, x, y, eps=EPS, lam=0.0)
    assert 0 <= regulariser.item() <= 2
    grads = {}
    for lam in (0.0, 1.0):
        model.zero_grad()
        torch.manual_seed(0)
        gradalign_loss(model, x, y, eps=EPS, lam=lam).backward()
        grads[lam] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert not torch.allclose(grads[0.0], grads[1.0])


@pytest.mark.parametrize("name", ["n_fgsm", "gradalign"])
def test_single_step_objectives_train_by_name(name):
    seed_everything(0)
    model = small_mlp()
    loader = torch.utils.data.DataLoader(gaussian_clusters(300, classes=3, seed=0), batch_size=50, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    history = fit(model, loader, 8, torch.optim.Adam(model.parameters(), lr=0.02),
                  make_objective(name, eps=EPS))
    last = sum(h["train_loss"] for h in history[-3:]) / 3  # N-FGSM's loss is noisy: its noise is 2 eps
    assert last < 0.7 * history[0]["train_loss"]


@pytest.mark.parametrize(("call", "match"), [
    (lambda: n_fgsm_loss(small_mlp(), *data(), eps=EPS, noise=-1.0), "noise"),
    (lambda: n_fgsm_loss(small_mlp(), *data(), eps=EPS, clip=-0.1), "clip"),
    (lambda: n_fgsm_loss(small_mlp(), *data(), eps=-0.1), "eps"),
    (lambda: gradalign_loss(small_mlp(), *data(), eps=EPS, lam=-0.2), "lam"),
    (lambda: gradalign_loss(small_mlp(), *data(), eps=EPS, step_size=-1.0), "step_size"),
])
def test_bad_arguments_say_what_is_wrong(call, match):
    with pytest.raises(ValueError, match=match):
        call()
