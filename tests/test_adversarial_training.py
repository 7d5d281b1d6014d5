"""Adversarial training objectives: the points they train on, their losses, and their contracts."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from robustdl.attacks import fgsm
from robustdl.data import gaussian_clusters
from robustdl.models import build_model
from robustdl.threat import LpBall
from robustdl.train import fit, seed_everything, standard_loss
from robustdl.train.adversarial import (
    YOPO,
    CatastrophicOverfittingGuard,
    EpsilonRamp,
    FreeAT,
    fast_at_loss,
    pgd_at_loss,
    trades_loss,
)
from robustdl.train.objectives import make_objective

EPS = 0.1


def clusters(seed: int = 0, n: int = 300) -> DataLoader:
    return DataLoader(gaussian_clusters(n, classes=3, seed=seed), batch_size=50, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def small_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", "points", hidden=(32,), classes=3)


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))


OBJECTIVES = {
    "pgd_at": functools.partial(pgd_at_loss, eps=EPS, steps=5),
    "fast_at": functools.partial(fast_at_loss, eps=EPS),
    "fgsm_at": functools.partial(fast_at_loss, eps=EPS, step_size=EPS, random_start=False),
    "trades": functools.partial(trades_loss, eps=EPS, steps=5, beta=3.0),
    "ramp": EpsilonRamp(lambda eps: functools.partial(pgd_at_loss, eps=eps, steps=3), eps=EPS, warmup=5),
}


class InputRecorder:
    """Records every input the model is evaluated on."""

    def __init__(self, model: nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        model.register_forward_pre_hook(lambda _m, args: self.inputs.append(args[0].detach().clone()))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_lowers_its_loss(name):
    seed_everything(0)
    model = small_mlp()
    history = fit(model, clusters(), 8, torch.optim.Adam(model.parameters(), lr=0.02), OBJECTIVES[name])
    assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]


@pytest.mark.parametrize("name", ["pgd_at", "fast_at", "fgsm_at", "trades"])
def test_the_model_only_ever_sees_points_of_the_threat_model(name):
    model = small_mlp()
    x, y = gaussian_clusters(40, classes=3, seed=1).tensors
    recorder = InputRecorder(model)
    OBJECTIVES[name](model, x, y).backward()
    assert len(recorder.inputs) > 1
    ball = LpBall("linf", EPS)
    for seen in recorder.inputs:
        assert ball.contains(seen, x).all() and seen.min() >= 0 and seen.max() <= 1


def test_fgsm_training_without_random_start_trains_on_fgsm_points():
    model = small_mlp()
    x, y = gaussian_clusters(40, classes=3, seed=2).tensors
    recorder = InputRecorder(model)
    OBJECTIVES["fgsm_at"](model, x, y)
    torch.testing.assert_close(recorder.inputs[-1], fgsm(model, x, y, eps=EPS))


def test_pgd_training_loss_is_the_exact_worst_case_of_a_linear_model():
    """For logits Wx, max CE over the Linf ball (box inactive) is reached at a vertex PGD finds."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 0.0], [-1.0, 1.0, 0.0, 0.5]]))
    x = torch.full((3, 1, 2, 2), 0.5)
    y = torch.tensor([0, 1, 0])
    w_gap = (model[1].weight[0] - model[1].weight[1]).abs().sum()
    margin = model(x).gather(1, y[:, None]).squeeze(1) - model(x).gather(1, 1 - y[:, None]).squeeze(1)
    worst = F.softplus(-(margin - EPS * w_gap)).mean()  # CE of two classes at the reduced margin
    assert pgd_at_loss(model, x, y, eps=EPS, steps=20).item() == pytest.approx(worst.item(), rel=1e-5)
    assert pgd_at_loss(model, x, y, eps=EPS, steps=20) > standard_loss(model, x, y)


def test_trades_with_beta_zero_is_standard_training():
    model = small_mlp()
    x, y = gaussian_clusters(40, classes=3, seed=3).tensors
    trades = trades_loss(model, x, y, beta=0.0, eps=EPS)
    standard = standard_loss(model, x, y)
    assert trades.item() == pytest.approx(standard.item(), abs=1e-7)
    g_trades = torch.autograd.grad(trades, list(model.parameters()))
    g_standard = torch.autograd.grad(standard, list(model.parameters()))
    for a, b in zip(g_trades, g_standard, strict=True):
        torch.testing.assert_close(a, b)


def test_trades_regulariser_grows_with_beta_and_is_nonnegative():
    model = small_mlp()
    x, y = gaussian_clusters(40, classes=3, seed=4).tensors
    torch.manual_seed(0)
    low = trades_loss(model, x, y, beta=1.0, eps=EPS).item()
    torch.manual_seed(0)
    high = trades_loss(model, x, y, beta=10.0, eps=EPS).item()
    assert standard_loss(model, x, y).item() <= low <= high


def test_free_training_carries_its_perturbation_within_the_ball():
    seed_everything(0)
    model = small_mlp()
    free = FreeAT(eps=EPS, replays=4)
    history = fit(model, clusters(), 3, torch.optim.Adam(model.parameters(), lr=0.02), free, replays=free.replays)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert free.delta is not None and free.delta.abs().max() <= EPS + 1e-6
    assert free.delta.abs().max() > EPS / 2  # it moved: each replay adds a step of eps


def test_free_training_ascends_with_the_gradient_of_each_replay():
    model = small_mlp()
    x, y = gaussian_clusters(20, classes=3, seed=5).tensors
    free = FreeAT(eps=EPS, replays=2)
    loss = free(model, x, y)
    loss.backward()
    x_var = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x_var), y), x_var)  # at delta = 0, the first replay
    expected = LpBall("linf", EPS).project(x + EPS * grad.sign(), x) - x
    torch.testing.assert_close(free.delta, expected)
    state = free.state_dict()
    other = FreeAT(eps=EPS)
    other.load_state_dict(state)
    assert torch.equal(other.delta, free.delta)


