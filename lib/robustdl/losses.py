r"""The vocabulary of an attack's goal: per-example losses and margins of a batch of logits.

An attack's *goal* is any wrong label (untargeted, ``target=None``) or a given ``target`` label.
Every function here takes logits :math:`z` of shape (N, C) (or any per-class scores, such as the
log-probabilities a black-box attack sees) and returns one value per example, shape (N,):

* :func:`cross_entropy` :math:`J(z, y)` and :func:`goal_loss`, the loss an attack maximises;
* :func:`margin` :math:`z_y - \max_{j \ne y} z_j` and :func:`goal_margin`, the margin to the goal,
  negative once the goal is passed (Carlini and Wagner's :math:`f_6`);
* :func:`goal_reached`, the decision of the argmax;
* :func:`dlr_loss`, the Difference of Logits Ratio loss of APGD (Croce and Hein 2020), unchanged by
  shifting and positively rescaling the logits;
* :func:`kl_divergence` :math:`\mathrm{KL}(p \,\|\, \mathrm{softmax}(z))`, the divergence TRADES and VAT
  maximise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

__all__ = ["Loss", "cross_entropy", "dlr_loss", "goal_loss", "goal_margin", "goal_reached", "kl_divergence",
           "margin"]

#: A per-example loss ``loss(logits, labels) -> Tensor`` of shape (N,).
Loss = Callable[[Tensor, Tensor], Tensor]
#: Probabilities of exactly 0 enter :func:`kl_divergence`'s logarithm at this floor (``0 log 0 = 0``).
PROBABILITY_FLOOR = 1e-12
#: Keeps the DLR loss finite when the top logits tie (the authors' code adds the same).
DLR_TINY = 1e-12


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    r"""Per-example cross-entropy :math:`J(z, y) = -\log \mathrm{softmax}(z)_y`, the loss of FGSM and PGD.

    The loss :math:`J(\theta, x, y)` of Goodfellow et al. (2015), :cite:`goodfellow2015explaining`
    (eq. (2) of the seed tutorial) and of Madry et al.'s inner maximisation :cite:`madry2018towards`.
    """
    return F.cross_entropy(logits, y, reduction="none")


def goal_loss(logits: Tensor, y: Tensor, target: Tensor | None = None, loss: Loss = cross_entropy) -> Tensor:
    r"""The per-example value an attack maximises: :math:`J(z, y)`, or :math:`-J(z, t)` for a ``target``.

    Untargeted, the attack climbs the loss of the true label (Madry et al. (2018),
    :cite:`madry2018towards`, eq. (2.1)); targeted, it descends the loss of the target
    (Kurakin et al. (2017), :cite:`kurakin2017adversarial`). ``loss`` is any per-example
    :data:`Loss` (default :func:`cross_entropy`).
    """
    return loss(logits, y) if target is None else -loss(logits, target)


def margin(logits: Tensor, y: Tensor) -> Tensor:
    r"""The classification margin :math:`z_y - \max_{j \ne y} z_j` per example, shape (N,).

    Positive when the label ``y`` holds the largest score alone, negative when another class
    beats it, 0 at a tie; the quantity Carlini and Wagner's :math:`f_6` is built on
    (:cite:`carlini2017towards`, Sec. IV-B).
    """
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - others.amax(dim=1)


def goal_margin(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    r"""How far each example is from the attack's goal, :math:`f_6` of :cite:`carlini2017towards` (Sec. IV-B).

    .. math:: \text{untargeted: } z_y - \max_{j \ne y} z_j, \qquad
              \text{targeted: } \max_{j \ne t} z_j - z_t,

    i.e. :func:`margin` of the label, or minus that of the target. Negative once the goal is
    passed; 0 at a tie, which :func:`goal_reached` leaves to the argmax. An attack with
    confidence :math:`\kappa` succeeds where it is below :math:`-\kappa` and minimises
    :math:`\max(\text{goal margin}, -\kappa)`. ``y`` is ignored when ``target`` is given.
    """
    return margin(logits, y) if target is None else -margin(logits, target)


def goal_reached(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    r"""Whether each prediction :math:`\arg\max_j z_j` reaches the goal: any label but ``y``, or ``target``.

    The success criterion of an adversarial example (Szegedy et al. (2014),
    :cite:`szegedy2014intriguing`: :math:`f(x + r) = t`; untargeted :math:`f(x + r) \ne y`).
    Ties go to the first largest score, as ``torch.argmax``'s. A bool tensor (N,).
    """
    pred = logits.argmax(dim=1)
    return pred != y if target is None else pred == target


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


def kl_divergence(p: Tensor, logits: Tensor) -> Tensor:
    r"""The per-example KL divergence of ``softmax(logits)`` from a fixed prediction ``p`` (N, C):

    .. math:: \mathrm{KL}(p \,\|\, \mathrm{softmax}(z)) = \sum_j p_j \big(\log p_j - \log \mathrm{softmax}(z)_j\big),

    the divergence from the clean prediction that TRADES
    (Zhang et al. (2019), :cite:`zhang2019theoretically`, eq. 5) and virtual adversarial
    training (Miyato et al. (2018), :cite:`miyato2018virtual`, eq. 3) maximise over the
    input's perturbation. Probabilities of 0 contribute 0. Shape (N,).
    """
    if p.shape != logits.shape:
        raise ValueError(f"p must have the logits' shape {tuple(logits.shape)}, got {tuple(p.shape)}")
    return (p * (p.clamp_min(PROBABILITY_FLOOR).log() - F.log_softmax(logits, dim=1))).sum(dim=1)
