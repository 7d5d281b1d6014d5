r"""Gradient attacks: one or more steps along the loss gradient inside the threat model.

* :func:`fgsm` -- one steepest-ascent step (Goodfellow et al. 2015);
* :func:`pgd` -- projected gradient ascent from a random start, with restarts (Madry et al. 2018);
* :func:`apgd` -- Auto-PGD: momentum, and a step size halved at checkpoints when progress stalls
  (Croce and Hein 2020), on the cross-entropy or on the :func:`dlr_loss`.

All norm-specific work (steepest step, projection, random start) is
:class:`~robustdl.threat.LpBall`'s. The iterative attacks return, per example, the first
iterate that reaches the attack's goal (any wrong label, or the target): the logits come with
the forward pass each gradient needs, so this bookkeeping costs no extra forward pass, and a
run stops early once every example has reached its goal (its result is then final).

Taught in the chapter *Adversarial attacks* (gradient-based attacks).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from robustdl._checks import check_fraction, check_labels, check_nonnegative, check_positive_int
from robustdl.attacks._core import (
    AttackOnce,
    Loss,
    best_of_restarts,
    check_inputs,
    cross_entropy,
    eval_mode,
    input_gradient,
    logits_of,
    margin,
)
from robustdl.threat import LpBall, per_example

__all__ = ["apgd", "apgd_checkpoints", "dlr_loss", "fgsm", "pgd"]

#: An attack's objective ``objective(logits, y, target) -> (N,)``: the value it maximises.
Objective = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
#: Step-size schedules of :func:`pgd`.
SCHEDULES = ("constant", "cosine")
#: The momentum weight :math:`\alpha` of APGD's update (Croce and Hein 2020, Sec. 3.1).
APGD_MOMENTUM = 0.75
#: Keeps the DLR loss finite when the top logits tie (the authors' code adds the same).
DLR_TINY = 1e-12


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str | float = "linf",
    target: Tensor | None = None,
) -> Tensor:
    r"""The Fast Gradient Sign Method of Goodfellow et al. (2015), :cite:`goodfellow2015explaining`.

    Linearise the loss around ``x`` and take one steepest-ascent step of size ``eps``
    (eq. (2) of the seed tutorial):

    .. math:: x' = \Pi_{S(x)}\big(x + \epsilon\, \mathrm{sign}(\nabla_x J(\theta, x, y))\big).

    For ``norm="l2"`` or ``"l1"`` the sign becomes that norm's steepest step
    (:meth:`~robustdl.threat.LpBall.step`), the "fast gradient method". With ``target``
    the step descends the loss of the target class instead:
    :math:`x' = x - \epsilon\,\mathrm{sign}(\nabla_x J(\theta, x, t))`.

    Args:
        model: a classifier returning logits, taking images in [0, 1].
        x: clean images in [0, 1], shape (N, ...).
        y: true labels, shape (N,); ignored when ``target`` is given.
        eps: the radius of the threat model.
        norm: ``"linf"`` (FGSM proper), ``"l2"`` or ``"l1"``.
        target: target labels for a targeted attack, shape (N,).

    Returns:
        New adversarial images, detached, in the ball and in [0, 1].

    Taught in the chapter *Introduction*.
    """
    check_inputs(model, x, y if target is None else target)
    ball = LpBall(norm, eps)
    with eval_mode(model):
        if target is None:
            direction = input_gradient(model, x, y, cross_entropy)
        else:
            direction = -input_gradient(model, x, target, cross_entropy)
    with torch.no_grad():
        return ball.project(x + ball.step(direction, eps), x)


def dlr_loss(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    r"""The Difference of Logits Ratio loss of Croce and Hein (2020), :cite:`croce2020reliable` (Sec. 4).

    With the logits sorted decreasingly, :math:`z_{\pi_1} \ge z_{\pi_2} \ge \dots`,

    .. math:: \mathrm{DLR}(z, y) = -\frac{z_y - \max_{i \ne y} z_i}{z_{\pi_1} - z_{\pi_3}},
              \qquad
              \mathrm{DLR}_t(z, y) = -\frac{z_y - z_t}{z_{\pi_1} - (z_{\pi_3} + z_{\pi_4})/2},

    the second for a ``target`` :math:`t`. Both are invariant to shifting and positively
    rescaling the logits, so a model's confident (saturated) softmax cannot hide its gradient,
    and both are positive exactly when the goal is reached. A per-example tensor (N,).
    """
    needed = 3 if target is None else 4
    if logits.dim() != 2 or logits.shape[1] < needed:
        raise ValueError(f"logits must have shape (N, C), C >= {needed}, for the DLR loss, got {tuple(logits.shape)}")
    top = logits.topk(needed, dim=1).values
    if target is None:
        return -margin(logits, y) / (top[:, 0] - top[:, 2] + DLR_TINY)
    gap = logits.gather(1, y[:, None]).squeeze(1) - logits.gather(1, target[:, None]).squeeze(1)
    return -gap / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + DLR_TINY)


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


def _objective(loss: str | Loss) -> Objective:
    """The value an attack maximises: ``loss`` of the label, or minus ``loss`` of the target."""
    if loss == "dlr":
        return dlr_loss
    if loss == "ce":
        loss = cross_entropy
    if not callable(loss):
        raise ValueError(f"loss must be 'ce', 'dlr' or a function (logits, labels) -> (N,), got {loss!r}")

    def objective(logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        return loss(logits, y) if target is None else -loss(logits, target)

    return objective


def _reached(logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    """Whether each prediction reaches the goal: any wrong label, or the target."""
    pred = logits.argmax(dim=1)
    return pred != y if target is None else pred == target


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


def _inward(grad: Tensor, x_adv: Tensor) -> Tensor:
    """The gradient without the components that push a coordinate on the box's boundary out of it.

    The projection would undo those moves; left out, the L1 and L2 steps spend their whole
    length on coordinates that can move (for Linf this changes nothing after projection).
    """
    return grad.masked_fill(torch.where(grad > 0, x_adv >= 1, x_adv <= 0), 0)


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


def _restarted(run: AttackOnce, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, restarts: int) -> Tensor:
    """``run`` once, or :func:`~robustdl.attacks._core.best_of_restarts` of several runs.

    A single run needs none of the two forward passes by which ``best_of_restarts`` compares runs.
    """
    restarts = check_positive_int(restarts, "restarts")
    return run(x, y, target) if restarts == 1 else best_of_restarts(run, model, x, y, target, restarts)


def _step_sizes(alpha: float, steps: int, schedule: str) -> list[float]:
    r"""Constant :math:`\alpha`, or cosine decay :math:`\alpha_t = \tfrac{\alpha}{2}(1 + \cos(\pi t / T))`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return [alpha] * steps
    return [alpha * (1 + math.cos(math.pi * t / steps)) / 2 for t in range(steps)]


