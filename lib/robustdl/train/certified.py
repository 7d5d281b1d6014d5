r"""Certified training: minimise a sound upper bound on the worst-case loss.

Interval bound propagation (IBP) training, Gowal et al. (2018) :cite:`gowal2018effectiveness`: the
lower bounds :math:`\underline{m}_j` of the margins :math:`f_y - f_j` over the ball
(:func:`~robustdl.verify.bounds.ibp_margin`) define worst-case logits :math:`\hat z`, whose
cross-entropy bounds the cross-entropy of every input in the ball from above. CROWN-IBP, Zhang et
al. (2020) :cite:`zhang2020towards`, trains through a tighter bound on the same margins
(:func:`~robustdl.verify.bounds.crown_ibp_margin`). Taught in the chapter *Linear relaxations and
certified training*.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustdl._checks import check_fraction, check_nonnegative
from robustdl.train.distributed import unwrap
from robustdl.verify.bounds import Margin, crown_ibp_margin, ibp_margin

__all__ = ["crown_ibp_loss", "ibp_loss", "worst_case_logits"]


def worst_case_logits(model: nn.Module, x: Tensor, y: Tensor, eps: float, bound: Margin = ibp_margin) -> Tensor:
    r"""Worst-case logits :math:`\hat z` (N, C): :math:`\hat z_y = 0` and :math:`\hat z_j = -\underline{m}_j`, j != y.

    Cross-entropy is increasing in every :math:`z_j - z_y`, and :math:`z_j - z_y \le -\underline{m}_j`
    everywhere in the ball, so :math:`\mathrm{CE}(\hat z, y) \ge \max_{x' \in B(x)} \mathrm{CE}(f(x'), y)`.
    The margins' lower bounds come from ``bound`` (IBP by default; any sound
    :data:`~robustdl.verify.bounds.Margin` will do).
    """
    margins = bound(model, x, y, eps)  # (N, C-1), the classes j != y in order
    classes = margins.shape[1] + 1
    others = torch.arange(classes, device=y.device) != y.unsqueeze(1)
    return torch.zeros(len(y), classes, dtype=margins.dtype, device=margins.device).masked_scatter(others, -margins)


def _ramp(eps: float, full_eps: float | None) -> float:
    """How far along its ramp the radius is, :math:`\\min(1, \\epsilon / \\epsilon_{full})` (1 without a ramp)."""
    if full_eps is None:
        return 1.0
    if check_nonnegative(full_eps, "full_eps") == 0:
        raise ValueError("full_eps must be > 0, the radius at the end of the ramp")
    return min(1.0, eps / full_eps)


def ibp_loss(model: nn.Module, x: Tensor, y: Tensor, eps: float = 0.3, kappa: float = 0.5,
             full_eps: float | None = None) -> Tensor:
    r"""IBP training, Gowal et al. (2018) :cite:`gowal2018effectiveness` (eq. 12).

    .. math:: L = \kappa\, \mathrm{CE}(f(x), y) + (1 - \kappa)\, \mathrm{CE}(\hat z(x, \epsilon), y),

    with the worst-case logits :math:`\hat z` of :func:`worst_case_logits`. Gowal et al. ramp
    :math:`\epsilon` from 0 (``make_objective("ibp", eps=..., warmup=T)``) and, over the same steps,
    :math:`\kappa` from 1 down to its final value: with ``full_eps`` (the radius at the end of the
    ramp) the weight follows the radius, :math:`\kappa_t = 1 - (1 - \kappa) \min(1, \epsilon_t / \epsilon_{full})`.
    On MNIST they train at :math:`\epsilon = 0.4` to certify at 0.3. The network must be one that
    bound propagation supports (:func:`~robustdl.verify.operators.layers`).
    """
    kappa = check_fraction(kappa, "kappa")
    eps = check_nonnegative(eps, "eps")
    kappa = 1 - (1 - kappa) * _ramp(eps, full_eps)
    clean = F.cross_entropy(model(x), y)
    if kappa == 1:
        return clean
    return kappa * clean + (1 - kappa) * F.cross_entropy(worst_case_logits(unwrap(model), x, y, eps), y)


def crown_ibp_loss(model: nn.Module, x: Tensor, y: Tensor, eps: float = 0.3, kappa: float = 0.5,
                   beta: float = 1.0, full_eps: float | None = None) -> Tensor:
    r"""CROWN-IBP training, Zhang et al. (2020) :cite:`zhang2020towards`, Section 3.

    .. math:: L = \kappa\, \mathrm{CE}(f(x), y) + (1 - \kappa)\, \mathrm{CE}\big(-[\beta\,
              \underline{m}_{\text{CROWN-IBP}} + (1 - \beta)\, \underline{m}_{\text{IBP}}], y\big),

    the worst-case logits (:func:`worst_case_logits`) of the mixed bound of
    :func:`~robustdl.verify.bounds.crown_ibp_margin`: IBP through the intermediate layers, one CROWN
    pass from the margins. ``kappa`` and ``beta`` are the weights at the end of the ramp: with
    ``full_eps`` both start at 1 and follow the radius, as :func:`ibp_loss`'s :math:`\kappa` does,
    :math:`\beta_t = 1 - (1 - \beta) \min(1, \epsilon_t / \epsilon_{full})`, so the tight CROWN-IBP
    bound steers the early, unstable steps and IBP's the end (the paper's :math:`\beta: 1 \to 0`
    is ``beta=0``; ``beta=1`` keeps CROWN-IBP throughout). Without ``full_eps`` the weights are
    used as given: ``beta=0`` is then :func:`ibp_loss` exactly, and ``kappa=1`` the clean loss.
    """
    kappa, beta = check_fraction(kappa, "kappa"), check_fraction(beta, "beta")
    eps = check_nonnegative(eps, "eps")
    progress = _ramp(eps, full_eps)
    kappa, beta = 1 - (1 - kappa) * progress, 1 - (1 - beta) * progress
    clean = F.cross_entropy(model(x), y)
    if kappa == 1:
        return clean
    logits = worst_case_logits(unwrap(model), x, y, eps, partial(crown_ibp_margin, beta=beta))
    return kappa * clean + (1 - kappa) * F.cross_entropy(logits, y)
