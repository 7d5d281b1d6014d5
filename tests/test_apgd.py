"""APGD: the DLR loss and the checkpoints of the paper, the step-size conditions, the contract, peers."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from robustdl import accuracy, zoo
from robustdl.attacks.apgd import _StepSizeControl, apgd, apgd_checkpoints
from robustdl.attacks.gradient import pgd
from robustdl.losses import dlr_loss
from robustdl.threat import LpBall

NORMS = ["linf", "l2"]
W = torch.tensor([1.0, -0.75, 0.5, -0.25])


def test_dlr_loss_on_hand_made_logits():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [3.0, 1.0, 0.0, -1.0]])
    # y = 0: -(3 - 1) / (3 - 0); y = 1: -(1 - 3) / (3 - 0).
    assert torch.allclose(dlr_loss(logits, torch.tensor([0, 1])), torch.tensor([-2 / 3, 2 / 3]))
    # Targeted, y = 0, t = 3: -(3 - (-1)) / (3 - (0 + (-1)) / 2) = -4 / 3.5.
    targeted = dlr_loss(logits[:1], torch.tensor([0]), target=torch.tensor([3]))
    assert torch.allclose(targeted, torch.tensor([-4 / 3.5]))


def test_dlr_loss_is_shift_and_scale_invariant_and_positive_exactly_when_fooled(seeded):
    g = seeded(3)
    logits, y, t = torch.randn(50, 10, generator=g), torch.randint(0, 10, (50,), generator=g), torch.arange(50) % 10
    for target, fooled in [(None, logits.argmax(1) != y), (t, logits.gather(1, t[:, None]).squeeze(1) >
                                                          logits.gather(1, y[:, None]).squeeze(1))]:
        value = dlr_loss(logits, y, target)
        assert torch.allclose(dlr_loss(7.0 * logits - 3.0, y, target), value, atol=1e-5)
        assert torch.equal(value > 0, fooled)


@pytest.mark.parametrize(("logits", "target"), [(torch.zeros(2, 2), None), (torch.zeros(2, 3), torch.ones(2).long())])
def test_dlr_loss_needs_enough_classes(logits, target):
    with pytest.raises(ValueError, match="C >= "):
        dlr_loss(logits, torch.zeros(2, dtype=torch.long), target)


def test_checkpoints_are_the_papers():
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (Croce and Hein 2020, Sec. 3.2).
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(1000) == [0, 220, 410, 570, 700, 800, 870, 930, 990]
    assert apgd_checkpoints(50) == [0, 11, 21, 29, 35, 40, 44, 47]  # ceil(p_j * 50), 49.5 -> 50 dropped


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 37, 250])
def test_checkpoints_increase_from_zero_inside_the_budget(steps):
    w = apgd_checkpoints(steps)
    assert w[0] == 0 and w[-1] < steps and all(a < b for a, b in itertools.pairwise(w))


def test_step_size_halves_under_condition_1_or_2():
    """Three examples after a window of 10 steps since the start (rho = 0.75):
    0: 8 successful steps, best loss improved -> keep; 1: 5 successful steps -> halve (cond. 1);
    2: 8 successful steps, best loss unchanged since the last checkpoint -> halve (cond. 2)."""
    control = _StepSizeControl.start(0.6, torch.tensor([1.0, 1.0, 1.0]), rho=0.75)
    control.successes = torch.tensor([8.0, 5.0, 8.0])
    halved = control.halve(10, f_max=torch.tensor([2.0, 2.0, 1.0]))
    assert halved.tolist() == [False, True, True]
    assert torch.allclose(control.eta, torch.tensor([0.6, 0.3, 0.3]))
    # Next window: example 1 was halved at the last checkpoint, so its unchanged loss alone is no
    # reason to halve again (cond. 2 needs an unchanged step size); example 0 stalls now.
    control.successes = torch.tensor([8.0, 8.0, 8.0])
    assert control.halve(20, f_max=torch.tensor([2.0, 2.0, 1.5])).tolist() == [True, False, False]


def confident_binary_model() -> nn.Module:
    """Logits (w.x + 6, -w.x): class 0 wins on all of [0, 1]^4; CE of class 0 increases along -w."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([W, -W]))
        model[1].bias.copy_(torch.tensor([6.0, 0.0]))
    return model.eval()


def test_linf_apgd_reaches_the_vertex_of_a_linear_model(seeded):
    x = torch.rand(16, 1, 2, 2, generator=seeded(1))
    x_adv = apgd(confident_binary_model(), x, torch.zeros(16, dtype=torch.long), 0.1, steps=10, generator=seeded())
    assert torch.allclose(x_adv, (x - 0.1 * W.sign().view(1, 1, 2, 2)).clamp(0, 1), atol=1e-6)


