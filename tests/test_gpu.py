"""The device and dtype table: every public function of the library, on a GPU and in float64.

Each family's table maps a case name, ``function`` or ``function[variant]``, to a :class:`Case`:
how to call the function in the tiny setting of :class:`Env` (four 3x8x8 colour images and a
small CNN; twelve 2-D points and a small MLP) and what to check of the result: its device and
dtype, those of the inputs, and one basic property (in the ball and the box, a finite loss whose
gradient reaches every parameter, bounds that hold at the input, ...).

Every case runs in two places:

* ``cpu-float64``, always: on the CPU with a float64 model and inputs, so that a float32 tensor
  made inside the library fails here, without a GPU;
* ``cuda-float32``, with the marker ``gpu`` (``pytest -m gpu``; skipped without CUDA), with CPU
  generators and CPU data loaders, as a chapter runs on Colab.

:func:`test_table_covers_every_public_name` checks that every name in the ``__all__`` of the
library's modules has a case, or a stated reason to have none (no tensor in or out), so a new
public function must join the table.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from robustdl import _random, accuracy, predict
from robustdl.ascent import ascent_step, inward, projected_ascent
from robustdl.attacks import (
    GeneralizedPerturbation,
    QueryBudgetError,
    QueryOracle,
    apgd,
    cw_l0,
    cw_l2,
    cw_linf,
    deepfool,
    fgsm,
    flow_loss,
    flow_warp,
    fooling_rate,
    guap,
    lbfgs,
    pgd,
    square,
    stadv,
    stadv_flow,
    uap,
    zoo_adam,
)
from robustdl.data import random_crop_flip
from robustdl.evaluation import autoattack_like, robust_accuracy, robustness_curve, worst_case
from robustdl.layers import (
    layer_input_shapes,
    layer_map,
    operator_norm,
    power_iteration,
    weight_correlation,
    weight_matrices,
    weighted_layers,
)
from robustdl.losses import cross_entropy, dlr_loss, goal_loss, goal_margin, goal_reached, kl_divergence, margin
from robustdl.measures import (
    average_weight_correlation,
    complexity_measures,
    correlation_term,
    generalisation_error,
    kendall_tau,
    pac_bayes,
    pac_bayes_sigma,
    robust_generalisation_error,
)
from robustdl.models import MLP, ConvSmall
from robustdl.plot import adversarial_triple, image_grid, to_image
from robustdl.reliability import (
    assess,
    cell_labels,
    cell_robust,
    cell_unastuteness,
    estimate,
    grid_cells,
    occupied_cells,
    operational_profile,
    r_separation,
)
from robustdl.threat import LpBall, as_ball
from robustdl.train import OBJECTIVES, evaluate, fit, make_objective, run_epoch, standard_loss
from robustdl.train.adversarial import YOPO, CatastrophicOverfittingGuard
from robustdl.train.atld import LatentDistributionAT, latent_discriminator, latent_features
from robustdl.train.certified import worst_case_logits
from robustdl.train.feature_scattering import feature_scattering_attack, sinkhorn
from robustdl.train.regularisers import (
    attach_parseval,
    lipschitz_penalty,
    parseval_step,
    regularised,
    spectral_normalise,
    weight_correlation_penalty,
)
from robustdl.train.scr import class_mean_shift, feature_shift, shift_consistency
from robustdl.train.vat import VAT, lds, vat_attack, virtual_adversarial_direction
from robustdl.train.wrm import wrm_attack
from robustdl.verify import (
    activation_profile,
    boundary_coverage,
    certified,
    certified_accuracy,
    certify,
    class_counts,
    clever,
    crown_bounds,
    crown_ibp_margin,
    crown_margin,
    exact_margin,
    exact_min_margin,
    generate_tests,
    ibp_margin,
    interval_bounds,
    kmultisection_coverage,
    margin_spec,
    multilevel_splitting,
    naive_monte_carlo,
    neuron_coverage,
    preactivation_bounds,
    reachability,
    safety,
    sign_sign_coverage,
    smoothed_certified_accuracy,
    smoothed_predict,
)
from robustdl.verify.bounds import input_box
from robustdl.verify.clever import clever_one
from robustdl.verify.coverage import activations
from robustdl.verify.deepgo import logit_of, probability_of
from robustdl.verify.splitting import mh_step, violation

matplotlib.use("Agg")
import matplotlib.pyplot as plt

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
PLACES = [
    pytest.param(("cpu", torch.float64), id="cpu-float64"),
    pytest.param(("cuda", torch.float32), id="cuda-float32", marks=[pytest.mark.gpu, CUDA]),
]
EPS = 0.1
IMAGE = (3, 8, 8)


# ------------------------------------------------------------------------------------------------
# The setting and the checks
# ------------------------------------------------------------------------------------------------


@dataclass
class Env:
    """Tiny models and data on one device in one dtype; CPU copies of the data for loaders."""

    model: nn.Module
    x: Tensor
    y: Tensor
    mlp: nn.Module
    points: Tensor
    labels: Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def target(self) -> Tensor:
        return (self.y + 1) % 10

    @staticmethod
    def gen(seed: int = 0) -> torch.Generator:
        """A CPU generator, whatever the device: the library must draw on it and move the numbers."""
        return torch.Generator().manual_seed(seed)

    def cpu_loader(self, batch_size: int = 2) -> DataLoader:
        """A float32 CPU loader of the images, as a chapter's data loader is."""
        return DataLoader(TensorDataset(self.x.cpu().float(), self.y.cpu()), batch_size=batch_size)

    def optimiser(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        return torch.optim.SGD((model or self.model).parameters(), lr=0.01)


def make_env(device: str, dtype: torch.dtype) -> Env:
    torch.manual_seed(0)
    model = ConvSmall(in_channels=3, classes=10, image_size=8, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    model = model.to(device, dtype).eval()
    x = torch.rand(4, *IMAGE, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    with torch.no_grad():
        y = model(x).argmax(1)
    mlp = MLP(in_features=2, hidden=(8, 8), classes=3, mean=(0.5,), std=(0.25,)).to(device, dtype).eval()
    points = torch.rand(12, 2, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    labels = (points[:, 0] > points[:, 1]).long() + (points.sum(1) > 1).long()
    return Env(model, x, y, mlp, points, labels)


@pytest.fixture(params=PLACES)
def env(request: pytest.FixtureRequest) -> Env:
    return make_env(*request.param)


def same_place(t: object, env: Env, dtype: torch.dtype | None = None) -> Tensor:
    """``t`` is a tensor on the inputs' device, of the inputs' dtype (or ``dtype``)."""
    assert isinstance(t, Tensor), f"expected a tensor, got {type(t).__name__}"
    assert t.device == env.x.device, f"device {t.device}, inputs on {env.x.device}"
    want = env.dtype if dtype is None else dtype
    assert t.dtype == want, f"dtype {t.dtype}, expected {want}"
    return t


def in_box(t: Tensor) -> bool:
    return bool(t.min() >= -1e-6 and t.max() <= 1 + 1e-6)


@dataclass(frozen=True)
class Case:
    """Call a function on an :class:`Env` (``run``) and check what it returns (``check``).

    ``covers`` names further public names the case exercises (classes it returns, helpers it calls).
    """

    run: Callable[[Env], object]
    check: Callable[[Env, object], None]
    covers: tuple[str, ...] = ()


def adversarial(ball: LpBall | None = None) -> Callable[[Env, object], None]:
    """The result is a batch of images like ``env.x``, in [0, 1], and in ``ball`` around it if given."""
    def check(env: Env, out: object) -> None:
        assert same_place(out, env).shape == env.x.shape
        assert in_box(out)
        if ball is not None:
            assert ball.contains(out, env.x).all()
    return check


def per_example() -> Callable[[Env, object], None]:
    """A finite vector of one value per image."""
    def check(env: Env, out: object) -> None:
        assert same_place(out, env).shape == (len(env.x),)
        assert torch.isfinite(out).all()
    return check


def trains(env: Env, loss: object) -> None:
    """A finite scalar loss whose gradient reaches every parameter, on their device and dtype."""
    assert same_place(loss, env).shape == () and torch.isfinite(loss)
    env.model.zero_grad(set_to_none=True)
    loss.backward()
    for name, p in env.model.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert same_place(p.grad, env).shape == p.shape and torch.isfinite(p.grad).all(), name


def placed(prop: Callable[[Env, Tensor], object] | None = None,
           dtype: torch.dtype | None = None) -> Callable[[Env, object], None]:
    """The result is a tensor on the inputs' device, of their dtype (or ``dtype``), and ``prop`` holds."""
    def check(env: Env, out: object) -> None:
        same_place(out, env, dtype)
        assert prop is None or prop(env, out), f"the property fails for {out}"
    return check


def holds(prop: Callable[[Env, object], object]) -> Callable[[Env, object], None]:
    """A result without tensors (numbers, records) of which ``prop`` holds."""
    def check(env: Env, out: object) -> None:
        assert prop(env, out), f"the property fails for {out}"
    return check


def fraction(env: Env, out: object) -> None:
    assert isinstance(out, float) and 0 <= out <= 1, out


def finite_number(env: Env, out: object) -> None:
    assert isinstance(out, float) and math.isfinite(out), out


def run_family(table: dict[str, Case], name: str, env: Env) -> None:
    case = table[name]
    case.check(env, case.run(env))


# ------------------------------------------------------------------------------------------------
# Foundations: predictions and the vocabulary of an attack's goal
# ------------------------------------------------------------------------------------------------


FOUNDATIONS: dict[str, Case] = {
    "predict[cpu-data]": Case(lambda e: predict(e.model, e.x.cpu().float()),
                              placed(lambda e, p: torch.equal(p, e.y), torch.long)),
    "predict[batches]": Case(lambda e: predict(e.model, e.x, batch_size=3),
                             placed(lambda e, p: p.shape == e.y.shape, torch.long)),
    "accuracy[cpu-data]": Case(lambda e: accuracy(e.model, e.x.cpu().float(), e.y.cpu()), holds(lambda e, a: a == 1.0)),
    "cross_entropy": Case(lambda e: cross_entropy(_logits(e), e.y), per_example()),
    "goal_loss[targeted]": Case(lambda e: goal_loss(_logits(e), e.y, e.target), per_example()),
    "dlr_loss": Case(lambda e: dlr_loss(e.model(e.x), e.y), per_example()),
    "margin": Case(lambda e: margin(_logits(e), e.y), per_example()),
    "goal_margin[targeted]": Case(lambda e: goal_margin(_logits(e), e.y, e.target), per_example()),
    "goal_reached[targeted]": Case(lambda e: goal_reached(_logits(e), e.y, e.target),
                                   placed(lambda e, r: r.shape == e.y.shape, torch.bool)),
    "kl_divergence": Case(lambda e: kl_divergence(_logits(e).roll(1, 0).softmax(dim=1), _logits(e)),
                          per_example()),
}


# ------------------------------------------------------------------------------------------------
# Threat models, attacks, evaluation
# ------------------------------------------------------------------------------------------------


def _oracle_answers(env: Env) -> Tensor:
    oracle = QueryOracle(env.model, budget=1).reset(len(env.x))
    scores = oracle(env.x)
    assert oracle.queries.tolist() == [1] * len(env.x)
    with pytest.raises(QueryBudgetError):
        oracle(env.x)
    return scores


def _check_scores(env: Env, scores: object) -> None:
    assert same_place(scores, env).shape == (len(env.x), 10)
    assert torch.allclose(scores.sum(1), torch.ones_like(scores[:, 0]))


def _check_universal(env: Env, v: object) -> None:
    assert same_place(v, env).shape == (1, *IMAGE) and LpBall("linf", EPS).norm(v).item() <= EPS + 1e-6


def _check_guap(env: Env, out: object) -> None:
    assert isinstance(out, GeneralizedPerturbation)
    assert same_place(out.flow, env).shape == (1, 2, *IMAGE[1:]) and same_place(out.delta, env).shape == (1, *IMAGE)
    adversarial()(env, out.apply(env.x))


def _check_flow(env: Env, flow: object) -> None:
    assert same_place(flow, env).shape == (len(env.x), 2, *IMAGE[1:]) and torch.isfinite(flow).all()


def _flow(env: Env) -> Tensor:
    return 0.5 * _random.normal((len(env.x), 2, *IMAGE[1:]), env.x, env.gen())


def _ball(norm: str, eps: float = EPS) -> LpBall:
    return LpBall(norm, eps)


THREAT: dict[str, Case] = {
    **{f"LpBall.random[{norm}]": Case(lambda e, norm=norm: _ball(norm).random(e.x, e.gen()), adversarial(_ball(norm)))
       for norm in ("linf", "l2", "l1")},
    **{f"LpBall.project[{norm}]": Case(lambda e, norm=norm: _ball(norm).project(e.x + 0.3 * _random.normal(
        e.x.shape, e.x, e.gen()), e.x), adversarial(_ball(norm))) for norm in ("linf", "l2", "l1")},
    **{f"LpBall.step[{norm}]": Case(lambda e, norm=norm: e.x + _ball(norm).step(_random.normal(e.x.shape, e.x, e.gen()),
                                                                                0.05), placed())
       for norm in ("linf", "l2", "l1")},
    "LpBall.project_perturbation": Case(lambda e: _ball("l2").project_perturbation(_random.normal(
        (1, *IMAGE), e.x, e.gen())), placed(lambda e, v: _ball("l2").norm(v) <= EPS + 1e-6), covers=("per_example",)),
    "LpBall.dual_norm": Case(lambda e: _ball("linf").dual_norm(e.x), per_example()),
}

ATTACKS: dict[str, Case] = {
    "fgsm": Case(lambda e: fgsm(e.model, e.x, e.y, eps=EPS), adversarial(_ball("linf"))),
    "fgsm[targeted-l2]": Case(lambda e: fgsm(e.model, e.x, e.y, eps=0.5, norm="l2", target=e.target),
                              adversarial(_ball("l2", 0.5))),
    "pgd[linf]": Case(lambda e: pgd(e.model, e.x, e.y, eps=EPS, steps=3, restarts=2, generator=e.gen()),
                      adversarial(_ball("linf"))),
    "pgd[l2]": Case(lambda e: pgd(e.model, e.x, e.y, eps=0.5, norm="l2", steps=3, generator=e.gen()),
                    adversarial(_ball("l2", 0.5))),
    "pgd[l1]": Case(lambda e: pgd(e.model, e.x, e.y, eps=2.0, norm="l1", steps=3, generator=e.gen()),
                    adversarial(_ball("l1", 2.0))),
    "pgd[targeted-cosine]": Case(lambda e: pgd(e.model, e.x, e.y, eps=EPS, steps=3, schedule="cosine", target=e.target,
                                               generator=e.gen()), adversarial(_ball("linf"))),
    "apgd[ce]": Case(lambda e: apgd(e.model, e.x, e.y, eps=EPS, steps=5, generator=e.gen()),
                     adversarial(_ball("linf"))),
    "apgd[dlr-l2]": Case(lambda e: apgd(e.model, e.x, e.y, eps=0.5, norm="l2", steps=5, loss="dlr", restarts=2,
                                        generator=e.gen()), adversarial(_ball("l2", 0.5))),
    "apgd[targeted-dlr]": Case(lambda e: apgd(e.model, e.x, e.y, eps=EPS, steps=5, loss="dlr", target=e.target,
                                              generator=e.gen()), adversarial(_ball("linf"))),
    "projected_ascent": Case(lambda e: projected_ascent(lambda x, rows: (e.model(x)[:, 0], None), e.x, _ball("l2", 0.5),
                                                        [0.2, 0.1], start=_ball("l2", 0.5).random(e.x, e.gen())),
                             adversarial(_ball("l2", 0.5)), covers=("inward",)),
    "ascent_step": Case(lambda e: ascent_step(e.x, e.x, torch.randn(e.x.shape, generator=e.gen()).to(e.x),
                                              _ball("linf"), EPS), adversarial(_ball("linf"))),
    "inward": Case(lambda e: inward(torch.ones_like(e.x), e.x.clamp(0.2, 1)), adversarial()),
    "cw_l2": Case(lambda e: cw_l2(e.model, e.x, e.y, steps=5, lr=0.1, binary_search_steps=2), adversarial()),
    "cw_l2[targeted]": Case(lambda e: cw_l2(e.model, e.x, e.y, target=e.target, steps=5, lr=0.1, binary_search_steps=2),
                            adversarial()),
    "cw_linf": Case(lambda e: cw_linf(e.model, e.x, e.y, steps=5, c_init=0.5, c_max=2.0, tau_decrease=0.5,
                                      tau_min=0.1), adversarial()),
    "cw_l0": Case(lambda e: cw_l0(e.model, e.x, e.y, steps=5, lr=0.1, c_init=0.5, c_max=2.0, pixels_per_round=32),
                  adversarial()),
    "lbfgs": Case(lambda e: lbfgs(e.model, e.x, e.y, search_steps=2, max_iter=5), adversarial()),
    "deepfool": Case(lambda e: deepfool(e.model, e.x, e.y, steps=3), adversarial()),
    "stadv": Case(lambda e: stadv(e.model, e.x, e.y, steps=3), adversarial()),
    "stadv_flow": Case(lambda e: stadv_flow(e.model, e.x, e.y, target=e.target, steps=3), _check_flow),
    "flow_warp": Case(lambda e: flow_warp(e.x, _flow(e)), adversarial()),
    "flow_loss": Case(lambda e: flow_loss(_flow(e)), per_example()),
    "zoo_adam": Case(lambda e: zoo_adam(e.model, e.x, e.y, steps=2, batch_coordinates=8, generator=e.gen()),
                     adversarial()),
    "zoo_adam[targeted-oracle]": Case(lambda e: zoo_adam(QueryOracle(e.model, budget=40), e.x, e.y, target=e.target,
                                                         steps=3, batch_coordinates=8, generator=e.gen()),
                                      adversarial()),
    "square[linf-oracle]": Case(lambda e: square(QueryOracle(e.model, budget=20), e.x, e.y, eps=EPS, queries=20,
                                                 generator=e.gen()), adversarial(_ball("linf"))),
    "square[l2-targeted]": Case(lambda e: square(e.model, e.x, e.y, eps=0.5, norm="l2", queries=20, target=e.target,
                                                 generator=e.gen()), adversarial(_ball("l2", 0.5))),
    "QueryOracle": Case(_oracle_answers, _check_scores, covers=("QueryBudgetError",)),
    "uap": Case(lambda e: uap(e.model, e.x, eps=EPS, max_passes=1, deepfool_steps=2, generator=e.gen()),
                _check_universal),
    "guap": Case(lambda e: guap(e.model, e.x, eps=EPS, tau=5.0, epochs=1, batch_size=2, generator=e.gen()), _check_guap,
                 covers=("GeneralizedPerturbation",)),
    "fooling_rate": Case(lambda e: fooling_rate(e.model, e.x, fgsm(e.model, e.x, e.y, eps=EPS)), fraction),
}

EVALUATION: dict[str, Case] = {
    "robust_accuracy[cpu-data]": Case(lambda e: robust_accuracy(e.model, (e.x.cpu(), e.y.cpu()),
                                                                functools.partial(fgsm, eps=EPS), batch_size=3),
                                      fraction),
    "robustness_curve": Case(lambda e: robustness_curve(e.model, (e.x, e.y), lambda eps: functools.partial(
        pgd, eps=eps, steps=2), [0.0, EPS]), holds(lambda e, out: len(out) == 2 and all(0 <= v <= 1 for v in out))),
    "worst_case": Case(lambda e: worst_case(e.model, e.x, e.y, [functools.partial(fgsm, eps=EPS),
                                                                functools.partial(pgd, eps=EPS, steps=2)]),
                       adversarial(_ball("linf"))),
    "autoattack_like": Case(lambda e: autoattack_like(e.model, e.x, e.y, eps=EPS, steps=3, targets=2,
                                                      generator=e.gen()), adversarial(_ball("linf"))),
}


# ------------------------------------------------------------------------------------------------
# Training: objectives, the loop, regularisers
# ------------------------------------------------------------------------------------------------

#: Tiny arguments for every objective of make_objective.
OBJECTIVE_ARGS: dict[str, dict[str, object]] = {
    "standard": {},
    "pgd_at": {"eps": EPS, "steps": 2},
    "fast_at": {"eps": EPS},
    "n_fgsm": {"eps": EPS},
    "gradalign": {"eps": EPS},
    "trades": {"eps": EPS, "steps": 2},
    "wrm": {"gamma": 1.0, "steps": 2},
    "vat": {"eps": 0.5},
    "feature_scattering": {"eps": EPS},
    "ibp": {"eps": 0.01},
    "crown_ibp": {"eps": 0.01, "beta": 0.5},
    "at_scr": {"eps": EPS, "steps": 2},
    "free": {"eps": EPS, "replays": 2},
    "gaussian_noise": {"sigma": 0.25},
}


def _objective_case(name: str) -> Case:
    covers = (OBJECTIVES[name].__name__,) if name in OBJECTIVES else ("FreeAT",)
    return Case(lambda e: make_objective(name, **OBJECTIVE_ARGS[name])(e.model, e.x, e.y), trains, covers=covers)


def _vat_semi_supervised(env: Env) -> Tensor:
    unlabelled = DataLoader(TensorDataset(env.x.cpu().float()), batch_size=2)  # CPU float32, moved by VAT
    return VAT(eps=0.5, unlabelled=unlabelled)(env.model, env.x, env.y)


def _atld(env: Env) -> Tensor:
    discriminator = latent_discriminator(10, hidden=(16,)).to(env.x.device, env.dtype)
    game = LatentDistributionAT(discriminator, torch.optim.SGD(discriminator.parameters(), lr=0.01), eps=EPS)
    return game(env.model, env.x, env.y)


def _guard(env: Env) -> dict[str, float]:
    guard = CatastrophicOverfittingGuard(env.x.cpu(), env.y.cpu(), eps=EPS, steps=2)  # CPU batch, moved to the model
    record: dict[str, float] = {"epoch": 1}
    assert guard(env.model, record) is False
    return record


def _spectral(env: Env) -> Tensor:
    model = spectral_normalise(copy.deepcopy(env.model).train(), IMAGE)
    for layer in weighted_layers(model):
        same_place(layer.parametrizations.weight[0].v, env)
    return model(env.x)


def _parseval(env: Env) -> nn.Module:
    optimiser = env.optimiser()
    attach_parseval(optimiser, env.model, beta=1e-3)
    trains(env, standard_loss(env.model, env.x, env.y))
    optimiser.step()
    parseval_step(env.model)
    return env.model


def _check_parameters(env: Env, model: object) -> None:
    for p in model.parameters():
        assert same_place(p, env) is not None and torch.isfinite(p).all()


def _fit(env: Env) -> list[dict[str, float]]:
    """A float32 CPU loader into a model on another device or dtype."""
    return fit(env.model, env.cpu_loader(), 1, env.optimiser(), test_loader=env.cpu_loader())


def _fit_resumed(env: Env) -> list[dict[str, float]]:
    """Free AT checkpointed (its perturbation saved on the CPU) and resumed on the model's device."""
    free = make_objective("free", eps=EPS, replays=2)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.pt"
        fit(env.model, env.cpu_loader(), 1, env.optimiser(), free, replays=2, checkpoint=path)
        history = fit(env.model, env.cpu_loader(), 2, env.optimiser(), free, replays=2, checkpoint=path)
    same_place(free.delta, env)
    return history


def _check_history(env: Env, history: object) -> None:
    assert isinstance(history, list) and all(math.isfinite(r["train_loss"]) for r in history)
    _check_parameters(env, env.model)


def _check_logits(env: Env, out: object) -> None:
    assert same_place(out, env).shape == (len(env.x), 10) and torch.isfinite(out).all()


TRAINING: dict[str, Case] = {
    **{f"make_objective[{name}]": _objective_case(name) for name in OBJECTIVE_ARGS},
    "make_objective[warmup]": Case(lambda e: make_objective("pgd_at", warmup=2, eps=EPS, steps=2)(e.model, e.x, e.y),
                                   trains, covers=("EpsilonRamp",)),
    "YOPO": Case(lambda e: YOPO("net.1", eps=EPS, outer=2, inner=2)(e.model, e.x, e.y), trains),
    "VAT[semi-supervised-cpu-loader]": Case(_vat_semi_supervised, trains),
    "LatentDistributionAT": Case(_atld, trains, covers=("latent_discriminator",)),
    "CatastrophicOverfittingGuard": Case(_guard, holds(lambda e, r: 0 <= r["guard_pgd_accuracy"] <= 1)),
    "standard_loss": Case(lambda e: standard_loss(e.model, e.x, e.y), trains),
    "regularised[lipschitz]": Case(lambda e: regularised(standard_loss, lipschitz_penalty, 0.1)(e.model, e.x, e.y),
                                   trains, covers=("lipschitz_penalty",)),
    "weight_correlation_penalty": Case(lambda e: standard_loss(e.model, e.x, e.y)
                                       + weight_correlation_penalty(e.model, e.x, e.y), trains),
    "spectral_normalise": Case(_spectral, _check_logits, covers=("SpectralNorm",)),
    "attach_parseval": Case(_parseval, _check_parameters, covers=("parseval_step",)),
    "worst_case_logits": Case(lambda e: worst_case_logits(e.model, e.x, e.y, 0.01), _check_logits),
    "feature_shift": Case(lambda e: feature_shift(e.model, e.x, fgsm(e.model, e.x, e.y, eps=EPS)), _check_logits),
    "class_mean_shift": Case(lambda e: class_mean_shift(e.model(e.x), e.y, 10),
                             placed(lambda e, m: m.shape == (10, 10))),
    "shift_consistency": Case(lambda e: shift_consistency(e.model(e.x), e.y) + standard_loss(e.model, e.x, e.y),
                              trains),
    "wrm_attack": Case(lambda e: wrm_attack(e.model, e.x, e.y, gamma=1.0, steps=2), adversarial()),
    "virtual_adversarial_direction": Case(
        lambda e: virtual_adversarial_direction(e.model, e.x, xi=1e-3, generator=e.gen()),
        placed(lambda e, d: torch.allclose(d.flatten(1).norm(dim=1), d.new_ones(len(d))))),
    "vat_attack": Case(lambda e: vat_attack(e.model, e.x, eps=0.5, generator=e.gen()), adversarial(_ball("l2", 0.5))),
    "lds": Case(lambda e: lds(e.model, e.x, eps=0.5, generator=e.gen()) + standard_loss(e.model, e.x, e.y), trains),
    "feature_scattering_attack": Case(lambda e: feature_scattering_attack(e.model, e.x, eps=EPS, generator=e.gen()),
                                      adversarial(_ball("linf"))),
    "sinkhorn": Case(lambda e: sinkhorn(torch.cdist(e.points[:5], e.points)),
                     placed(lambda e, plan: torch.allclose(plan.sum(0), plan.new_full((12,), 1 / 12)))),
    "latent_features": Case(lambda e: latent_features(e.model, e.x), placed(lambda e, f: f.shape == (len(e.x), 100))),
    "run_epoch": Case(lambda e: run_epoch(e.model, e.cpu_loader(), standard_loss, e.optimiser()), finite_number),
    "evaluate[cpu-loader]": Case(lambda e: evaluate(e.model, e.cpu_loader(), functools.partial(fgsm, eps=EPS)),
                                 holds(lambda e, r: 0 <= r["accuracy"] <= 1)),
    "fit[cpu-loader]": Case(_fit, _check_history),
    "fit[checkpoint-free]": Case(_fit_resumed, _check_history, covers=("save_checkpoint", "load_checkpoint")),
    "random_crop_flip": Case(lambda e: random_crop_flip(e.x, padding=2, generator=e.gen()), adversarial()),
}


# ------------------------------------------------------------------------------------------------
# Verification: bounds, exact margins, statistics, coverage, test generation
# ------------------------------------------------------------------------------------------------


def _bounds_hold(values: Callable[[Env], Tensor]) -> Callable[[Env, object], None]:
    """``(lower, upper)`` in order, and around ``values(env)``, the quantity at the clean input."""
    def check(env: Env, out: object) -> None:
        lower, upper = out
        at_x = values(env)
        assert same_place(lower, env).shape == same_place(upper, env).shape == at_x.shape
        assert (lower <= at_x + 1e-6).all() and (at_x <= upper + 1e-6).all()
    return check


def _logits(env: Env) -> Tensor:
    with torch.no_grad():
        return env.model(env.x)


def _margins(env: Env) -> Tensor:
    logits = _logits(env)
    others = torch.arange(10, device=env.x.device) != env.y[:, None]
    return logits.gather(1, env.y[:, None]) - logits[others].view(-1, 9)


def _spec(env: Env) -> Tensor:
    return margin_spec(env.y, 10)


def _margin_lower(env: Env, out: object) -> None:
    assert same_place(out, env).shape == (len(env.x), 9) and (out <= _margins(env) + 1e-6).all()


def _check_relu_bounds(env: Env, out: object) -> None:
    assert len(out) == 3
    for lower, upper in out:
        assert (same_place(lower, env) <= same_place(upper, env)).all()


def _check_certified(env: Env, out: object) -> None:
    assert same_place(out, env, torch.bool).shape == (len(env.x),)


def _check_spec(env: Env, spec: object) -> None:
    assert isinstance(spec, Tensor) and spec.device == env.x.device and spec.shape == (len(env.x), 9, 10)


def _exact(env: Env) -> object:
    return exact_margin(env.mlp, env.points[:1], env.labels[:1], 0.05)


def _check_exact(env: Env, result: object) -> None:
    assert same_place(result.margins, env, torch.float64).shape == (2,)
    assert same_place(result.inputs, env).shape == (2, 2) and in_box(result.inputs)
    assert result.classes.device == env.x.device


def _check_clever(env: Env, scores: object) -> None:
    assert same_place(scores, env).shape == (2,) and ((scores >= 0) & (scores <= 0.5)).all()


def _reachability(env: Env) -> tuple[float, float]:
    return reachability(env.model, env.x[:1], [0, 1], 0.1, probability_of(0), tol=0.05, max_evals=5)


def _check_reach(env: Env, out: object) -> None:
    lower, upper = out
    assert isinstance(lower, float) and lower <= upper


def _check_safety(env: Env, result: object) -> None:
    assert result.status in ("safe", "unsafe", "unknown") and result.lower <= result.upper
    witness = same_place(result.witness, env)
    assert witness.shape == (1, *IMAGE) and _ball("linf", 0.05).contains(witness, env.x[:1]).all()


def _check_splitting(env: Env, result: object) -> None:
    assert result.log_prob <= 0 and result.evaluations > 0


def _check_activations(env: Env, act: object) -> None:
    assert len(act.post) == len(act.pre) == 3
    for t in (*act.post, *act.pre, act.logits):
        same_place(t, env)


def _check_profile(env: Env, profile: object) -> None:
    assert (same_place(profile.low, env) <= same_place(profile.high, env)).all()


def _coverage(shape: tuple[int, ...]) -> Callable[[Env, object], None]:
    def check(env: Env, cov: object) -> None:
        assert same_place(cov.mask, env, torch.bool).shape == shape and 0 <= cov.ratio <= 1
    return check


def _neurons(env: Env) -> int:
    return sum(t.shape[1] for t in activations(env.model, env.x[:1]).post)


def _check_ss(env: Env, coverages: object) -> None:
    assert len(coverages) == 2
    for cov in coverages:
        assert same_place(cov.mask, env, torch.bool).dim() == 2


def _check_tests(env: Env, report: object) -> None:
    assert same_place(report.inputs, env).shape[1:] == IMAGE and in_box(report.inputs)
    assert same_place(report.failures, env).shape[1:] == IMAGE
    assert report.labels.device == env.x.device and report.coverage_after.covered >= report.coverage_before.covered


def _mh_step(env: Env) -> tuple[Tensor, Tensor, Tensor]:
    """One Metropolis-Hastings move of the twelve points, each in the 0.2-box around itself, above the level -inf."""
    lo, hi = (env.points - 0.2).clamp(0, 1), (env.points + 0.2).clamp(0, 1)
    s = violation(env.mlp, env.points, env.labels)
    width = torch.full_like(s, 0.05)
    return mh_step(env.mlp, env.points, s, env.labels, -math.inf, width, lo, hi, env.gen())


def _check_mh_step(env: Env, out: object) -> None:
    z, s, accepted = out
    assert same_place(z, env).shape == env.points.shape and ((z - env.points).abs() <= 0.2 + 1e-9).all()
    assert torch.allclose(same_place(s, env), violation(env.mlp, z, env.labels))
    assert same_place(accepted, env, torch.bool).shape == (len(env.points),)

def assert_counts(counts: Tensor, examples: int, n: int) -> None:
    assert counts.shape == (examples, 10) and (counts.sum(1) == n).all()


def _check_certify(env: Env, cert: object) -> None:
    same_place(cert.prediction, env, torch.int64)
    assert (same_place(cert.radius, env, torch.float64) >= 0).all()
    assert ((same_place(cert.p_lower, env, torch.float64) > 0.5) == (cert.prediction >= 0)).all()


VERIFY: dict[str, Case] = {
    "input_box": Case(lambda e: input_box(e.x, EPS), _bounds_hold(lambda e: e.x)),
    "interval_bounds": Case(lambda e: interval_bounds(e.model, e.x, EPS), _bounds_hold(_logits)),
    "interval_bounds[spec]": Case(lambda e: interval_bounds(e.model, e.x, EPS, spec=_spec(e)), _bounds_hold(_margins),
                                  covers=("margin_spec",)),
    "crown_bounds": Case(lambda e: crown_bounds(e.model, e.x, EPS), _bounds_hold(_logits),
                         covers=("BoundOp", "BoundLinear", "BoundConv2d", "BoundReLU", "BoundFlatten", "BoundNormalize",
                                 "layers", "operators", "Patches", "inner")),
    "as_ball": Case(lambda e: as_ball(EPS).box(e.x), _bounds_hold(lambda e: e.x)),
    "crown_bounds[ibp-spec]": Case(lambda e: crown_bounds(e.model, e.x, EPS, spec=_spec(e), intermediate="ibp"),
                                   _bounds_hold(_margins)),
    "margin_spec": Case(_spec, _check_spec),
    "ibp_margin": Case(lambda e: ibp_margin(e.model, e.x, e.y, EPS), _margin_lower),
    "crown_margin": Case(lambda e: crown_margin(e.model, e.x, e.y, EPS), _margin_lower),
    "crown_ibp_margin": Case(lambda e: crown_ibp_margin(e.model, e.x, e.y, EPS, beta=0.5), _margin_lower),
    "preactivation_bounds": Case(lambda e: preactivation_bounds(e.model, e.x, EPS), _check_relu_bounds),
    "certified": Case(lambda e: certified(e.model, e.x, e.y, 0.001), _check_certified),
    "certified_accuracy[ibp]": Case(lambda e: certified_accuracy(e.model, e.x, e.y, 0.001, bound=ibp_margin,
                                                                 batch_size=3), fraction),
    "exact_margin": Case(_exact, _check_exact, covers=("MarginResult",)),
    "exact_min_margin": Case(lambda e: exact_min_margin(e.mlp, e.points[:1], e.labels[:1], 0.05), finite_number),
    "clever": Case(lambda e: clever(e.model, e.x[:2], e.y[:2], eps=0.5, batches=3, samples_per_batch=8,
                                    generator=e.gen()), _check_clever, covers=("reverse_weibull_location",)),
    "reachability": Case(_reachability, _check_reach, covers=("minimise", "Bounds", "probability_of")),
    "reachability[logit]": Case(lambda e: reachability(e.model, e.x[:1], [5], 0.1, logit_of(3), tol=0.05,
                                                       lipschitz=100.0, max_evals=5), _check_reach,
                                covers=("logit_of",)),
    "safety": Case(lambda e: safety(e.model, e.x[:1], [0, 7], 0.05, tol=0.1, max_evals=4), _check_safety,
                   covers=("SafetyResult", "oplus")),
    "violation": Case(lambda e: violation(e.model, e.x, e.y), per_example()),
    "clever_one": Case(lambda e: clever_one(e.model, e.x[:1], int(e.y[0]), [int(e.target[0])], _ball("l2", 0.5), 2, 8,
                                            e.gen()), holds(lambda e, score: 0 <= score <= 0.5)),
    "mh_step": Case(_mh_step, _check_mh_step),
    "naive_monte_carlo": Case(lambda e: naive_monte_carlo(e.mlp, e.points[:1], e.labels[:1], 0.3, samples=64,
                                                          batch_size=32, generator=e.gen()),
                              holds(lambda e, r: 0 <= r.hits <= r.samples == 64),
                              covers=("MonteCarloResult",)),
    "multilevel_splitting": Case(lambda e: multilevel_splitting(e.mlp, e.points[:1], e.labels[:1], 0.3, particles=32,
                                                                quantile=0.5, mh_steps=2, generator=e.gen()),
                                 _check_splitting, covers=("SplittingResult",)),
    "activations": Case(lambda e: activations(e.model, e.x), _check_activations, covers=("Activations",)),
    "activation_profile": Case(lambda e: activation_profile(e.model, e.x, batch_size=3), _check_profile,
                               covers=("ActivationProfile",)),
    "neuron_coverage": Case(lambda e: neuron_coverage(e.model, e.x, 0.25), lambda e, c: _coverage((_neurons(e),))(e, c),
                            covers=("Coverage",)),
    "kmultisection_coverage": Case(lambda e: kmultisection_coverage(e.model, e.x, activation_profile(e.model, e.x), 4),
                                   lambda e, c: _coverage((_neurons(e), 4))(e, c)),
    "boundary_coverage": Case(lambda e: boundary_coverage(e.model, e.x[:2], activation_profile(e.model, e.x[2:])),
                              lambda e, c: _coverage((2, _neurons(e)))(e, c)),
    "sign_sign_coverage": Case(lambda e: sign_sign_coverage(e.model, e.x, chunk=2), _check_ss),
    "class_counts": Case(lambda e: class_counts(e.model, e.x, 0.25, 10, batch_size=4, generator=e.gen()),
                         lambda e, c: assert_counts(same_place(c, e, torch.int64), len(e.x), 10)),
    "smoothed_predict": Case(lambda e: smoothed_predict(e.model, e.x, 0.25, 10, batch_size=4, generator=e.gen()),
                             holds(lambda e, p: same_place(p, e, torch.int64).shape == (len(e.x),)),
                             covers=("binomial_test_half",)),
    "certify": Case(lambda e: certify(e.model, e.x, 0.25, n0=4, n=10, batch_size=4, generator=e.gen()), _check_certify,
                    covers=("Certificate", "clopper_pearson_lower", "certified_radius")),
    "smoothed_certified_accuracy": Case(lambda e: smoothed_certified_accuracy(
        certify(e.model, e.x, 0.25, n0=4, n=10, generator=e.gen()), e.y, 0.1), fraction),
    "generate_tests": Case(lambda e: generate_tests(e.model, e.x, e.y, eps=EPS, budget=4, steps=2, generator=e.gen()),
                           _check_tests, covers=("TestReport", "neuron_targets")),
}


# ------------------------------------------------------------------------------------------------
# Measures, reliability, plots
# ------------------------------------------------------------------------------------------------


def _init_model(env: Env) -> nn.Module:
    model = copy.deepcopy(env.model)
    for layer in weighted_layers(model):
        layer.reset_parameters()
    return model


def _check_measures(env: Env, out: object) -> None:
    assert set(out) >= {"PFN", "PSN", "NoP", "SoSP", "PB", "PBC", "WC", "sigma"}
    assert all(math.isfinite(v) for v in out.values()), out


def _check_weights(env: Env, out: object) -> None:
    assert len(out) == 4 and all(same_place(w, env).dim() == 2 for w in out)


def _power(env: Env) -> tuple[Tensor, Tensor]:
    layer = weighted_layers(env.model)[0]
    return power_iteration(layer_map(layer), _random.normal((1, *IMAGE), env.x, env.gen()), 5)


def _check_power(env: Env, out: object) -> None:
    sigma, v = out
    assert same_place(sigma, env).shape == () and same_place(v, env).shape == (1, *IMAGE) and sigma > 0


MEASURES: dict[str, Case] = {
    "weighted_layers": Case(lambda e: weight_matrices(e.model), _check_weights, covers=("weight_matrices",)),
    "weight_correlation": Case(lambda e: weight_correlation(weighted_layers(e.model)[0].weight),
                               placed(lambda e, rho: 0 <= rho <= 1)),
    "average_weight_correlation": Case(lambda e: average_weight_correlation(e.model), fraction),
    "power_iteration": Case(_power, _check_power, covers=("layer_map",)),
    "operator_norm[conv]": Case(lambda e: operator_norm(weighted_layers(e.model)[0], IMAGE, iters=5), finite_number),
    "layer_input_shapes": Case(lambda e: layer_input_shapes(e.model, IMAGE),
                               holds(lambda e, s: s[weighted_layers(e.model)[0]] == IMAGE)),
    "pac_bayes_sigma": Case(lambda e: pac_bayes_sigma(e.model, (e.x, e.y), samples=1, bisections=2), finite_number),
    "pac_bayes": Case(lambda e: pac_bayes(e.model, _init_model(e), 0.1), finite_number),
    "correlation_term": Case(lambda e: correlation_term(weighted_layers(e.model)[2].weight), finite_number),
    "complexity_measures": Case(lambda e: complexity_measures(e.model, _init_model(e), (e.x, e.y), IMAGE, sigma=0.1),
                                _check_measures),
    "generalisation_error[cpu-data]": Case(lambda e: generalisation_error(e.model, (e.x[:2].cpu(), e.y[:2].cpu()),
                                                                          (e.x[2:].cpu(), e.y[2:].cpu())),
                                           finite_number),
    "robust_generalisation_error[cpu-data]": Case(lambda e: robust_generalisation_error(
        e.model, (e.x[:2].cpu(), e.y[:2].cpu()), (e.x[2:].cpu(), e.y[2:].cpu()), functools.partial(fgsm, eps=EPS)),
        finite_number),
    "kendall_tau[tensors]": Case(lambda e: kendall_tau(e.points[:, 0], e.points[:, 0] + e.points[:, 1]).tau,
                                 holds(lambda e, tau: -1 <= tau <= 1),
                                 covers=("KendallTau",)),
}


def _cells(env: Env) -> object:
    return grid_cells(0.0, 1.0, 3, dtype=env.dtype, device=env.x.device)


def _check_cells(env: Env, cells: object) -> None:
    assert same_place(cells.centres, env).shape == (len(cells), 2)
    points = same_place(cells.sample(5, env.gen()), env)
    assert points.shape == (len(cells), 5, 2) and ((points - cells.centres[:, None]).abs() <= cells.radius + 1e-9).all()
    moved = cells.subset(torch.tensor([0, 2])).to("cpu", torch.float32)
    assert moved.centres.device.type == "cpu" and moved.centres.dtype == torch.float32 and len(moved) == 2


def _labelled_cells(env: Env) -> tuple[object, Tensor]:
    cells = _cells(env)
    return cells, cell_labels(cells, env.points, env.labels)


def _unastuteness(env: Env) -> tuple[Tensor, Tensor]:
    cells, labels = _labelled_cells(env)
    return cell_unastuteness(env.mlp, cells, labels, samples=8, generator=env.gen())


def _check_lam(env: Env, out: object) -> None:
    lam, var = out
    assert same_place(lam, env).shape == same_place(var, env).shape == (9,)
    assert ((lam >= 0) & (lam <= 1) & (var >= 0)).all()


def _robust(method: str) -> Callable[[Env], Tensor]:
    def run(env: Env) -> Tensor:
        cells, labels = _labelled_cells(env)
        return cell_robust(env.mlp, cells, labels, method=method, steps=2)
    return run


def _profile(env: Env) -> object:
    return operational_profile(_cells(env), env.points, bandwidth=0.2)


def _check_profile_op(env: Env, profile: object) -> None:
    assert same_place(profile.op, env).shape == same_place(profile.var, env).shape == (9,)
    assert abs(profile.op.sum().item() - 1) < 1e-5


def _assess(env: Env) -> object:
    cells = _cells(env)
    profile = operational_profile(cells, env.points, bandwidth=0.2)
    return assess(env.mlp, cells, profile, env.points, env.labels, env.points, env.labels, samples=8,
                  generator=env.gen())


def _check_report(env: Env, report: object) -> None:
    _check_lam(env, (report.lam, report.lam_var))
    assert 0 <= report.estimate.mean <= report.estimate.upper and 0 <= report.train_error <= 1


RELIABILITY: dict[str, Case] = {
    "grid_cells": Case(_cells, _check_cells, covers=("Cells",)),
    "occupied_cells": Case(lambda e: occupied_cells(e.points, 0.2), _check_cells),
    "cell_labels": Case(lambda e: _labelled_cells(e)[1], placed(lambda e, lab: lab.shape == (9,), torch.long)),
    "operational_profile": Case(_profile, _check_profile_op, covers=("OperationalProfile",)),
    "cell_unastuteness": Case(_unastuteness, _check_lam),
    "cell_robust[attack]": Case(_robust("attack"), placed(lambda e, r: r.shape == (9,), torch.bool)),
    "cell_robust[verify]": Case(_robust("verify"), placed(lambda e, r: r.shape == (9,), torch.bool)),
    "estimate": Case(lambda e: estimate(_profile(e).op, _unastuteness(e)[0], _profile(e).var, _unastuteness(e)[1]),
                     holds(lambda e, est: 0 <= est.mean <= est.upper),
                     covers=("ReliabilityEstimate",)),
    "assess": Case(_assess, _check_report, covers=("ReliabilityReport",)),
    "r_separation": Case(lambda e: r_separation(e.points, e.labels), finite_number),
}


def _figures(env: Env) -> list[object]:
    x_adv = fgsm(env.model, env.x, env.y, eps=EPS)
    with torch.no_grad():
        predictions = env.model(x_adv).argmax(1)
    return [image_grid(x_adv, env.y, predictions), adversarial_triple(env.model, env.x[:1], x_adv[:1])]


def _check_figures(env: Env, figures: object) -> None:
    assert all(isinstance(f, matplotlib.figure.Figure) for f in figures)
    for f in figures:
        plt.close(f)


PLOTS: dict[str, Case] = {
    "to_image": Case(lambda e: to_image(e.x[0]), holds(lambda e, a: a.shape == (8, 8, 3))),
    "image_grid": Case(_figures, _check_figures, covers=("adversarial_triple",)),
}

FAMILIES = {"foundations": FOUNDATIONS, "threat": THREAT, "attacks": ATTACKS,
            "evaluation": EVALUATION, "training": TRAINING, "verify": VERIFY,
            "measures": MEASURES, "reliability": RELIABILITY, "plots": PLOTS}


@pytest.mark.parametrize("name", FOUNDATIONS)
def test_foundations(env: Env, name: str) -> None:
    run_family(FOUNDATIONS, name, env)


@pytest.mark.parametrize("name", THREAT)
def test_threat(env: Env, name: str) -> None:
    run_family(THREAT, name, env)


@pytest.mark.parametrize("name", ATTACKS)
def test_attacks(env: Env, name: str) -> None:
    run_family(ATTACKS, name, env)


@pytest.mark.parametrize("name", EVALUATION)
def test_evaluation(env: Env, name: str) -> None:
    run_family(EVALUATION, name, env)


@pytest.mark.parametrize("name", TRAINING)
def test_training(env: Env, name: str) -> None:
    run_family(TRAINING, name, env)


@pytest.mark.parametrize("name", VERIFY)
def test_verify(env: Env, name: str) -> None:
    run_family(VERIFY, name, env)


@pytest.mark.parametrize("name", MEASURES)
def test_measures(env: Env, name: str) -> None:
    run_family(MEASURES, name, env)


@pytest.mark.parametrize("name", RELIABILITY)
def test_reliability(env: Env, name: str) -> None:
    run_family(RELIABILITY, name, env)


@pytest.mark.parametrize("name", PLOTS)
def test_plots(env: Env, name: str) -> None:
    run_family(PLOTS, name, env)


# ------------------------------------------------------------------------------------------------
# Coverage of the table, and the generator rule
# ------------------------------------------------------------------------------------------------

#: The modules whose ``__all__`` the table must cover.
MODULES = [
    "robustdl", "robustdl.losses", "robustdl.layers", "robustdl.threat", "robustdl.attacks",
    "robustdl.ascent", "robustdl.attacks.gradient", "robustdl.attacks.apgd", "robustdl.attacks.oracle",
    "robustdl.attacks.zoo_attack", "robustdl.attacks.square_attack", "robustdl.attacks.lbfgs", "robustdl.attacks.cw",
    "robustdl.attacks.spatial", "robustdl.attacks.universal", "robustdl.evaluation",
    "robustdl.train", "robustdl.train.adversarial", "robustdl.train.wrm", "robustdl.train.vat",
    "robustdl.train.feature_scattering", "robustdl.train.atld", "robustdl.train.regularisers",
    "robustdl.train.certified", "robustdl.train.scr", "robustdl.verify", "robustdl.verify.bounds",
    "robustdl.verify.operators", "robustdl.verify.patches", "robustdl.verify.milp", "robustdl.verify.clever",
    "robustdl.verify.deepgo", "robustdl.verify.splitting", "robustdl.verify.smoothing", "robustdl.train.noise",
    "robustdl.verify.coverage", "robustdl.verify.testgen", "robustdl.measures", "robustdl.reliability",
    "robustdl.data", "robustdl.plot",
]

#: Public names with no case, and why: none takes or returns a tensor that could be misplaced.
NO_TENSORS = {
    "device": "chooses a device by name",
    "seed_everything": "seeds the generators",
    "parse_norm": "parses a norm's name",
    "apgd_checkpoints": "integer arithmetic",
    "square_fraction": "float arithmetic",
    "sawtooth_minima": "NumPy arithmetic (DeepGO's saw-tooth)",
    "search_1d": "a NumPy search of one variable",
    "Level": "the NumPy record of search_1d",
    "Program": "builds a SciPy program from NumPy arrays",
    "OBJECTIVES": "the dict of objectives; each has a make_objective case",
    "Attack": "a type alias",
    "Loss": "a type alias",
    "AscentObjective": "a type alias",
    "Callback": "a type alias",
    "Objective": "a type alias",
    "Penalty": "a type alias",
    "EMPTY": "a constant",
    "ABSTAIN": "a constant",
    "CROSS": "a constant",
    "CLASS_NAMES": "class names",
    "DATASETS": "dataset names",
    "class_names": "class names",
    "data_root": "a folder",
    "load_dataset": "reads CPU tensors from disk",
    "loader": "a CPU DataLoader",
    "two_moons": "builds CPU points",
    "gaussian_clusters": "builds CPU points",
    "accuracy_curve": "plots numbers",
    "slider": "shows figures",
}


def _covered() -> set[str]:
    names = set()
    for table in FAMILIES.values():
        for key, case in table.items():
            names.add(key.split("[")[0].split(".")[0])
            names.update(case.covers)
    return names


def test_table_covers_every_public_name() -> None:
    covered = _covered() | set(NO_TENSORS)
    missing = {module: sorted(set(importlib.import_module(module).__all__) - covered) for module in MODULES}
    missing = {module: names for module, names in missing.items() if names}
    assert not missing, f"public names without a case in tests/test_gpu.py (add one, or a reason): {missing}"


def test_every_objective_has_a_case() -> None:
    assert set(OBJECTIVE_ARGS) == set(OBJECTIVES) | {"free"}


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_a_seed_gives_the_same_random_start_in_float32_and_float64(norm: str) -> None:
    """Draws are made on the generator's device in float32 and then cast: one seed, one start."""
    x = torch.rand(3, *IMAGE, generator=torch.Generator().manual_seed(5))
    ball = LpBall(norm, 0.3)
    start32 = ball.random(x, torch.Generator().manual_seed(0))
    start64 = ball.random(x.double(), torch.Generator().manual_seed(0))
    assert start32.dtype == torch.float32 and start64.dtype == torch.float64
    torch.testing.assert_close(start64.float(), start32, rtol=0, atol=1e-6)
    assert not torch.equal(start32, ball.random(x, torch.Generator().manual_seed(1)))


def test_float32_draws_are_those_of_torch_on_the_cpu() -> None:
    """On the CPU in float32 the helper adds nothing: the numbers of ``torch.rand(..., generator=g)``."""
    like = torch.empty(0)
    assert torch.equal(_random.uniform((5, 7), like, torch.Generator().manual_seed(3)),
                       torch.rand(5, 7, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(_random.normal((5, 7), like, torch.Generator().manual_seed(3)),
                       torch.randn(5, 7, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(_random.integers(0, 9, (20,), like.device, torch.Generator().manual_seed(3)),
                       torch.randint(0, 9, (20,), generator=torch.Generator().manual_seed(3)))


def test_uniform_stays_below_one_in_half_precision() -> None:
    u = _random.uniform((200_000,), torch.empty(0, dtype=torch.float16), torch.Generator().manual_seed(0))
    assert u.dtype == torch.float16 and u.max() < 1 and u.min() >= 0


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_a_cpu_generator_gives_the_same_start_on_cpu_and_cuda(norm: str) -> None:
    x = torch.rand(3, *IMAGE, generator=torch.Generator().manual_seed(5))
    ball = LpBall(norm, 0.3)
    on_cpu = ball.random(x, torch.Generator().manual_seed(0))
    on_cuda = ball.random(x.cuda(), torch.Generator().manual_seed(0))
    assert on_cuda.is_cuda
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=0, atol=1e-6)


@pytest.mark.gpu
@CUDA
def test_pgd_with_a_cpu_generator_matches_on_cpu_and_cuda() -> None:
    """The same seeded attack from the same start: equal up to float differences in the model."""
    env_cpu, env_cuda = make_env("cpu", torch.float32), make_env("cuda", torch.float32)
    on_cpu = pgd(env_cpu.model, env_cpu.x, env_cpu.y, eps=EPS, steps=1, step_size=0.0, generator=env_cpu.gen())
    on_cuda = pgd(env_cuda.model, env_cuda.x, env_cuda.y, eps=EPS, steps=1, step_size=0.0, generator=env_cuda.gen())
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=0, atol=1e-6)


def test_cuda_placements_are_in_the_table() -> None:
    """The CUDA column exists and is marked ``gpu``, so ``pytest -m gpu`` runs every case there."""
    cuda = [p for p in PLACES if p.id == "cuda-float32"]
    assert len(cuda) == 1 and any(m.name == "gpu" for m in cuda[0].marks)


def test_a_float64_model_takes_a_float32_loader() -> None:
    """The loop casts floating batches to the model's dtype (a model without a Normalize layer to promote them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 3)).double()
    data = DataLoader(TensorDataset(torch.rand(6, 2, 2, 2), torch.arange(6) % 3), batch_size=4)
    history = fit(model, data, 1, torch.optim.SGD(model.parameters(), lr=0.1), test_loader=data)
    assert math.isfinite(history[0]["train_loss"]) and 0 <= history[0]["test_accuracy"] <= 1
    assert all(p.dtype == torch.float64 for p in model.parameters())


@pytest.mark.gpu
@CUDA
def test_fit_resumed_on_cuda_reproduces_the_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PGD-AT's random starts draw from the CUDA generator, whose state the checkpoint keeps."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # no atomics: equal runs, equal signs
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)

    def trained(split: bool) -> list[Tensor]:
        env = make_env("cuda", torch.float32)
        objective = make_objective("pgd_at", eps=EPS, steps=2)
        torch.manual_seed(0)
        if split:
            fit(env.model, env.cpu_loader(), 1, env.optimiser(), objective, checkpoint=tmp_path / "run.pt")
            env = make_env("cuda", torch.float32)  # a new process: a fresh model, other random states,
            torch.manual_seed(123)  # all restored from the checkpoint
        fit(env.model, env.cpu_loader(), 2, env.optimiser(), objective,
            checkpoint=tmp_path / "run.pt" if split else None)
        return [p.detach().cpu() for p in env.model.parameters()]

    for whole, resumed in zip(trained(False), trained(True), strict=True):
        torch.testing.assert_close(resumed, whole, rtol=1e-5, atol=1e-6)