def test_free_training_handles_a_smaller_last_batch():
    model = small_mlp()
    free = FreeAT(eps=EPS)
    x, y = gaussian_clusters(30, classes=3, seed=6).tensors
    free(model, x, y).backward()
    free(model, x[:7], y[:7]).backward()
    assert free.delta.shape == x.shape


def test_yopo_trains_and_stays_in_the_ball():
    seed_everything(0)
    model = tiny_cnn()
    x = torch.rand(60, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    y = (x.mean(dim=(1, 2, 3)) * 3).long().clamp(max=2)
    loader = DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=20)
    yopo = YOPO("0", eps=EPS, outer=3, inner=2)
    recorder = InputRecorder(model)
    history = fit(model, loader, 6, torch.optim.Adam(model.parameters(), lr=0.01), yopo)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    batch = x[:20]
    for seen in recorder.inputs[:10]:  # the first batch's passes: full ones and first-layer ones
        assert LpBall("linf", EPS).contains(seen, batch).all()


def test_yopo_inner_steps_run_only_the_first_layer():
    model = tiny_cnn()
    calls = []
    model[3].register_forward_hook(lambda *_: calls.append("last"))
    x = torch.rand(4, 1, 6, 6)
    yopo = YOPO("0", eps=EPS, outer=2, inner=5)
    yopo(model, x, torch.zeros(4, dtype=torch.long))
    assert len(calls) == 2  # one full pass per outer step; the 2 x 5 inner steps stop at layer 0


def test_yopo_rejects_an_unknown_layer():
    with pytest.raises(ValueError, match="first_layer"):
        YOPO("nope")(tiny_cnn(), torch.rand(2, 1, 6, 6), torch.zeros(2, dtype=torch.long))


def test_epsilon_ramp_grows_linearly_then_holds():
    seen = []
    ramp = EpsilonRamp(lambda eps: seen.append(eps) or standard_loss, eps=0.3, warmup=3)
    model, x, y = small_mlp(), torch.rand(4, 2), torch.zeros(4, dtype=torch.long)
    for _ in range(5):
        ramp(model, x, y)
    assert seen == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.3])
    other = EpsilonRamp(lambda eps: standard_loss, eps=0.3, warmup=3)
    other.load_state_dict(ramp.state_dict())
    assert other.current_eps() == pytest.approx(0.3)


def test_the_guard_restores_the_best_weights_when_pgd_accuracy_collapses():
    seed_everything(0)
    model = small_mlp()
    fit(model, clusters(), 10, torch.optim.Adam(model.parameters(), lr=0.02))
    x, y = gaussian_clusters(100, classes=3, seed=7).tensors
    guard = CatastrophicOverfittingGuard(x, y, eps=0.02, steps=5, drop=0.2)
    assert guard(model, {"epoch": 1}) is False
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.net[-1].bias.copy_(torch.tensor([100.0, 0.0, 0.0]))  # a constant predictor
    record = {"epoch": 2}
    assert guard(model, record) is True
    assert record["catastrophic_overfitting"] == 1 and guard.triggered_at == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, good[k])


def test_make_objective_builds_by_name():
    model, x, y = small_mlp(), torch.rand(4, 2), torch.tensor([0, 1, 2, 0])
    assert make_objective("standard") is standard_loss
    torch.manual_seed(0)
    a = make_objective("pgd_at", eps=EPS, steps=2)(model, x, y)
    torch.manual_seed(0)
    b = pgd_at_loss(model, x, y, eps=EPS, steps=2)
    assert a.item() == b.item()
    assert isinstance(make_objective("free", eps=EPS), FreeAT)
    assert isinstance(make_objective("trades", warmup=10, eps=EPS), EpsilonRamp)


@pytest.mark.parametrize(("call", "match"), [
    (lambda: make_objective("nope"), "objective name"),
    (lambda: make_objective("free", warmup=5, eps=0.1), "warmup"),
    (lambda: make_objective("standard", warmup=5), "eps"),
    (lambda: trades_loss(small_mlp(), torch.rand(2, 2), torch.zeros(2, dtype=torch.long), beta=-1.0), "beta"),
    (lambda: pgd_at_loss(small_mlp(), torch.rand(2, 2), torch.zeros(2, dtype=torch.long), eps=-0.1), "eps"),
    (lambda: fast_at_loss(small_mlp(), torch.rand(2, 2), torch.zeros(2, dtype=torch.long), eps=-0.1), "eps"),
    (lambda: FreeAT(eps=-1.0), "eps"),
    (lambda: FreeAT(eps=0.1, replays=0), "replays"),
    (lambda: EpsilonRamp(lambda e: standard_loss, eps=0.1, warmup=0), "warmup"),
    (lambda: CatastrophicOverfittingGuard(torch.rand(2, 2), torch.zeros(2, dtype=torch.long), 0.1, drop=-1), "drop"),
    (lambda: YOPO("0", outer=0), "outer"),
])
def test_bad_arguments_say_what_is_wrong(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_free_training_checks_its_inputs():
    with pytest.raises(ValueError, match="x must lie in"):
        FreeAT(eps=EPS)(small_mlp(), torch.full((2, 2), 2.0), torch.zeros(2, dtype=torch.long))
    assert math.isfinite(FreeAT(eps=EPS)(small_mlp(), torch.rand(2, 2), torch.zeros(2, dtype=torch.long)).item())
