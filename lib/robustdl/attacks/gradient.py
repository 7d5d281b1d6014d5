r"""Gradient attacks: one or more steps along the loss gradient inside the threat model.

* :func:`fgsm` -- one steepest-ascent step (Goodfellow et al. 2015);
* :func:`pgd` -- projected gradient ascent from a random start, with restarts (Madry et al. 2018).

All norm-specific work (steepest step, projection, random start) is
:class:`~robustdl.threat.LpBall`'s. :func:`pgd` returns, per example, the first
iterate that reaches the attack's goal (any wrong label, or the target): the logits come with
the forward pass each gradient needs, so this bookkeeping costs no extra forward pass, and a
run stops early once every example has reached its goal (its result is then final). Auto-PGD
is :mod:`robustdl.attacks.apgd`.

Taught in the chapter *Adversarial attacks* (gradient-based attacks).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from robustdl._checks import check_fraction, check_images, check_nonnegative, check_positive_int
from robustdl._model import check_inputs, check_model, eval_mode, logits_of
from robustdl.ascent import AscentObjective, projected_ascent
from robustdl.attacks._core import Objective, _check_goal, _objective, _restarted, input_gradient
from robustdl.losses import Loss, goal_loss, goal_reached
from robustdl.threat import LpBall, as_ball

__all__ = ["fgsm", "pgd"]

#: Step-size schedules of :func:`pgd`.
SCHEDULES = ("constant", "cosine")


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | LpBall,
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
        eps: the radius of the threat model, or the threat model itself, an
            :class:`~robustdl.threat.LpBall` (:func:`~robustdl.threat.as_ball`; then ``norm`` is left out).
        norm: ``"linf"`` (FGSM proper), ``"l2"`` or ``"l1"``.
        target: target labels for a targeted attack, shape (N,).

    Returns:
        New adversarial images, detached, in the ball and in [0, 1].

    Taught in the chapter *Introduction*.
    """
    check_inputs(model, x, y if target is None else target)
    ball = as_ball(eps, norm)
    with eval_mode(model):
        direction = input_gradient(model, x, y, lambda logits, labels: goal_loss(logits, labels, target))
    with torch.no_grad():
        return ball.project(x + ball.step(direction, ball.eps), x)


def _step_sizes(alpha: float, steps: int, schedule: str) -> list[float]:
    r"""Constant :math:`\alpha`, or cosine decay :math:`\alpha_t = \tfrac{\alpha}{2}(1 + \cos(\pi t / T))`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return [alpha] * steps
    return [alpha * (1 + math.cos(math.pi * t / steps)) / 2 for t in range(steps)]


def _goal_objective(model: nn.Module, y: Tensor, target: Tensor | None, objective: Objective,
                    early_stop: bool) -> AscentObjective:
    """PGD's objective at the iterates of the examples ``rows``; with ``early_stop``, those at their goal are done."""
    def at(x_adv: Tensor, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        goal = None if target is None else target[rows]
        logits = logits_of(model, x_adv)
        return objective(logits, y[rows], goal), goal_reached(logits, y[rows], goal) if early_stop else None
    return at


def _check_pgd_inputs(model: object, x: object, y: object, target: object, loss: object, early_stop: bool,
                      restarts: int) -> None:
    """Labels, as every attack takes; or per-example data for a ``loss`` function, which then sets no goal."""
    if not (isinstance(y, Tensor) and y.is_floating_point()):
        return _check_goal(model, x, y, target)
    check_model(model)
    check_images(x)  # type: ignore[arg-type]
    if y.shape[:1] != x.shape[:1]:  # type: ignore[union-attr]
        raise ValueError(f"y must have one row per example of x, ({len(x)}, ...), got {tuple(y.shape)}")  # type: ignore[arg-type]
    if not callable(loss) or early_stop or restarts != 1 or target is not None:
        raise ValueError("y must hold integer labels, unless loss is a function loss(logits, y) of per-example data y "
                         "with early_stop=False, restarts=1 and no target (without labels there is no goal to stop "
                         f"at or to compare runs by); got a {y.dtype} y with loss={loss!r}, early_stop={early_stop}, "
                         f"restarts={restarts}, target={'given' if target is not None else None}")
    return None


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | LpBall,
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
    ball :math:`S(x)` (:meth:`~robustdl.threat.LpBall.random`), the loop of
    :func:`~robustdl.ascent.projected_ascent`:

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
    run has broken yet (:func:`~robustdl.attacks._core.best_of`); an example no run
    breaks keeps the result of highest cross-entropy.

    Args:
        model: a classifier returning logits, taking images in [0, 1].
        x: clean images in [0, 1], shape (N, ...).
        y: true labels, shape (N,); or, for a ``loss`` function of other per-example data (TRADES's
            clean probabilities), that data, a floating tensor (N, ...). Such data sets no goal, so
            it needs ``early_stop=False``, one run and no ``target``.
        eps: the radius of the threat model, or the threat model itself, an
            :class:`~robustdl.threat.LpBall` (:func:`~robustdl.threat.as_ball`; then ``norm`` is left out).
        norm: ``"linf"``, ``"l2"`` or ``"l1"``.
        steps: the number of steps :math:`T` per run.
        step_size: the step :math:`\alpha` (default :math:`2.5\,\epsilon / T`).
        schedule: ``"constant"``, or ``"cosine"`` decay
            :math:`\alpha_t = \tfrac{\alpha}{2}(1 + \cos(\pi t / T))`.
        random_start: start from a random point of the ball (else from ``x``).
        restarts: the number of runs.
        target: target labels for a targeted attack, shape (N,).
        loss: ``"ce"`` (cross-entropy), ``"dlr"`` (:func:`~robustdl.losses.dlr_loss`), or a per-example loss
            ``loss(logits, y) -> (N,)``, given the rows of ``y`` (or ``target``) of the examples
            it is evaluated on.
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
    _check_pgd_inputs(model, x, y, target, loss, early_stop, restarts)
    ball = as_ball(eps, norm)
    steps = check_positive_int(steps, "steps")
    alpha = 2.5 * ball.eps / steps if step_size is None else check_nonnegative(step_size, "step_size")
    step_sizes, objective = _step_sizes(alpha, steps, schedule), _objective(loss)
    sparsity = check_fraction(sparsity, "sparsity")

    def run(x: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        start = ball.random(x, generator) if random_start else x
        return projected_ascent(_goal_objective(model, y, target, objective, early_stop), x, ball, step_sizes,
                                start, sparsity, box_inward=True)

    with eval_mode(model), torch.no_grad():
        return _restarted(run, model, x.detach(), y, target, restarts)
