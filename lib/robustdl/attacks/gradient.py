"""Gradient attacks: one or more steps along the loss gradient inside the threat model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustdl.attacks._core import check_inputs, cross_entropy, eval_mode, input_gradient
from robustdl.threat import LpBall

__all__ = ["fgsm"]


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
