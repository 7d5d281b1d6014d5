r"""Auto-PGD: PGD with momentum, and a step size halved at checkpoints when progress stalls.

:func:`apgd` is the Auto-PGD of Croce and Hein (2020), on the cross-entropy or on the
:func:`~robustdl.losses.dlr_loss`, with its checkpoints :func:`apgd_checkpoints`. All
norm-specific work (steepest step, projection, random start) is
:class:`~robustdl.threat.LpBall`'s. APGD returns, per example, the first iterate that reaches
the attack's goal (any wrong label, or the target): the logits come with the forward pass each
gradient needs, so this bookkeeping costs no extra forward pass, and a run stops early once
every example has reached its goal (its result is then final).

Taught in the chapter *Adversarial attacks* (gradient-based attacks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from robustdl._checks import check_fraction, check_positive_int
from robustdl._model import eval_mode, logits_of
from robustdl.ascent import inward
from robustdl.attacks._core import Objective, _check_goal, _objective, _restarted
from robustdl.losses import Loss, goal_reached
from robustdl.threat import LpBall, as_ball, per_example

__all__ = ["apgd", "apgd_checkpoints"]

#: The momentum weight :math:`\alpha` of APGD's update (Croce and Hein 2020, Sec. 3.1).
APGD_MOMENTUM = 0.75


def apgd_checkpoints(steps: int) -> list[int]:
    r"""APGD's checkpoints :math:`w_j = \lceil p_j N \rceil` for :math:`N` = ``steps`` (Sec. 3.2).

    :math:`p_0 = 0`, :math:`p_1 = 0.22`, :math:`p_{j+1} = p_j + \max(p_j - p_{j-1} - 0.03,\ 0.06)`,
    while :math:`p_j \le 1`: the intervals shrink from 22% of the budget to 6%. Returns the
    distinct :math:`w_j < N` in increasing order, ``[0, 22, 41, 57, 70, 80, 87, 93, 99]`` for 100.
    """
    steps = check_positive_int(steps, "steps")
    p = [0, 22]  # in hundredths, to keep the arithmetic exact
    while (following := p[-1] + max(p[-1] - p[-2] - 3, 6)) <= 100:
        p.append(following)
    return sorted({-(-q * steps // 100) for q in p} - {steps})


def _value_and_grad(
    model: nn.Module, x_adv: Tensor, y: Tensor, target: Tensor | None, objective: Objective
) -> tuple[Tensor, Tensor, Tensor]:
    """Logits, per-example objective and its input gradient at ``x_adv``: one forward, one backward."""
    with torch.enable_grad():
        x_adv = x_adv.detach().requires_grad_(True)
        logits = logits_of(model, x_adv)
        value = objective(logits, y, target)
        (grad,) = torch.autograd.grad(value.sum(), x_adv)
    return logits.detach(), value.detach(), grad


@dataclass
class _FirstHit:
    """Per example, the first iterate that reached the attack's goal."""

    x_hit: Tensor
    hit: Tensor

    @classmethod
    def start(cls, x: Tensor) -> _FirstHit:
        return cls(x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device))

    def update(self, x_adv: Tensor, reached: Tensor) -> None:
        self.x_hit = torch.where(per_example(reached & ~self.hit, x_adv), x_adv, self.x_hit)
        self.hit = self.hit | reached

    def otherwise(self, x_adv: Tensor) -> Tensor:
        """The first hit where there is one, else ``x_adv``."""
        return torch.where(per_example(self.hit, x_adv), self.x_hit, x_adv)


@dataclass
class _Best(_FirstHit):
    """Per example, the first iterate that reached the goal and the iterate of highest objective."""

    x_max: Tensor
    f_max: Tensor

    @classmethod
    def start(cls, x: Tensor) -> _Best:
        f_max = torch.full((len(x),), -math.inf, dtype=x.dtype, device=x.device)
        return cls(x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device), x.clone(), f_max)

    def record(self, x_adv: Tensor, value: Tensor, reached: Tensor) -> Tensor:
        """Record the iterate ``x_adv``; returns where it raised the best objective."""
        self.update(x_adv, reached)
        better = value > self.f_max
        self.x_max = torch.where(per_example(better, x_adv), x_adv, self.x_max)
        self.f_max = torch.where(better, value, self.f_max)
        return better


@dataclass
class _StepSizeControl:
    """APGD's per-example step size :math:`\\eta` and what its checkpoints compare (Sec. 3.2)."""

    eta: Tensor
    rho: float
    eta_at_check: Tensor
    f_max_at_check: Tensor
    successes: Tensor
    last_check: int = 0

    @classmethod
    def start(cls, eta: float, f_max: Tensor, rho: float) -> _StepSizeControl:
        eta_t = torch.full_like(f_max, eta)
        return cls(eta_t, rho, eta_t, f_max, torch.zeros_like(f_max))

    def halve(self, k: int, f_max: Tensor) -> Tensor:
        r"""At checkpoint :math:`w_j = k`: halve :math:`\eta` where Condition 1 or 2 holds; returns where.

        1. fewer than :math:`\rho\,(w_j - w_{j-1})` of the steps since :math:`w_{j-1}` raised the loss;
        2. :math:`\eta` and :math:`f_{\max}` are both unchanged since :math:`w_{j-1}`.
        """
        too_few = self.successes < self.rho * (k - self.last_check)
        stalled = (self.eta == self.eta_at_check) & (f_max <= self.f_max_at_check)
        halve = too_few | stalled
        self.eta_at_check, self.f_max_at_check = self.eta, f_max.clone()
        self.eta = torch.where(halve, self.eta / 2, self.eta)
        self.successes = torch.zeros_like(self.successes)
        self.last_check = k
        return halve