def test_l2_apgd_converges_to_the_maximiser_of_a_linear_loss(seeded):
    """In float64: the loss there is ~1e-3 and its last digits in float32 stop the ascent at ~1e-3."""
    x = 0.25 + 0.5 * torch.rand(16, 1, 2, 2, generator=seeded(2), dtype=torch.float64)
    x_adv = apgd(confident_binary_model().double(), x, torch.zeros(16, dtype=torch.long), 0.1, norm="l2",
                 steps=50, generator=seeded())
    assert torch.allclose(x_adv, x - 0.1 * (W / W.norm()).double().view(1, 1, 2, 2), atol=1e-6)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("loss", ["ce", "dlr"])
@pytest.mark.parametrize("eps", [0.05, 0.5, 3.0])
def test_apgd_respects_ball_and_box(seeded, linear_model, images, norm, loss, eps):
    x_adv = apgd(linear_model, images, torch.arange(8) % 3, eps, norm=norm, steps=10, loss=loss, generator=seeded())
    assert x_adv.shape == images.shape and x_adv.dtype == images.dtype
    assert LpBall(norm, eps).contains(x_adv, images).all()


@pytest.mark.parametrize("norm", NORMS)
def test_apgd_in_float64_with_restarts(linear_model, images, norm):
    x = images.double()
    x_adv = apgd(linear_model.double(), x, torch.arange(8) % 3, 0.2, norm=norm, steps=10, restarts=2)
    assert x_adv.dtype == torch.float64 and LpBall(norm, 0.2).contains(x_adv, x, atol=1e-12).all()


@pytest.mark.parametrize("norm", NORMS)
def test_eps_zero_is_the_identity(linear_model, images, norm):
    assert torch.equal(apgd(linear_model, images, torch.arange(8) % 3, 0.0, norm=norm, steps=5), images)


def test_apgd_on_a_batch_of_one(linear_model, images):
    with torch.no_grad():
        x_adv = apgd(linear_model, images[:1], torch.tensor([2]), 0.3, steps=5)
    assert x_adv.shape == (1, 1, 2, 2) and LpBall("linf", 0.3).contains(x_adv, images[:1]).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"eps": -0.1}, ValueError, "eps"),
        ({"norm": "l1"}, ValueError, "norm"),
        ({"norm": "l3"}, ValueError, "norm"),
        ({"steps": 0}, ValueError, "steps"),
        ({"restarts": 0}, ValueError, "restarts"),
        ({"rho": 1.5}, ValueError, "rho"),
        ({"loss": "hinge"}, ValueError, "loss"),
        ({"y": torch.zeros(3, dtype=torch.long)}, ValueError, "one label per example"),
        ({"x": torch.full((2, 1, 2, 2), 1.5)}, ValueError, r"x must lie in \[0, 1\]"),
    ],
)
def test_apgd_rejects_bad_inputs(linear_model, kwargs, error, match):
    args = {"model": linear_model, "x": torch.rand(2, 1, 2, 2), "y": torch.zeros(2, dtype=torch.long), "eps": 0.1}
    with pytest.raises(error, match=match):
        apgd(**(args | kwargs))


@pytest.mark.mnist
def test_apgd_ce_is_at_least_as_strong_as_pgd(seeded, mnist):
    """The MLP at eps 0.07, 200 images: measured PGD-40 0.440, APGD-CE 0.435 (APGD-DLR 0.485: DLR
    alone can be weaker than CE on an undefended model, which is why the ensembles use both)."""
    model = zoo.load("mnist_mlp")
    x, y = mnist(200)
    ours = accuracy(model, apgd(model, x, y, 0.07, generator=seeded()), y)
    assert ours <= accuracy(model, pgd(model, x, y, 0.07, generator=seeded()), y)


@pytest.mark.mnist
def test_targeted_apgd_reaches_the_target_on_the_standard_cnn(seeded, mnist):
    model = zoo.load("mnist_smallcnn")
    x, y = mnist(100)
    target = (y + 1) % 10
    x_adv = apgd(model, x, y, 0.3, steps=20, loss="dlr", target=target, generator=seeded())
    assert (model(x_adv).argmax(dim=1) == target).float().mean() > 0.9


@pytest.mark.mnist
@pytest.mark.parametrize(("name", "eps", "norm", "steps"), [
    ("mnist_mlp", 0.05, "linf", 100), ("mnist_mlp", 1.0, "l2", 100), ("mnist_smallcnn", 0.1, "linf", 25),
])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_is_as_strong_as_torchattacks(seeded, mnist, name, eps, norm, steps, loss):
    """torchattacks.APGD (the authors' algorithm) with equal budget: never more than 1 point weaker."""
    torchattacks = pytest.importorskip("torchattacks")
    model = zoo.load(name)
    x, y = mnist(200)
    ours = accuracy(model, apgd(model, x, y, eps, norm=norm, steps=steps, loss=loss, generator=seeded()), y)
    attack = torchattacks.APGD(model, norm=norm.capitalize(), eps=eps, steps=steps, loss=loss, seed=0)
    assert ours <= accuracy(model, attack(x, y), y) + 0.01
