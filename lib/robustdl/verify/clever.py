r"""CLEVER: a robustness score from extreme value theory, Weng et al. (2018).

:cite:`weng2018evaluating`. For a classifier with logits :math:`f` and the margin
:math:`g_j(x) = f_y(x) - f_j(x)`, no perturbation :math:`\|\delta\|_p \le \min(g_j(x_0) / L_q^j, R)`
changes :math:`g_j`'s sign (their Theorem 3.2), where :math:`L_q^j = \max_{x \in B_p(x_0, R)}
\|\nabla g_j(x)\|_q` is the local Lipschitz constant in the dual norm :math:`1/p + 1/q = 1`.
CLEVER estimates :math:`L_q^j` instead of bounding it (their Algorithm 1): draw :math:`N_b`
batches of :math:`N_s` points uniformly in the ball, keep each batch's largest gradient norm,
fit a reverse Weibull distribution to those maxima (the only possible limit law of maxima of a
bounded variable, by the Fisher-Tippett-Gnedenko theorem) and take its location, the upper end of
its support, as :math:`\hat L_q^j`. The score is

.. math:: \mathrm{CLEVER}_t = \min\Big(\frac{g_t(x_0)}{\hat L_q^t}, R\Big), \qquad
          \mathrm{CLEVER}_u = \min_{j \ne y} \mathrm{CLEVER}_j .

It is an estimate of a lower bound on the minimum distortion, not a bound: a maximum never
sampled is never seen (taught in the chapter *Statistical evaluation*,
book/05-verification/statistical.ipynb).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import scipy.optimize
import scipy.stats
import torch
from torch import Tensor, nn

from robustdl._checks import check_positive_int
from robustdl._model import check_inputs, eval_mode, logits_of
from robustdl.threat import LpBall, as_ball

__all__ = ["clever", "clever_one", "reverse_weibull_location"]

#: Initial shape parameters of the maximum-likelihood fits; the best fit by the Kolmogorov-Smirnov
#: p-value wins. The authors try seven (0.1 to 100), ART one (1); on MNIST maxima the starts 1 to
#: 20 reached the same fit and 0.1 never a good one, so two suffice at a third of the cost.
SHAPE_STARTS = (1.0, 10.0)
#: The penalty :math:`\lambda\, \text{scale}^2` added to the negative log-likelihood of the rescaled
#: maxima: without it Nelder-Mead can drift to huge shape, location and scale together (a
#: Gumbel-like limit) and a location far above every sample. The authors' ``mle_reg`` method.
SCALE_PENALTY = 0.01
#: Below this Kolmogorov-Smirnov p-value no fit is trusted and the largest sample is used, as in
#: the authors' code.
MIN_P_VALUE = 1e-3


def _penalised_fmin(
    nll: Callable[..., float], theta0: np.ndarray, args: tuple[object, ...] = (), disp: int = 0
) -> np.ndarray:
    """Nelder-Mead on the negative log-likelihood plus :data:`SCALE_PENALTY` times the squared scale."""
    def penalised(theta: np.ndarray, *data: object) -> float:
        return nll(theta, *data) + SCALE_PENALTY * theta[-1] ** 2

    return scipy.optimize.fmin(penalised, theta0, args, disp=disp)


def reverse_weibull_location(maxima: np.ndarray) -> float:
    r"""The location :math:`\hat a` (upper end of the support) of a reverse Weibull fit to ``maxima``.

    Maximum likelihood by ``scipy.stats.weibull_max.fit`` on the maxima shifted by their largest
    value and scaled by their range (as the authors' code does, for the optimiser's sake), with
    a small penalty on the scale (:data:`SCALE_PENALTY`), from each of :data:`SHAPE_STARTS`,
    keeping the fit of best Kolmogorov-Smirnov p-value. Maxima with
    no spread (a linear model's gradients are constant) are the Weibull law's limit of scale 0,
    a point mass: the location is that value. So is an ill-fitting sample (p-value below
    :data:`MIN_P_VALUE`): the largest sample is returned. The result is never below the largest
    sample, since the support of a reverse Weibull law ends at its location.
    """
    maxima = np.asarray(maxima, dtype=float)
    top, spread = float(maxima.max()), float(np.ptp(maxima))
    if spread <= 1e-12 * max(abs(top), 1.0):
        return top
    scaled = (maxima - top) / spread
    best_p, best_loc = -1.0, 0.0
    for start in SHAPE_STARTS:
        shape, loc, scale = scipy.stats.weibull_max.fit(scaled, start, optimizer=_penalised_fmin)
        p_value = scipy.stats.kstest(scaled, "weibull_max", args=(shape, loc, scale)).pvalue
        if p_value > best_p:
            best_p, best_loc = p_value, loc
    return top + spread * best_loc if best_p >= MIN_P_VALUE else top


def _margin_gradient_norms(model: nn.Module, points: Tensor, y: int, others: list[int], ball: LpBall) -> Tensor:
    r""":math:`\|\nabla g_j(x)\|_q` at each point for each class :math:`j` in ``others``, shape (len(others), B)."""
    with torch.enable_grad():
        points = points.detach().requires_grad_(True)
        logits = logits_of(model, points)
        norms = []
        for j in others:
            (grad,) = torch.autograd.grad((logits[:, y] - logits[:, j]).sum(), points, retain_graph=True)
            norms.append(ball.dual_norm(grad))
    return torch.stack(norms)


def clever_one(
    model: nn.Module, x0: Tensor, y: int, others: list[int], ball: LpBall, batches: int, samples: int,
    generator: torch.Generator | None,
) -> float:
    r"""The CLEVER score of one example against the classes ``others``: Weng et al. (2018) Algorithm 1.

    :cite:`weng2018evaluating`. For each :math:`j` in ``others``: ``batches`` batches of ``samples``
    points uniform in ``ball`` around ``x0``, each batch's largest :math:`\|\nabla g_j\|_q`, and the
    location :math:`\hat L_q^j` of a reverse Weibull fit to those maxima
    (:func:`reverse_weibull_location`); then

    .. math:: \mathrm{CLEVER} = \min\Big(\max\big(\min_{j} \frac{g_j(x_0)}{\hat L_q^j}, 0\big), R\Big),
              \qquad g_j = f_y - f_j,\; R = \text{ball.eps}.

    The building block of :func:`clever`, which checks the arguments and puts the model in eval
    mode; this evaluates the model as it is. Taught in the chapter *Statistical evaluation*
    (book/05-verification/statistical.ipynb).

    Args:
        model: returns logits.
        x0: one example, shape (1, ...), in [0, 1].
        y: its label; ``others``: the classes :math:`j \ne y` to take the minimum over.
        ball: the :class:`~robustdl.threat.LpBall` the points are drawn from (its dual norm measures
            the gradients).
        batches, samples: :math:`N_b` and :math:`N_s`.
        generator: the random draws' generator.

    Returns:
        The score, in :math:`[0, R]`.
    """
    batch_maxima = []
    for _ in range(batches):
        points = ball.random(x0.expand(samples, *x0.shape[1:]), generator=generator)
        batch_maxima.append(_margin_gradient_norms(model, points, y, others, ball).amax(dim=1))
    maxima = torch.stack(batch_maxima, dim=1).double().cpu().numpy()  # (classes, batches)
    with torch.no_grad():
        logits = logits_of(model, x0)[0]
    scores = [
        _ratio((logits[y] - logits[j]).item(), reverse_weibull_location(m)) for j, m in zip(others, maxima, strict=True)
    ]
    return min(max(min(scores), 0.0), ball.eps)


def _ratio(margin: float, lipschitz: float) -> float:
    """``margin / lipschitz``; a margin whose gradient was 0 at every sample is never crossed: ``inf``."""
    return margin / lipschitz if lipschitz > 0 else math.inf


def clever(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | LpBall,
    norm: str | float = 2,
    batches: int = 100,
    samples_per_batch: int = 100,
    target: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The CLEVER score of each example, Weng et al. (2018) Algorithm 1 (module docstring).

    :cite:`weng2018evaluating`. Untargeted (:math:`\mathrm{CLEVER}_u`, the minimum over
    :math:`j \ne y`) unless ``target`` gives each example's class ``t`` (:math:`\mathrm{CLEVER}_t`).

    Args:
        model: returns logits; images ``x`` in [0, 1], shape (N, ...), labels ``y`` (N,).
        eps: the radius :math:`R` of the sampling ball, also the cap of the score.
        norm: the perturbation norm ``p`` (``2``, ``inf`` or ``1``); gradients are measured in
            its dual norm ``q``. Points are drawn by :meth:`LpBall.random` (uniform in the ball,
            clipped to [0, 1]).
        batches, samples_per_batch: :math:`N_b` and :math:`N_s`; the paper used 500 and 1024,
            the defaults are smaller for the CPU.
        target: optional target classes (N,), each different from ``y``.
        generator: the random source of the samples.

    Returns:
        The scores, shape (N,), in :math:`[0, R]`: 0 where ``y`` is already not the top class.
    """
    check_inputs(model, x, y)
    ball = as_ball(eps, norm)
    batches = check_positive_int(batches, "batches")
    samples = check_positive_int(samples_per_batch, "samples_per_batch")
    with torch.no_grad():
        classes = logits_of(model, x[:1]).shape[1]
    if target is not None:
        check_inputs(model, x, target)
        if (target == y).any() or (target < 0).any() or (target >= classes).any():
            raise ValueError(f"target must hold classes in [0, {classes}) different from y, got {target.tolist()}")
    scores = []
    with eval_mode(model):
        for i in range(len(x)):
            label = int(y[i])
            others = [int(target[i])] if target is not None else [j for j in range(classes) if j != label]
            scores.append(clever_one(model, x[i : i + 1], label, others, ball, batches, samples, generator))
    return torch.tensor(scores, dtype=x.dtype, device=x.device)

