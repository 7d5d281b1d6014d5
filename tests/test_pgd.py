"""PGD: Madry's iteration on analytic models, its contract in every norm, and torchattacks agreement."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robustdl import accuracy, zoo
from robustdl.ascent import projected_ascent
from robustdl.attacks.gradient import fgsm, pgd
from robustdl.losses import kl_divergence
from robustdl.threat import LpBall

NORMS = ["linf", "l2", "l1"]
W = torch.tensor([1.0, -0.75, 0.5, -0.25])


def confident_binary_model() -> nn.Module:
    """Logits (w.x + 6, -w.x), w = (1, -0.75, 0.5, -0.25): class 0 wins on all of [0, 1]^4.

    CE of class 0 is softplus(-2 w.x - 6), increasing along -w everywhere, so its maximiser over
    a ball is the point of the ball furthest along -w, and no point is ever misclassified.
    """
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([W, -W]))
        model[1].bias.copy_(torch.tensor([6.0, 0.0]))
    return model.eval()


def test_linf_pgd_reaches_the_vertex_of_a_linear_model(seeded):
    """With sign(grad) constant, 2.5 eps of travel reaches x - eps sign(w) from any start."""
    x = torch.rand(16, 1, 2, 2, generator=seeded(1))
    y = torch.zeros(16, dtype=torch.long)
    x_adv = pgd(confident_binary_model(), x, y, eps=0.1, steps=10, generator=seeded())
    assert torch.allclose(x_adv, (x - 0.1 * W.sign().view(1, 1, 2, 2)).clamp(0, 1), atol=1e-6)


@pytest.mark.parametrize(("norm", "direction"), [
    ("l2", W / W.norm()),
    ("l1", torch.tensor([1.0, 0.0, 0.0, 0.0])),  # the vertex on the largest |w_i|
])
def test_pgd_from_x_reaches_the_maximiser_of_a_linear_loss(seeded, norm, direction):
    x = 0.25 + 0.5 * torch.rand(6, 1, 2, 2, generator=seeded(2))  # the box is not active at eps 0.1
    x_adv = pgd(confident_binary_model(), x, torch.zeros(6, dtype=torch.long), eps=0.1, norm=norm,
                steps=10, random_start=False)
    assert torch.allclose(x_adv, x - 0.1 * direction.view(1, 1, 2, 2), atol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("eps", [0.05, 0.5, 3.0])
def test_pgd_respects_ball_and_box(seeded, linear_model, images, norm, eps):
    y = torch.arange(8) % 3
    x_adv = pgd(linear_model, images, y, eps, norm=norm, steps=5, generator=seeded())
    assert x_adv.shape == images.shape and x_adv.dtype == images.dtype
    assert LpBall(norm, eps).contains(x_adv, images).all()


@pytest.mark.parametrize("norm", NORMS)
def test_pgd_in_float64(seeded, linear_model, images, norm):
    model, x = linear_model.double(), images.double()
    x_adv = pgd(model, x, torch.arange(8) % 3, 0.2, norm=norm, steps=5, restarts=2, generator=seeded())
    assert x_adv.dtype == torch.float64 and LpBall(norm, 0.2).contains(x_adv, x, atol=1e-12).all()


@pytest.mark.parametrize("norm", NORMS)
def test_eps_zero_is_the_identity(linear_model, images, norm):
    assert torch.equal(pgd(linear_model, images, torch.arange(8) % 3, 0.0, norm=norm, steps=3), images)


def test_pgd_on_a_batch_of_one_and_under_no_grad(linear_model, images):
    with torch.no_grad():
        x_adv = pgd(linear_model, images[:1], torch.tensor([2]), 0.3, steps=5)
    assert x_adv.shape == (1, 1, 2, 2) and not torch.equal(x_adv, images[:1])


def test_pgd_is_reproducible_with_a_generator(seeded, linear_model, images):
    y = torch.arange(8) % 3
    first = pgd(linear_model, images, y, 0.1, steps=3, generator=seeded(5))
    assert torch.equal(first, pgd(linear_model, images, y, 0.1, steps=3, generator=seeded(5)))


def test_cosine_schedule_stays_in_the_ball(linear_model, images):
    x_adv = pgd(linear_model, images, torch.arange(8) % 3, 0.1, norm="l2", steps=5, schedule="cosine")
    assert LpBall("l2", 0.1).contains(x_adv, images).all()


def test_targeted_pgd_reaches_the_target_on_a_linear_model(linear_model, images):
    target = torch.full((8,), 2)
    x_adv = pgd(linear_model, images, torch.zeros(8, dtype=torch.long), eps=1.0, steps=20, target=target)
    assert (linear_model(x_adv).argmax(dim=1) == target).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"eps": -0.1}, ValueError, "eps"),
        ({"eps": math.nan}, ValueError, "eps"),
        ({"norm": "l3"}, ValueError, "norm"),
        ({"steps": 0}, ValueError, "steps"),
        ({"steps": 2.5}, TypeError, "steps"),
        ({"restarts": 0}, ValueError, "restarts"),
        ({"step_size": -1.0}, ValueError, "step_size"),
        ({"schedule": "linear"}, ValueError, "schedule"),
        ({"loss": "hinge"}, ValueError, "loss"),
        ({"sparsity": 1.5, "norm": "l1"}, ValueError, "sparsity"),
        ({"y": torch.zeros(3, dtype=torch.long)}, ValueError, "one label per example"),
        ({"target": torch.zeros(3, dtype=torch.long)}, ValueError, "target"),
        ({"x": torch.full((2, 1, 2, 2), 1.5)}, ValueError, r"x must lie in \[0, 1\]"),
        ({"x": torch.rand(2, 1, 2, 2) * 255}, ValueError, r"\[0, 1\]"),
        ({"model": lambda x: x}, TypeError, "model"),
    ],
)
def test_pgd_rejects_bad_inputs(linear_model, kwargs, error, match):
    args = {"model": linear_model, "x": torch.rand(2, 1, 2, 2), "y": torch.zeros(2, dtype=torch.long), "eps": 0.1}
    with pytest.raises(error, match=match):
        pgd(**(args | kwargs))


def test_pgd_rejects_a_model_returning_a_dict(images):
    class DictModel(nn.Module):
        def forward(self, x):
            return {"logits": x.flatten(1)[:, :3]}

    with pytest.raises(TypeError, match="logits"):
        pgd(DictModel(), images, torch.zeros(8, dtype=torch.long), 0.1)


@pytest.mark.mnist
def test_more_steps_and_restarts_are_never_weaker(seeded, mnist):
    """Same seed: the longer run extends the shorter one and keeps each example's first success."""
    model = zoo.load("mnist_mlp")
    x, y = mnist(200)

    def broken(**kwargs):
        x_adv = pgd(model, x, y, 0.05, step_size=0.01, generator=seeded(3), **kwargs)
        return model(x_adv).argmax(dim=1) != y

    short, longer, restarted = broken(steps=5), broken(steps=15), broken(steps=5, restarts=3)
    assert (longer >= short).all() and (restarted >= short).all()
    assert longer.sum() > short.sum() and restarted.sum() > short.sum()


