r"""Projected steepest ascent: the loop inside PGD, and inside every objective that climbs in a ball.

Madry et al. (2018), :cite:`madry2018towards` (Sec. 2.1), solve the inner maximisation
:math:`\max_{x' \in S(x)} f(x')` by the update

.. math:: x_{t+1} = \Pi_{S(x)}\big(x_t + \alpha_t\, \mathrm{step}_p(\nabla f(x_t))\big),

:math:`\mathrm{step}_p` the norm's steepest-ascent step (:math:`\mathrm{sign}` for Linf) and
:math:`\Pi_{S(x)}` the projection onto the ball and the [0, 1] box, both
:class:`~robustdl.threat.LpBall`'s.

* :func:`ascent_step` -- one update, given the gradient;
* :func:`projected_ascent` -- the loop: the gradient of an objective and the update, until
  the step sizes run out or every example is done.

:func:`~robustdl.attacks.gradient.pgd`, feature scattering
(:func:`~robustdl.train.feature_scattering.feature_scattering_attack`), YOPO's inner steps
(:class:`~robustdl.train.adversarial.YOPO`) and coverage-guided test generation
(:func:`~robustdl.verify.testgen.generate_tests`) run :func:`projected_ascent`; free adversarial
training (:class:`~robustdl.train.adversarial.FreeAT`) takes :func:`ascent_step` with the input
gradient its weight update already computed.

Taught in the chapter *Adversarial attacks* (gradient-based attacks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from robustdl.threat import LpBall

__all__ = ["AscentObjective", "ascent_step", "inward", "projected_ascent"]

#: What :func:`projected_ascent` climbs: ``objective(x_adv, rows) -> (value, done)`` at the iterates
#: ``x_adv`` of the examples ``rows`` of ``x``. The gradient is that of ``value.sum()`` (a scalar, or
#: one value per example); ``done`` (bool, one per row, or ``None``) marks the rows whose iterate
#: is final, which are neither moved again nor differentiated.
AscentObjective = Callable[[Tensor, Tensor], tuple[Tensor, "Tensor | None"]]


def inward(grad: Tensor, x_adv: Tensor) -> Tensor:
    """The gradient without the components that push a coordinate on the box's boundary out of it.

    The projection would undo those moves; left out, the L1 and L2 steps spend their whole
    length on coordinates that can move. (For Linf the projection undoes them exactly, so the
    step is the same either way.)
    """
    return grad.masked_fill(torch.where(grad > 0, x_adv >= 1, x_adv <= 0), 0)


def ascent_step(x_adv: Tensor, x: Tensor, grad: Tensor, ball: LpBall, alpha: float, sparsity: float = 1.0) -> Tensor:
    r"""One projected steepest-ascent step, :math:`\Pi_{S(x)}\big(x' + \alpha\, \mathrm{step}_p(g)\big)`.

    Madry et al.'s update :cite:`madry2018towards` for the iterate :math:`x'` = ``x_adv`` of
    the clean ``x``, with the gradient :math:`g` = ``grad``; for Linf
    :math:`\mathrm{clip}_{[x - \epsilon, x + \epsilon] \cap [0, 1]}(x' + \alpha\,\mathrm{sign}(g))`.
    ``sparsity`` is that of the L1 step (:meth:`~robustdl.threat.LpBall.step`).
    """
    return ball.project(x_adv + ball.step(grad, alpha, sparsity), x)


def projected_ascent(
    objective: AscentObjective,
    x: Tensor,
    ball: LpBall,
    step_sizes: Iterable[float],
    start: Tensor | None = None,
    sparsity: float = 1.0,
    box_inward: bool = False,
) -> Tensor:
    r"""Projected steepest ascent of Madry et al. (2018), :cite:`madry2018towards` (Sec. 2.1), per example.

    From ``start`` (default ``x``), one :func:`ascent_step` per step size :math:`\alpha_t`:

    .. math:: x_{t+1} = \Pi_{S(x)}\big(x_t + \alpha_t\, \mathrm{step}_p(\nabla f(x_t))\big).

    Each step differentiates only the rows still moving; a row the ``objective`` reports done
    keeps its iterate, and the loop ends early once every row is done. With ``box_inward`` the
    gradient's components pointing out of the box at its boundary are left out of the step
    (:func:`inward`). Returns the final iterates, detached.
    """
    x = x.detach()
    x_adv = (x if start is None else start).detach().clone()
    rows = torch.arange(len(x), device=x.device)
    for alpha in step_sizes:
        with torch.enable_grad():
            x_t = x_adv[rows].requires_grad_(True)
            value, done = objective(x_t, rows)
            (grad,) = torch.autograd.grad(value.sum(), x_t)
        if done is not None:
            rows, grad = rows[~done], grad[~done]
        if len(rows) == 0:  # every iterate is final
            break
        x_t = x_adv[rows]
        x_adv[rows] = ascent_step(x_t, x[rows], inward(grad, x_t) if box_inward else grad, ball, alpha, sparsity)
    return x_adv