def _apgd_run(
    model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, *, ball: LpBall, steps: int,
    objective: Objective, rho: float, generator: torch.Generator | None,
) -> Tensor:
    """One run of APGD (Algorithm 1 of Croce and Hein 2020) from a random point of the ball."""
    checkpoints = set(apgd_checkpoints(steps))
    x_k = ball.random(x, generator)
    x_prev, best, grad_max = x_k, _Best.start(x), torch.zeros_like(x)
    control = _StepSizeControl.start(2 * ball.eps, best.f_max, rho)
    f_prev = best.f_max  # the checkpoint w_0 = 0 discards the first comparison with it
    for k in range(steps):
        logits, f_k, grad = _value_and_grad(model, x_k, y, target, objective)
        better = best.record(x_k, f_k, goal_reached(logits, y, target))
        if best.hit.all():  # every result is final
            break
        grad_max = torch.where(per_example(better, grad), grad, grad_max)
        control.successes += f_k > f_prev
        if k in checkpoints:
            restart = control.halve(k, best.f_max)
            x_k = torch.where(per_example(restart, x), best.x_max, x_k)
            grad = torch.where(per_example(restart, x), grad_max, grad)
            f_k = torch.where(restart, best.f_max, f_k)
        momentum = 1.0 if k == 0 else APGD_MOMENTUM
        z = ball.project(x_k + per_example(control.eta, x) * ball.step(inward(grad, x_k), 1.0), x)
        x_prev, x_k = x_k, ball.project(x_k + momentum * (z - x_k) + (1 - momentum) * (x_k - x_prev), x)
        f_prev = f_k
    else:  # the last iterate, which no gradient step evaluated
        with torch.no_grad():
            logits = model(x_k)
        best.record(x_k, objective(logits, y, target), goal_reached(logits, y, target))
    return best.otherwise(best.x_max)


def apgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | LpBall,
    norm: str | float = "linf",
    steps: int = 100,
    loss: str | Loss = "ce",
    restarts: int = 1,
    target: Tensor | None = None,
    rho: float = 0.75,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Auto-PGD of Croce and Hein (2020), :cite:`croce2020reliable` (Sec. 3, Algorithm 1).

    PGD with momentum and a step size that needs no tuning. From a random point :math:`x^{(0)}`
    of the ball, with :math:`x^{(1)} = z^{(1)}`,

    .. math::
        z^{(k+1)} &= \Pi_S\big(x^{(k)} + \eta^{(k)}\,\mathrm{step}_p(\nabla f(x^{(k)}))\big), \\
        x^{(k+1)} &= \Pi_S\big(x^{(k)} + \alpha\,(z^{(k+1)} - x^{(k)}) + (1 - \alpha)(x^{(k)} - x^{(k-1)})\big),

    with :math:`\alpha = 0.75` and :math:`\eta^{(0)} = 2\epsilon`. At the checkpoints
    :math:`w_j` (:func:`apgd_checkpoints`) the step size of an example is halved, and its
    iterate moved back to its best point :math:`x_{\max}`, when fewer than a fraction
    :math:`\rho` of the steps since the previous checkpoint raised its loss (Condition 1),
    or when neither :math:`\eta` nor the best loss :math:`f_{\max}` changed since then
    (Condition 2). :math:`f` is the cross-entropy or the :func:`~robustdl.losses.dlr_loss` (with ``target``:
    minus the target's cross-entropy, or the targeted DLR loss, as APGD-T). Every quantity is
    per example; the steepest step and the projection are
    :class:`~robustdl.threat.LpBall`'s, with gradient components pointing out of the box at
    its boundary left out.

    Args:
        model: a classifier returning logits, taking images in [0, 1].
        x: clean images in [0, 1], shape (N, ...).
        y: true labels, shape (N,).
        eps: the radius of the threat model, or the threat model itself, an
            :class:`~robustdl.threat.LpBall` (:func:`~robustdl.threat.as_ball`; then ``norm`` is left out).
        norm: ``"linf"`` or ``"l2"``, the paper's norms.
        steps: the iteration budget :math:`N_{\text{iter}}` per run.
        loss: ``"ce"``, ``"dlr"``, or a per-example loss ``loss(logits, labels) -> (N,)``.
        restarts: the number of runs, each from a new random point, on the examples not yet broken.
        target: target labels for a targeted attack, shape (N,).
        rho: the fraction :math:`\rho` of Condition 1.
        generator: the random generator of the starting points.

    Returns:
        New adversarial images, detached, in the ball and in [0, 1]: per example the first
        iterate that reaches the goal, else the iterate of highest loss.

    Taught in the chapter *Adversarial attacks*.
    """
    _check_goal(model, x, y, target)
    ball = as_ball(eps, norm)
    if ball.name not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2' for apgd (the paper's norms), got {norm!r}")
    run = partial(_apgd_run, model, ball=ball, steps=check_positive_int(steps, "steps"), objective=_objective(loss),
                  rho=check_fraction(rho, "rho"), generator=generator)
    with eval_mode(model), torch.no_grad():
        return _restarted(run, model, x.detach(), y, target, restarts)