@pytest.mark.mnist
@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_pgd_is_at_least_as_strong_as_fgsm(seeded, mnist, eps):
    model = zoo.load("mnist_smallcnn")
    x, y = mnist(200)
    assert accuracy(model, pgd(model, x, y, eps, steps=20, generator=seeded()), y) <= accuracy(
        model, fgsm(model, x, y, eps), y)


@pytest.mark.mnist
def test_targeted_pgd_reaches_the_target_on_the_standard_cnn(seeded, mnist):
    model = zoo.load("mnist_smallcnn")
    x, y = mnist(100)
    target = (y + 1) % 10
    x_adv = pgd(model, x, y, 0.3, steps=20, target=target, generator=seeded())
    assert (model(x_adv).argmax(dim=1) == target).float().mean() > 0.9


@pytest.mark.mnist
@pytest.mark.parametrize(("name", "eps", "n", "steps"), [
    ("mnist_smallcnn", 0.1, 300, 20), ("mnist_smallcnn", 0.3, 300, 20),
    ("mnist_mlp", 0.1, 300, 40), ("mnist_mlp", 0.3, 300, 40),
])
def test_linf_pgd_matches_torchattacks(seeded, mnist, name, eps, n, steps):
    """Equal eps, step, steps and random start: robust accuracies within 1 percentage point."""
    torchattacks = pytest.importorskip("torchattacks")
    model = zoo.load(name)
    x, y = mnist(n)
    alpha = 2.5 * eps / steps
    ours = accuracy(model, pgd(model, x, y, eps, steps=steps, step_size=alpha, generator=seeded()), y)
    torch.manual_seed(0)
    theirs = accuracy(model, torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps)(x, y), y)
    assert abs(ours - theirs) <= 0.01 + 1e-6  # one point: 3 of 300 images


