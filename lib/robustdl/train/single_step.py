r"""Single-step adversarial training that does not overfit catastrophically.

FGSM training, even from a random start (:func:`~robustdl.train.adversarial.fast_at_loss`),
can suddenly lose all robustness to multi-step attacks at large radii: *catastrophic
overfitting* (Wong et al. 2020). Two cures keep the cost at one or two gradients per step:

* :func:`n_fgsm_loss` -- N-FGSM (de Jorge et al. 2022): stronger noise, a step of
  :math:`\epsilon`, and no projection back onto the ball;
* :func:`gradalign_loss` -- GradAlign (Andriushchenko and Flammarion 2020): FGSM plus a
  regulariser that keeps the input gradient aligned across the ball, so that the loss is
  close to linear there and the single step finds its maximum.

Taught in the chapter *Adversarial training*.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustdl._checks import check_nonnegative
from robustdl._model import eval_mode
from robustdl.threat import LpBall, as_ball
from robustdl.train.distributed import unwrap

__all__ = ["gradalign_loss", "gradient_alignment", "input_gradient", "n_fgsm_loss"]


def input_gradient(model: nn.Module, x: Tensor, y: Tensor, create_graph: bool = False) -> Tensor:
    r""":math:`\nabla_x L(f(x), y)`, the gradient of the summed cross-entropy with respect to the input.

    With ``create_graph`` the gradient is itself differentiable in the parameters (double
    backpropagation, as GradAlign needs); otherwise it is detached.
    """
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x, create_graph=create_graph)
    return grad


def n_fgsm_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | LpBall = 0.3,
    noise: float = 2.0,
    step_size: float | None = None,
    clip: float | None = None,
    norm: str | float = "linf",
) -> Tensor:
    r"""N-FGSM, de Jorge et al. (2022), :cite:`dejorge2022make` (Algorithm 1).

    One FGSM step of size :math:`\alpha` from a noisy point :math:`x + \eta`,
    :math:`\eta \sim U(-k\epsilon, k\epsilon)^d`, and *no* projection back onto the ball:

    .. math:: x^\star = \mathrm{clip}_{[0,1]}\big(x + \eta
              + \alpha\,\mathrm{sign}(\nabla_x L(x + \eta, y; \theta))\big),

    then the loss :math:`L(x^\star, y; \theta)`. The paper's defaults are ``noise`` :math:`k = 2`
    and :math:`\alpha = \epsilon` (``step_size=None``); the perturbation can reach
    :math:`(k + 1)\epsilon`, which is what keeps the single step from overfitting. ``clip``
    (a radius, default none) projects onto a ball of that radius instead. Two passes per step:
    one gradient for the attack, one for the weights.
    """
    ball = as_ball(eps, norm)
    k = check_nonnegative(noise, "noise")
    alpha = ball.eps if step_size is None else check_nonnegative(step_size, "step_size")
    with eval_mode(model):
        x_noisy = LpBall(ball.p, k * ball.eps).random(x) if k > 0 else x.detach()
        grad = input_gradient(unwrap(model), x_noisy, y)
    x_star = x_noisy + ball.step(grad, alpha)
    x_star = LpBall(ball.p, check_nonnegative(clip, "clip")).project(x_star, x) if clip is not None else x_star
    return F.cross_entropy(model(x_star.clamp(0, 1).detach()), y)


def gradient_alignment(g1: Tensor, g2: Tensor) -> Tensor:
    r"""Per example, the cosine :math:`\cos(g_1, g_2)` of two input gradients (0 where either is zero)."""
    return F.cosine_similarity(g1.flatten(1), g2.flatten(1), dim=1, eps=torch.finfo(g1.dtype).tiny)


def gradalign_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | LpBall = 0.3,
    lam: float = 0.2,
    step_size: float | None = None,
    norm: str | float = "linf",
) -> Tensor:
    r"""FGSM training with GradAlign, Andriushchenko and Flammarion (2020) :cite:`andriushchenko2020understanding`.

    The FGSM loss at :math:`x^\star = \Pi_{S(x)}(x + \alpha\,\mathrm{sign}(\nabla_x L(x, y)))`
    plus :math:`\lambda` times the misalignment of the input gradient at :math:`x` and at a
    random point :math:`x + \eta`, :math:`\eta \sim U(-\epsilon, \epsilon)^d`, of the ball:

    .. math:: L(x^\star, y; \theta) + \lambda\, \mathbb{E}\big[1 - \cos\big(\nabla_x L(x, y; \theta),
              \nabla_x L(x + \eta, y; \theta)\big)\big].

    The regulariser is differentiated through the second gradient (double backpropagation),
    the first serving also as FGSM's direction, as in the authors' code; :math:`\alpha = \epsilon`
    by default. They use :math:`\lambda = 0.2` on CIFAR-10 at 8/255 and larger :math:`\lambda`
    for larger radii.
    """
    ball = as_ball(eps, norm)
    lam = check_nonnegative(lam, "lam")
    alpha = ball.eps if step_size is None else check_nonnegative(step_size, "step_size")
    g_clean = input_gradient(model, x, y)
    x_star = ball.project(x + ball.step(g_clean, alpha), x)
    loss = F.cross_entropy(model(x_star), y)
    if lam == 0:
        return loss
    g_noisy = input_gradient(model, ball.random(x), y, create_graph=True)
    return loss + lam * (1 - gradient_alignment(g_clean, g_noisy)).mean()
