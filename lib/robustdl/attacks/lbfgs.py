r"""Optimisation attacks: the smallest perturbation that changes the decision, found by a solver.

Instead of a step of fixed size (FGSM, PGD), the box-constrained L-BFGS attack of Szegedy et
al. (2014), :func:`lbfgs`, solves the seed tutorial's problem (1) -- minimise :math:`\|r\|`
subject to :math:`\arg\max_l f_l(x + r) = t` and :math:`x + r \in [0, 1]^d` -- through its
penalty form, and searches per example for the constant :math:`c`. It is per example
throughout: each example has its own constant :math:`c`, its own search and its own result;
an example the attack cannot break is returned unchanged. The attacks of Carlini and Wagner
(2017) are :mod:`robustdl.attacks.cw`.

Taught in the chapter *Adversarial attacks* (optimisation-based attacks).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.optimize
import torch
from torch import Tensor, nn

from robustdl._checks import check_labels, check_nonnegative, check_positive_int
from robustdl._model import check_inputs, eval_mode, logits_of
from robustdl._progress import progress_bar
from robustdl.attacks._core import _L2, _search_step
from robustdl.losses import cross_entropy
from robustdl.threat import per_example

__all__ = ["lbfgs"]


def _box_lbfgs(model: nn.Module, x: Tensor, target: Tensor, c: Tensor, max_iter: int) -> Tensor:
    r"""Solve :math:`\min_{x' \in [0,1]^d} c\,\|x' - x\|_2 + \mathrm{loss}_f(x', t)` per example with L-BFGS-B.

    The examples' problems are independent, so their sum is minimised at once over the
    flattened batch by SciPy's L-BFGS-B, whose bounds keep every iterate in the box exactly.
    The solver's iterations, line searches and stopping test are then shared by the batch: an
    example's result can depend on the others in its batch (call per example for the paper's
    per-image solve).
    """
    def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
        z = torch.from_numpy(flat).to(x).view_as(x).requires_grad_(True)
        loss = (c * _L2.norm(z - x) + cross_entropy(logits_of(model, z), target)).sum()
        (grad,) = torch.autograd.grad(loss, z)
        return loss.item(), grad.flatten().double().cpu().numpy()

    start = x.detach().flatten().double().cpu().numpy()
    result = scipy.optimize.minimize(objective, start, jac=True, method="L-BFGS-B",
                                     bounds=scipy.optimize.Bounds(0.0, 1.0), options={"maxiter": max_iter})
    return torch.from_numpy(result.x).to(x).view_as(x).clamp(0, 1)


def lbfgs(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    target: Tensor | None = None,
    c_init: float = 0.1,
    search_steps: int = 10,
    max_iter: int = 100,
    progress: bool | None = None,
) -> Tensor:
    r"""The box-constrained L-BFGS attack of Szegedy et al. (2014), :cite:`szegedy2014intriguing` (Sec. 4.1).

    Problem (1) of the seed tutorial -- the smallest :math:`\|r\|_2` with
    :math:`f(x + r) = t` and :math:`x + r \in [0, 1]^d` -- is approximated by the penalty
    problem of the paper,

    .. math:: \min_r\ c\,\|r\|_2 + \mathrm{loss}_f(x + r, t) \quad \text{subject to } x + r \in [0, 1]^d,

    with the cross-entropy as :math:`\mathrm{loss}_f`, solved for each :math:`c` by L-BFGS-B
    (SciPy's, from :math:`r = 0`), whose bounds handle the box exactly -- a projection after
    each step of an unconstrained L-BFGS would break its curvature pairs. A larger :math:`c`
    gives a smaller :math:`r`, so the paper's line search for "the minimum :math:`c`" is read as
    the search for the boundary constant: the largest :math:`c` whose minimiser still satisfies
    :math:`f(x + r) = t` (the minimum weight :math:`1/c` on the loss). Per example, :math:`c`
    doubles after a success and halves after a failure until bracketed, then bisects. The result
    is the successful minimiser of smallest :math:`\|r\|_2` over the constants tried.

    Args:
        model: a classifier returning logits, taking images in [0, 1].
        x: clean images in [0, 1], shape (N, ...).
        y: true labels, shape (N,): needed without ``target``; then the target is the
            runner-up class :math:`\arg\max_{i \ne y} Z_i(x)`, the nearest one to reach.
        target: target labels :math:`t`, shape (N,).
        c_init: the first constant.
        search_steps: constants tried per example.
        max_iter: L-BFGS-B iterations per constant.
        progress: show a progress bar over the constants (default: ``$ROBUSTDL_PROGRESS``).

    Returns:
        New adversarial images, detached, in [0, 1]; an example never broken is returned as is.

    Taught in the chapter *Adversarial attacks*.
    """
    if target is None:
        if y is None:
            raise ValueError("lbfgs needs y (untargeted: the target is the runner-up class) or target, got neither")
        check_inputs(model, x, y)
    else:
        check_inputs(model, x, target if y is None else y)
        check_labels(target, x, "target")
    x = x.detach()
    c0 = check_nonnegative(c_init, "c_init")
    if c0 == 0:
        raise ValueError("c_init must be > 0, got 0")
    search_steps, max_iter = check_positive_int(search_steps, "search_steps"), check_positive_int(max_iter, "max_iter")
    c = x.new_full((len(x),), c0)
    lower, upper = torch.zeros_like(c), torch.full_like(c, math.inf)
    best, best_norm = x.clone(), torch.full_like(c, math.inf)
    with eval_mode(model), torch.enable_grad():
        if target is None:
            target = logits_of(model, x).detach().scatter(1, y[:, None], -math.inf).argmax(dim=1)
        for _ in progress_bar(range(search_steps), progress, desc="L-BFGS"):
            x_adv = _box_lbfgs(model, x, target, c, max_iter)
            with torch.no_grad():
                success = logits_of(model, x_adv).argmax(dim=1) == target
            norm = torch.where(success, _L2.norm(x_adv - x), math.inf)
            better = norm < best_norm
            best = torch.where(per_example(better, x), x_adv, best)
            best_norm = torch.minimum(norm, best_norm)
            c, lower, upper = _search_step(c, lower, upper, grow=success, factor=2.0)
    return best
