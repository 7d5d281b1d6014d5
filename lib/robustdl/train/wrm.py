r"""WRM: the worst distribution in a Wasserstein ball, by its Lagrangian penalty (Sinha, Namkoong and Duchi 2018).

Adversarial training (:mod:`robustdl.train.adversarial`) guards each input inside its own ball;
WRM guards against every distribution within transport cost of the data's:

* :func:`wrm_attack` -- the inner supremum, point by point, by gradient ascent on the penalised loss;
* :func:`wrm_loss` -- the objective: the cross-entropy at those points.

As in :mod:`~robustdl.train.adversarial`, the inner maximisation runs on the module inside a
DistributedDataParallel wrapper (:func:`~robustdl.train.distributed.unwrap`) in eval mode and
returns detached points in the [0, 1] box; the training loss goes through the model itself, in
train mode, and by Danskin's theorem its gradient at the (detached) maximiser is the gradient
of the maximum. Taught in the chapter *Distributional robustness*.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustdl._checks import check_nonnegative, check_positive, check_positive_int
from robustdl._model import check_inputs, eval_mode
from robustdl.losses import cross_entropy
from robustdl.train.distributed import unwrap

__all__ = ["wrm_attack", "wrm_loss"]


def wrm_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    gamma: float,
    steps: int = 15,
    step_size: float | None = None,
) -> Tensor:
    r"""WRM's adversarial points, Sinha, Namkoong and Duchi (2018), :cite:`sinha2018certifying` (Algorithm 1).

    The inner problem of their robust surrogate
    :math:`\phi_\gamma(\theta; x) = \sup_z\, \ell(\theta; z, y) - \gamma\, c(z, x)` with the
    transport cost of their experiments, :math:`c(z, x) = \|z - x\|_2^2`:

    .. math:: z^\star = \arg\max_{z \in [0, 1]^d}\ \ell(\theta; z, y) - \gamma \|z - x\|_2^2,

    by gradient ascent from :math:`z_0 = x` with their decaying steps
    :math:`\alpha_t = \alpha / \sqrt{t + 1}`, each iterate clipped into the box (the projection
    onto :math:`[0, 1]^d`; the authors' code does not clip). There is no ball: the price
    :math:`\gamma` per unit of transport decides how far each point travels, and
    :math:`z^\star \to x` as :math:`\gamma \to \infty`. The default :math:`\alpha = 1/(2\gamma)`
    makes the first step :math:`x + \nabla_z \ell(x) / (2\gamma)`, the maximiser of the
    linearised problem and the first step of the authors' code (whose ``steps`` do not count
    it). For :math:`\gamma` above the smoothness of :math:`\ell` in :math:`z` the problem is
    strongly concave, so gradient ascent finds its unique maximiser: the regime of their
    certificate, for which they use smooth (ELU) networks; at a ReLU network's kinks the ascent
    may oscillate.
    """
    check_inputs(model, x, y)
    gamma = check_positive(gamma, "gamma", "the penalised problem is well posed only when transport costs "
                             "something; otherwise its worst case is the largest loss anywhere in the box")
    steps = check_positive_int(steps, "steps")
    alpha = 1 / (2 * gamma) if step_size is None else check_nonnegative(step_size, "step_size")
    x = x.detach()
    z = x.clone()
    with eval_mode(model):
        for t in range(steps):
            with torch.enable_grad():
                z = z.requires_grad_(True)
                penalised = cross_entropy(model(z), y) - gamma * (z - x).flatten(1).pow(2).sum(dim=1)
                (grad,) = torch.autograd.grad(penalised.sum(), z)
            z = (z.detach() + alpha / math.sqrt(t + 1) * grad).clamp(0, 1)
    return z


def wrm_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    gamma: float,
    steps: int = 15,
    step_size: float | None = None,
) -> Tensor:
    r"""WRM, Sinha, Namkoong and Duchi (2018), :cite:`sinha2018certifying` (eq. 2, Algorithm 1).

    The worst case over distributions :math:`P` near the data :math:`P_0` in the Wasserstein
    distance :math:`W_c`, relaxed by a Lagrangian penalty (the seed tutorial's equation):

    .. math:: \min_\theta \sup_P\ \mathbb{E}_P[\ell(\theta; Z)] - \gamma W_c(P, P_0)
              = \min_\theta\ \mathbb{E}_{P_0}\big[\sup_z\ \ell(\theta; z, y) - \gamma \|z - x\|_2^2\big],

    the duality of their Proposition 1 turning the supremum over distributions into one over
    points. The inner supremum is :func:`wrm_attack`; the loss is then the cross-entropy at
    the detached maximisers :math:`z^\star` (Danskin: the penalty does not depend on
    :math:`\theta`, so it is left out). :math:`\gamma \le 0` is refused: without a positive
    price on transport the supremum is the largest loss anywhere in the box, not a
    neighbourhood of the data. A very large :math:`\gamma` is standard training.
    """
    z = wrm_attack(unwrap(model), x, y, gamma, steps, step_size)
    return F.cross_entropy(model(z), y)