@pytest.mark.mnist
@pytest.mark.parametrize(("name", "eps", "random_start"), [
    ("mnist_smallcnn", 1.5, False), ("mnist_mlp", 1.5, False), ("mnist_mlp", 1.5, True),
])
def test_l2_pgd_matches_torchattacks(seeded, mnist, name, eps, random_start):
    """PGDL2 with equal settings. Random starts differ in law: ours is uniform in the ball (so
    at radius ~eps in 784 dimensions), torchattacks' radius is uniform in [0, eps]."""
    torchattacks = pytest.importorskip("torchattacks")
    model = zoo.load(name)
    x, y = mnist(300)
    ours = accuracy(model, pgd(model, x, y, eps, norm="l2", steps=20, random_start=random_start,
                               generator=seeded()), y)
    torch.manual_seed(0)
    attack = torchattacks.PGDL2(model, eps=eps, alpha=2.5 * eps / 20, steps=20, random_start=random_start)
    theirs = accuracy(model, attack(x, y), y)
    assert abs(ours - theirs) <= 0.01 + 1e-6  # one point: 3 of 300 images


@pytest.mark.mnist
def test_sparse_l1_pgd_breaks_the_standard_model(seeded, mnist):
    """SLIDE's sparse step makes L1 PGD effective where one coordinate per step would crawl."""
    model = zoo.load("mnist_mlp")
    x, y = mnist(200)
    exact = accuracy(model, pgd(model, x, y, 10.0, norm="l1", steps=20, sparsity=1.0, generator=seeded()), y)
    sparse = accuracy(model, pgd(model, x, y, 10.0, norm="l1", steps=20, generator=seeded()), y)
    assert sparse < 0.2 and sparse < exact


def test_a_model_in_train_mode_is_attacked_in_eval_mode_and_left_untouched(seeded):
    """Attacks run the model in eval mode: batch-norm statistics are neither used nor updated, and
    the caller's train mode comes back (an adversarial-training loop calls attacks mid-epoch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
    model[2].running_mean.fill_(0.3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(16, 1, 2, 2, generator=seeded(4)), torch.arange(16) % 3
    x_adv = pgd(model, x, y, 0.1, steps=3, generator=seeded())
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(x_adv, pgd(model.eval(), x, y, 0.1, steps=3, generator=seeded()))


def madry_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
               steps: int) -> torch.Tensor:
    """Madry et al.'s Linf PGD from x, written out: x <- clip(x + alpha sign(grad), ball, box)."""
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv


def test_pgd_without_early_stop_is_madrys_loop(linear_model, images):
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    out = pgd(linear_model, images, y, 0.1, steps=5, step_size=0.03, random_start=False, early_stop=False)
    assert torch.allclose(out, madry_loop(linear_model, images, y, 0.1, 0.03, 5), atol=1e-7)


def test_projected_ascent_stops_the_rows_that_are_done(linear_model, images):
    ball = LpBall("linf", 0.1)
    moved = []

    def objective(x_adv, rows):
        moved.append(len(rows))
        return linear_model(x_adv)[:, 0], rows < 4  # the first four rows are done at once

    out = projected_ascent(objective, images, ball, [0.05] * 3)
    assert moved == [8, 4, 4]
    assert torch.equal(out[:4], images[:4]) and not torch.equal(out[4:], images[4:])


def test_pgd_takes_per_example_data_for_a_loss_function(linear_model, images):
    """TRADES's use: y holds the clean probabilities, the loss their KL divergence from the iterate's."""
    p = torch.softmax(linear_model(images), dim=1).detach()
    out = pgd(linear_model, images, p, 0.1, steps=3, loss=lambda logits, q: kl_divergence(q, logits), early_stop=False,
              generator=torch.Generator().manual_seed(0))
    assert LpBall("linf", 0.1).contains(out, images).all()
    assert kl_divergence(p, linear_model(out)).mean() > 0
    with pytest.raises(ValueError, match="early_stop=False"):
        pgd(linear_model, images, p, 0.1, loss=lambda logits, q: kl_divergence(q, logits))
    with pytest.raises(ValueError, match="integer labels"):
        pgd(linear_model, images, p, 0.1, early_stop=False)
