r"""Adversarial training with shift consistency regularisation (AT-SCR), Zhang et al. (2021),
:cite:`zhang2021towards`.

Taught in the chapter *Robustness vs generalisation* (``book/04-generalisation``). The robust
generalisation error is bounded by the standard one plus the spread of the *feature shifts*
:math:`d_\theta(x^{adv}) = f_\theta(x^{adv}) - f_\theta(x)` around their class means; AT-SCR
penalises that spread while training adversarially.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustdl._checks import check_nonnegative
from robustdl.attacks.gradient import pgd
from robustdl.train.distributed import unwrap

__all__ = ["at_scr_loss", "class_mean_shift", "feature_shift", "shift_consistency"]


def feature_shift(model: nn.Module, x: Tensor, x_adv: Tensor) -> Tensor:
    r"""The shift :math:`d_\theta(x^{adv}) = f_\theta(x^{adv}) - f_\theta(x)` of the model's output (its
    logits, the features of the tutorial's bound), shape (N, C)."""
    return model(x_adv) - model(x)


def class_mean_shift(shift: Tensor, y: Tensor, classes: int) -> Tensor:
    r"""The class-wise average shift :math:`\bar d_\theta(N_i) = \frac{1}{|N_i|}\sum_{l \in N_i} d_\theta(x_l^{adv})`
    for every class :math:`i` (a row of zeros for a class absent from ``y``), shape (classes, C)."""
    sums = shift.new_zeros(classes, shift.shape[1]).index_add(0, y, shift)
    counts = torch.bincount(y, minlength=classes).clamp_min(1).to(shift.dtype)
    return sums / counts[:, None]


def shift_consistency(shift: Tensor, y: Tensor) -> Tensor:
    r"""The shift-consistency penalty :math:`\frac1n \sum_i \sum_{j \in N_i}
    \|d_\theta(x_j^{adv}) - \bar d_\theta(x_l, N_i)\|_2^2` (the tutorial's :math:`\widehat{\mathrm{SiC}}`),
    with the class means taken over the batch, as a minibatch estimate of the training set's."""
    if shift.dim() != 2 or y.shape != shift.shape[:1]:
        raise ValueError(f"shift must be (N, C) with one label per row, got {tuple(shift.shape)} and {tuple(y.shape)}")
    means = class_mean_shift(shift, y, int(y.max()) + 1)
    return (shift - means[y]).pow(2).sum(1).mean()


def at_scr_loss(model: nn.Module, x: Tensor, y: Tensor, eps: float = 0.3, lam: float = 1.0, steps: int = 10,
                norm: str | float = "linf", step_size: float | None = None) -> Tensor:
    r"""The AT-SCR objective of the tutorial, Zhang et al. (2021), :cite:`zhang2021towards`:

    .. math:: \frac1n \sum_i L(x_i^{adv}, y_i; \theta) + \frac{\lambda}{n} \sum_i \sum_{j \in N_i}
              \|d_\theta(x_j^{adv}) - \bar d_\theta(x_l, N_i)\|_2^2,

    with :math:`x^{adv}` from PGD maximising the loss (all ``steps`` steps from a random start, as
    :func:`~robustdl.train.adversarial.pgd_at_loss`). ``lam = 0`` is PGD adversarial training.
    """
    check_nonnegative(lam, "lam")
    x_adv = pgd(unwrap(model), x, y, eps, norm, steps, step_size, early_stop=False)
    logits_adv = model(x_adv)
    return F.cross_entropy(logits_adv, y) + lam * shift_consistency(logits_adv - model(x), y)