def _check_goal(model: object, x: object, y: object, target: object) -> None:
    check_inputs(model, x, y)
    if target is not None:
        check_labels(target, x, "target")  # type: ignore[arg-type]


def _pgd_run(
    model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, *, ball: LpBall, step_sizes: list[float],
    objective: Objective, random_start: bool, sparsity: float, generator: torch.Generator | None,
    early_stop: bool,
) -> Tensor:
    """One run of PGD from one starting point: the first iterate that reaches the goal, else the last.

    Only the examples still short of their goal are differentiated and moved (all of them,
    every step, without ``early_stop``).
    """
    x_adv = ball.random(x, generator) if random_start else x.clone()
    todo = torch.arange(len(x), device=x.device)
    for alpha in step_sizes:
        goal = None if target is None else target[todo]
        logits, _, grad = _value_and_grad(model, x_adv[todo], y[todo], goal, objective)
        if early_stop:
            short = ~_reached(logits, y[todo], goal)
            todo, grad = todo[short], grad[short]
        if len(todo) == 0:  # every result is final
            break
        x_adv[todo] = ball.project(x_adv[todo] + ball.step(_inward(grad, x_adv[todo]), alpha, sparsity), x[todo])
    return x_adv


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str | float = "linf",
    steps: int = 40,
    step_size: float | None = None,
    schedule: str = "constant",
    random_start: bool = True,
    restarts: int = 1,
    target: Tensor | None = None,
    loss: str | Loss = "ce",
    sparsity: float = 0.99,
    generator: torch.Generator | None = None,
    early_stop: bool = True,
) -> Tensor:
    r"""Projected Gradient Descent of Madry et al. (2018), :cite:`madry2018towards` (Sec. 2.1).

    The inner maximisation :math:`\max_{x' \in S(x)} J(\theta, x', y)` of their saddle-point
    problem (2.1), by projected steepest ascent from a uniformly random point :math:`x_0` of the
    ball :math:`S(x)` (:meth:`~robustdl.threat.LpBall.random`):

    .. math:: x_{t+1} = \Pi_{S(x)}\big(x_t + \alpha_t\, \mathrm{step}_p(\nabla_x J(\theta, x_t, y))\big),

    where :math:`\mathrm{step}_p` is the steepest-ascent step of the norm
    (:meth:`~robustdl.threat.LpBall.step`: :math:`\mathrm{sign}` for Linf, as in the paper) and
    :math:`\Pi_{S(x)}` the projection onto the ball and the [0, 1] box. Gradient components
    pointing out of the box at coordinates on its boundary are left out of the step. For L1 the
    step is SLIDE's sparse step :cite:`tramer2019adversarial` over the top ``1 - sparsity`` of
    the coordinates. With ``target`` the attack descends the target's loss instead. The default
    step is the rule of Madry's group, :math:`\alpha = 2.5\,\epsilon / T`: the :math:`T` steps
    together travel further than across the ball, from any start.

    Each of ``restarts`` runs starts from a new random point and runs only on the examples no
    run has broken yet (:func:`~robustdl.attacks._core.best_of_restarts`); an example no run
    breaks keeps the result of highest cross-entropy.

    Args:
        model: a classifier returning logits, taking images in [0, 1].
        x: clean images in [0, 1], shape (N, ...).
        y: true labels, shape (N,).
        eps: the radius of the threat model.
        norm: ``"linf"``, ``"l2"`` or ``"l1"``.
        steps: the number of steps :math:`T` per run.
        step_size: the step :math:`\alpha` (default :math:`2.5\,\epsilon / T`).
        schedule: ``"constant"``, or ``"cosine"`` decay
            :math:`\alpha_t = \tfrac{\alpha}{2}(1 + \cos(\pi t / T))`.
        random_start: start from a random point of the ball (else from ``x``).
        restarts: the number of runs.
        target: target labels for a targeted attack, shape (N,).
        loss: ``"ce"`` (cross-entropy), ``"dlr"`` (:func:`dlr_loss`), or a per-example loss
            ``loss(logits, labels) -> (N,)``.
        sparsity: for L1, the fraction of coordinates each step leaves unchanged (0.99: SLIDE's
            99th percentile); the other norms ignore it.
        generator: the random generator of the starting points.
        early_stop: stop moving an example once it reaches the goal. False runs every example
            all :math:`T` steps, maximising the loss as the inner problem of adversarial
            training does (:func:`~robustdl.train.adversarial.pgd_at_loss`).

    Returns:
        New adversarial images, detached, in the ball and in [0, 1]: per example the first
        iterate that reaches the goal, else (or without ``early_stop``) the last iterate
        :math:`x_T` (Madry's output).

    Taught in the chapter *Adversarial attacks*.
    """
    _check_goal(model, x, y, target)
    ball = LpBall(norm, eps)
    steps = check_positive_int(steps, "steps")
    alpha = 2.5 * ball.eps / steps if step_size is None else check_nonnegative(step_size, "step_size")
    run = partial(_pgd_run, model, ball=ball, step_sizes=_step_sizes(alpha, steps, schedule),
                  objective=_objective(loss), random_start=random_start,
                  sparsity=check_fraction(sparsity, "sparsity"), generator=generator, early_stop=early_stop)
    with eval_mode(model), torch.no_grad():
        return _restarted(run, model, x.detach(), y, target, restarts)


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
        better = best.record(x_k, f_k, _reached(logits, y, target))
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
        z = ball.project(x_k + per_example(control.eta, x) * ball.step(_inward(grad, x_k), 1.0), x)
        x_prev, x_k = x_k, ball.project(x_k + momentum * (z - x_k) + (1 - momentum) * (x_k - x_prev), x)
        f_prev = f_k
    else:  # the last iterate, which no gradient step evaluated
        with torch.no_grad():
            logits = model(x_k)
        best.record(x_k, objective(logits, y, target), _reached(logits, y, target))
    return best.otherwise(best.x_max)


def apgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
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
    (Condition 2). :math:`f` is the cross-entropy or the :func:`dlr_loss` (with ``target``:
    minus the target's cross-entropy, or the targeted DLR loss, as APGD-T). Every quantity is
    per example; the steepest step and the projection are
    :class:`~robustdl.threat.LpBall`'s, with gradient components pointing out of the box at
    its boundary left out.

    Args:
        model: a classifier returning logits, taking images in [0, 1].
        x: clean images in [0, 1], shape (N, ...).
        y: true labels, shape (N,).
        eps: the radius of the threat model.
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
    ball = LpBall(norm, eps)
    if ball.name not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2' for apgd (the paper's norms), got {norm!r}")
    run = partial(_apgd_run, model, ball=ball, steps=check_positive_int(steps, "steps"), objective=_objective(loss),
                  rho=check_fraction(rho, "rho"), generator=generator)
    with eval_mode(model), torch.no_grad():
        return _restarted(run, model, x.detach(), y, target, restarts)
