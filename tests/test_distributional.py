"""Distributional robustness objectives (WRM, VAT, feature scattering, ATLD) on tiny synthetic data."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from robustdl.data import gaussian_clusters
from robustdl.models import build_model
from robustdl.threat import LpBall
from robustdl.train import evaluate, fit, load_checkpoint, seed_everything
from robustdl.train.atld import LatentDistributionAT, latent_discriminator, latent_features
from robustdl.train.feature_scattering import (
    _feature_matching_distance,
    _smoothed_cross_entropy,
    feature_scattering_attack,
    feature_scattering_loss,
    sinkhorn,
)
from robustdl.train.vat import VAT, lds, vat_attack, vat_loss, virtual_adversarial_direction
from robustdl.train.wrm import wrm_attack, wrm_loss


def clusters_loader(seed: int = 0, shuffle: bool = True, n: int = 400) -> DataLoader:
    return DataLoader(gaussian_clusters(n, classes=3, seed=seed), batch_size=50, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))


def small_mlp() -> nn.Module:
    return build_model("mlp", "points", hidden=(32,), classes=3)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(clusters_loader(seed, shuffle=False)))


def atld(eps: float = 0.1, **kwargs: object) -> LatentDistributionAT:
    discriminator = latent_discriminator(3, hidden=(32,))
    return LatentDistributionAT(discriminator, torch.optim.Adam(discriminator.parameters(), lr=1e-3), eps, **kwargs)


OBJECTIVES = {
    "wrm": lambda: functools.partial(wrm_loss, gamma=50.0, steps=5),
    "vat": lambda: functools.partial(vat_loss, eps=0.1, xi=1e-3),
    "semi-supervised vat": lambda: VAT(eps=0.1, xi=1e-3, unlabelled=clusters_loader(seed=7, n=200)),
    "feature scattering": lambda: functools.partial(feature_scattering_loss, eps=0.1, label_smoothing=0.0),
    "atld": atld,
}


@pytest.mark.parametrize("name", OBJECTIVES)
def test_each_objective_trains_the_training_loss_decreases(name):
    seed_everything(0)
    model = small_mlp()
    history = fit(model, clusters_loader(), 4, torch.optim.Adam(model.parameters(), lr=0.02), OBJECTIVES[name]())
    losses = [h["train_loss"] for h in history]
    assert losses[-1] < losses[0] - 0.3
    assert evaluate(model, clusters_loader(seed=1, shuffle=False))["accuracy"] > 0.9


ATTACKS = {
    "wrm": lambda model, x, y: wrm_attack(model, x, y, gamma=2.0, steps=5),
    "vat": lambda model, x, y: vat_attack(model, x, eps=0.1, xi=1e-3),
    "feature scattering": lambda model, x, y: feature_scattering_attack(model, x, eps=0.1, steps=2),
    "atld": lambda model, x, y: atld().attack(model, x, y),
}


@pytest.mark.parametrize("name", ATTACKS)
def test_inner_maximisations_are_clean_attacks(name):
    """Detached result, inputs untouched, no gradient left on the model, train mode restored."""
    model = small_mlp().train()
    x, y = batch()
    x_before = x.clone()
    x_adv = ATTACKS[name](model, x, y)
    assert not x_adv.requires_grad and x_adv.shape == x.shape
    assert torch.equal(x, x_before) and not torch.equal(x_adv, x)
    assert model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("norm, eps", [("linf", 0.05), ("l2", 0.1)])
def test_perturbations_stay_in_the_ball_and_the_box(norm, eps):
    model = small_mlp()
    x, y = batch()
    x = torch.cat([x, torch.tensor([[0.0, 1.0], [1.0, 0.0]])])  # corners: the box binds
    y = torch.cat([y, torch.tensor([0, 1])])
    ball = LpBall(norm, eps)
    assert ball.contains(feature_scattering_attack(model, x, eps, steps=3, norm=norm), x).all()
    assert ball.contains(atld(eps, steps=3, norm=norm).attack(model, x, y), x).all()
    l2 = LpBall("l2", eps)
    x_vadv = vat_attack(model, x, eps, xi=1e-3)
    assert l2.contains(x_vadv, x).all()
    interior = ((x > eps) & (x < 1 - eps)).all(dim=1)
    assert torch.allclose(l2.norm(x_vadv - x)[interior], torch.full((int(interior.sum()),), eps), rtol=1e-4)


def test_wrm_stays_in_the_box_and_its_transport_cost_shrinks_as_gamma_grows():
    seed_everything(0)
    model = small_mlp()
    x, y = batch()
    z = wrm_attack(model, x, y, gamma=0.01, steps=5)  # cheap transport: points run to the box's faces
    assert z.min() >= 0 and z.max() <= 1 and ((z == 0) | (z == 1)).any()
    costs = [(wrm_attack(model, x, y, gamma) - x).pow(2).sum(dim=1).mean().item() for gamma in (0.5, 2, 8, 32)]
    assert all(a > b for a, b in itertools.pairwise(costs)) and costs[-1] > 0


def test_wrm_solves_its_penalised_inner_problem():
    """On a smooth network (ELUs, as Sinha et al. use) the ascent reaches the box-constrained maximiser.

    There the gradient of the penalised loss vanishes, except for components pushing out of the
    box at coordinates on its faces (the KKT conditions); gamma = 1 makes some of those.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 32), nn.ELU(), nn.Linear(32, 3)).double()
    x, y = batch()
    x, gamma = x.double(), 1.0

    def projected_gradient(z: torch.Tensor) -> torch.Tensor:
        z = z.clone().requires_grad_(True)
        phi = F.cross_entropy(model(z), y, reduction="sum") - gamma * (z - x).pow(2).sum()
        (g,) = torch.autograd.grad(phi, z)
        return g.masked_fill(torch.where(g > 0, z >= 1, z <= 0), 0)

    z = wrm_attack(model, x, y, gamma, steps=30)
    assert ((z == 0) | (z == 1)).any()
    assert projected_gradient(z).norm() < 1e-4 * projected_gradient(x).norm()


def test_wrm_with_a_huge_gamma_is_standard_training():
    seed_everything(0)
    model = small_mlp().double()
    x, y = batch()
    x = x.double()
    standard = F.cross_entropy(model(x), y)
    (g_standard,) = torch.autograd.grad(standard, model.net[-1].weight)
    robust = wrm_loss(model, x, y, gamma=1e9)
    (g_robust,) = torch.autograd.grad(robust, model.net[-1].weight)
    assert torch.allclose(robust, standard, atol=1e-8)
    assert torch.allclose(g_robust, g_standard, atol=1e-8)


def test_vat_power_iteration_finds_the_top_eigenvector_of_the_kl_hessian():
    """Against the exact Hessian of r -> KL(p(x) || p(x + r)) at r = 0, on a tiny float64 model."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x = torch.rand(1, 6, dtype=torch.float64)
    p = F.softmax(model(x), dim=1).detach()

    def kl(r: torch.Tensor) -> torch.Tensor:
        return (p * (p.log() - F.log_softmax(model(x + r), dim=1))).sum()

    hessian = torch.autograd.functional.hessian(kl, torch.zeros(1, 6, dtype=torch.float64)).reshape(6, 6)
    eigenvalues, eigenvectors = torch.linalg.eigh(hessian)
    assert eigenvalues[-1] > 1.5 * eigenvalues[-2]  # a top direction to find, but not a trivial one

    def alignment(iterations: int) -> float:
        d = virtual_adversarial_direction(model, x, xi=1e-6, iterations=iterations,
                                          generator=torch.Generator().manual_seed(1))
        assert torch.allclose(d.norm(), torch.tensor(1.0, dtype=torch.float64))
        return abs(torch.dot(d.flatten(), eigenvectors[:, -1])).item()

    assert alignment(1) < 0.9 < 0.9999 < alignment(30)


def test_lds_is_the_kl_at_the_virtual_adversarial_point_and_vanishes_at_eps_zero():
    model = small_mlp()
    x, _ = batch()
    assert lds(model, x, eps=0.0).abs() < 1e-7
    value = lds(model, x, eps=0.1, xi=1e-3, generator=torch.Generator().manual_seed(0))
    x_adv = vat_attack(model, x, eps=0.1, xi=1e-3, generator=torch.Generator().manual_seed(0))
    p = F.softmax(model(x), dim=1)
    expected = (p * (p.log() - F.log_softmax(model(x_adv), dim=1))).sum(dim=1).mean()
    assert value > 0 and torch.allclose(value, expected, atol=1e-6)


class CountingLoader:
    """An unlabelled 'loader' that counts the passes started and the batches drawn."""

    def __init__(self, batches: list) -> None:
        self.batches, self.passes, self.drawn = batches, 0, 0

    def __iter__(self):
        self.passes += 1
        for b in self.batches:
            self.drawn += 1
            yield b


def test_semi_supervised_vat_cycles_the_unlabelled_loader_and_ignores_its_labels():
    torch.manual_seed(0)
    model = small_mlp().double()
    x, y = batch()
    x = x.double()
    x_u = [batch(seed)[0] for seed in (3, 4)]  # float32: moved to x's dtype
    loader = CountingLoader([(u, torch.full((len(u),), -7)) for u in x_u])
    vat = VAT(eps=0.1, xi=1e-3, unlabelled=loader)
    for _ in range(5):
        vat(model, x, y)
    assert (loader.drawn, loader.passes) == (5, 3)

    def loss_with(labels: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)
        return VAT(eps=0.1, xi=1e-3, unlabelled=[(x_u[0], labels)])(model, x, y)

    torch.manual_seed(0)
    by_hand = F.cross_entropy(model(x), y) + lds(model, torch.cat([x, x_u[0].double()]), 0.1, xi=1e-3)
    assert torch.equal(loss_with(torch.zeros(50, dtype=torch.long)), loss_with(torch.full((50,), 99)))
    assert torch.allclose(loss_with(torch.zeros(50, dtype=torch.long)), by_hand)
    torch.manual_seed(0)
    clean = F.cross_entropy(model(x), y)  # the unlabelled images change the LDS term, a small part of the loss
    assert not torch.allclose(by_hand - clean, vat_loss(model, x, y, 0.1, xi=1e-3) - clean)


def test_sinkhorn_plan_has_uniform_marginals():
    cost = torch.rand(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plan = sinkhorn(cost, epsilon=0.05, iterations=300)
    assert (plan >= 0).all()
    assert torch.allclose(plan.sum(dim=1), torch.full((5,), 1 / 5, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(plan.sum(dim=0), torch.full((7,), 1 / 7, dtype=torch.float64), atol=1e-8)


def test_sinkhorn_concentrates_on_the_optimal_permutation():
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    cost = torch.ones(6, 6)
    cost[torch.arange(6), perm] = 0.0
    plan = sinkhorn(cost)
    assert torch.equal(plan.argmax(dim=1), perm)
    assert plan[torch.arange(6), perm].sum() > 0.99


def test_sinkhorn_cost_approaches_the_optimal_assignment():
    """With uniform square marginals optimal transport is an assignment (Birkhoff): brute force it."""
    cost = torch.rand(5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    best = min(cost[torch.arange(5), torch.tensor(p)].sum().item() / 5 for p in itertools.permutations(range(5)))
    transport = (sinkhorn(cost, epsilon=0.01, iterations=1000) * cost).sum().item()
    assert best - 1e-6 <= transport <= best + 0.01 * 2 * torch.log(torch.tensor(5.0)).item()


def test_feature_scattering_ascends_the_transport_distance_from_its_random_start():
    seed_everything(0)
    model = small_mlp()
    fit(model, clusters_loader(), 2, torch.optim.Adam(model.parameters(), lr=0.02))
    x, _ = batch()
    clean = model(x).detach()

    def distance(step_size: float) -> float:
        x_adv = feature_scattering_attack(model, x, 0.1, steps=3, step_size=step_size,
                                          generator=torch.Generator().manual_seed(0))
        return _feature_matching_distance(clean, model(x_adv)).item()

    assert distance(0.05) > 1.5 * distance(0.0)  # step 0: the random start itself


def test_label_smoothing_is_the_authors_definition():
    logits, y = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.allclose(_smoothed_cross_entropy(logits, y, 0.0), F.cross_entropy(logits, y))
    # true class 1 - delta, others delta / (C - 1): torch's smoothing with delta * C / (C - 1)
    assert torch.allclose(_smoothed_cross_entropy(logits, y, 0.5), F.cross_entropy(logits, y, label_smoothing=2 / 3))
    # With two classes, smoothing 0.5 would make the targets uniform and teach nothing: refused.
    with pytest.raises(ValueError, match="label_smoothing"):
        _smoothed_cross_entropy(logits[:, :2], y % 2, 0.5)


def test_latent_distribution_at_updates_its_discriminator_and_freezes_it_for_the_classifier():
    seed_everything(0)
    model, objective = small_mlp(), atld()
    x, y = batch()
    before = [p.detach().clone() for p in objective.discriminator.parameters()]
    loss = objective(model, x, y)
    assert any(not torch.equal(a, p) for a, p in zip(before, objective.discriminator.parameters(), strict=True))
    grads = [p.grad.clone() for p in objective.discriminator.parameters()]  # from its own step
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, objective.discriminator.parameters(), strict=True))


def test_latent_distribution_at_state_round_trips(tmp_path):
    seed_everything(0)
    model, trained = small_mlp(), atld()
    x, y = batch()
    for _ in range(3):
        trained(model, x, y)
    torch.save(trained.state_dict(), tmp_path / "state.pt")
    fresh = atld()
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for a, b in zip(trained.discriminator.parameters(), fresh.discriminator.parameters(), strict=True):
        assert torch.equal(a, b)
    moments = [s["exp_avg"] for s in fresh.discriminator_optimizer.state_dict()["state"].values()]
    assert moments and all(
        torch.equal(m, s["exp_avg"])
        for m, s in zip(moments, trained.discriminator_optimizer.state_dict()["state"].values(), strict=True))


def train_atld(epochs: int, path) -> torch.Tensor:
    seed_everything(1)
    model, objective = small_mlp(), atld()
    fit(model, clusters_loader(n=100), epochs, torch.optim.Adam(model.parameters(), lr=0.02), objective,
        checkpoint=path)
    return torch.cat([p.detach().flatten() for p in [*model.parameters(), *objective.discriminator.parameters()]])


def test_latent_distribution_at_resumes_from_a_checkpoint(tmp_path):
    uninterrupted = train_atld(3, tmp_path / "a.pt")
    train_atld(1, tmp_path / "b.pt")
    assert torch.equal(train_atld(3, tmp_path / "b.pt"), uninterrupted)
    assert "discriminator" in load_checkpoint(tmp_path / "b.pt")["objective"]


def test_latent_features_are_the_input_of_the_last_linear_layer():
    model = small_mlp().train()
    x, _ = batch()
    features = latent_features(model, x)
    assert features.shape == (50, 32) and not features.requires_grad and model.training
    model.eval()
    assert torch.allclose(model.net[-1](features), model(x))
    with pytest.raises(ValueError, match=r"nn\.Linear"):
        latent_features(nn.Sequential(nn.Flatten()), x)


def test_bad_arguments_are_named():
    model = small_mlp()
    x, y = batch()
    for gamma in (0, -1.0):
        with pytest.raises(ValueError, match="gamma"):
            wrm_loss(model, x, y, gamma=gamma)
    with pytest.raises(ValueError, match="eps"):
        vat_loss(model, x, y, eps=-0.1)
    with pytest.raises(ValueError, match="eps"):
        feature_scattering_loss(model, x, y, eps=-0.1)
    with pytest.raises(ValueError, match="eps"):
        atld(eps=-0.1)
    with pytest.raises(ValueError, match="unlabelled"):
        VAT(eps=0.1)
    with pytest.raises(ValueError, match="xi"):
        virtual_adversarial_direction(model, x, xi=0.0)
    with pytest.raises(TypeError, match="discriminator"):
        LatentDistributionAT("not a module", torch.optim.SGD(model.parameters(), lr=0.1), eps=0.1)
    with pytest.raises(TypeError, match="discriminator_optimizer"):
        LatentDistributionAT(latent_discriminator(3), None, eps=0.1)
    wrong = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="discriminator"):
        LatentDistributionAT(wrong, torch.optim.SGD(wrong.parameters(), lr=0.1), eps=0.1)(model, x, y)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(torch.rand(3, 3), epsilon=0.0)
    with pytest.raises(ValueError, match="cost"):
        sinkhorn(torch.rand(3))
    with pytest.raises(ValueError, match="label_smoothing"):
        feature_scattering_loss(model, x, y, eps=0.1, label_smoothing=0.9)
