r"""How likely is a random perturbation to break the prediction? Adaptive multi-level splitting.

Webb et al. (2019) :cite:`webb2019statistical` measure robustness by the probability of a
violation under an input distribution, here :math:`x'` uniform on the box
:math:`B = [x - \epsilon, x + \epsilon] \cap [0, 1]^d` (their :math:`L_\infty` setting), with the
property function

.. math:: s(x') = \max_{j \ne y} f_j(x') - f_y(x'), \qquad \mathcal{I} = P(s(x') \ge 0).

Naive Monte Carlo (:func:`naive_monte_carlo`) sees nothing once :math:`\mathcal{I}` is far below
one over the number of samples. Adaptive multi-level splitting (:func:`multilevel_splitting`)
writes the rare event as a chain of likely ones, :math:`\mathcal{I} = \prod_k P(s \ge L_k \mid
s \ge L_{k-1})`, with levels :math:`L_k` chosen on the fly as the :math:`(1 - \rho)`-quantile of
the particles' values (so each factor is about :math:`\rho`), and refreshes the particles above
each level by Metropolis-Hastings moves that keep :math:`p(x' \mid s(x') \ge L_k)` invariant.

Taught in the chapter *Statistical evaluation* (book/05-verification/statistical.ipynb).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustdl._checks import check_fraction, check_nonnegative, check_positive_int
from robustdl._model import check_inputs, eval_mode, logits_of
from robustdl._random import integers, uniform
from robustdl.losses import goal_margin
from robustdl.threat import LpBall, per_example

__all__ = ["MonteCarloResult", "SplittingResult", "mh_step", "multilevel_splitting", "naive_monte_carlo", "violation"]

#: Each chain's proposal half-width starts at this fraction of ``eps`` (the authors' code: 1/30).
INITIAL_WIDTH = 1 / 30
#: The acceptance rate each chain's width is tuned to. After every move a chain's width is
#: multiplied by ``WIDEN`` if the move was accepted and by ``NARROW`` if not; the two are chosen so
#: that the width is stationary exactly at this rate (``log WIDEN * target + log NARROW * (1 -
#: target) = 0``). The authors adapt once per level; adapting after every move lets the width
#: follow the level as it narrows, which a fixed start cannot do both in 10 and in 784 dimensions.
TARGET_ACCEPTANCE = 0.25
WIDEN = math.exp(0.3)
NARROW = math.exp(-0.3 * TARGET_ACCEPTANCE / (1 - TARGET_ACCEPTANCE))

def violation(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    r"""The property :math:`s(x) = \max_{j \ne y} f_j(x) - f_y(x)`, shape (N,); a violation is :math:`s \ge 0`.

    Minus the :func:`~robustdl.losses.goal_margin` of the untargeted goal: a violation is an
    input at or past the decision boundary (ties count as violations).
    """
    return -goal_margin(logits_of(model, x), y)


@dataclass(frozen=True)
class SplittingResult:
    r"""The estimate of :func:`multilevel_splitting`.

    Attributes:
        log_prob: the estimate of :math:`\log P(s \ge 0)`; ``-inf`` when no particle reached a
            level or the running estimate fell below ``log_min_prob`` (the run stops there).
        levels: the levels :math:`L_1, L_2, \dots`, the last 0 when the violation was reached.
        evaluations: the number of network evaluations (particles times passes).
    """

    log_prob: float
    levels: tuple[float, ...]
    evaluations: int


@dataclass(frozen=True)
class MonteCarloResult:
    """The estimate of :func:`naive_monte_carlo`: ``hits`` violations among ``samples`` draws."""

    hits: int
    samples: int

    @property
    def log_prob(self) -> float:
        """:math:`\\log(\\text{hits} / \\text{samples})`, ``-inf`` when nothing was hit."""
        return math.log(self.hits / self.samples) if self.hits else -math.inf


def _uniform(lo: Tensor, hi: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """``n`` points uniform on the box [lo, hi] (shape (1, ...)): not :meth:`LpBall.random`, which clips."""
    u = uniform((n, *lo.shape[1:]), lo, generator)
    return lo + (hi - lo) * u


def _check(model: object, x: Tensor, y: Tensor, eps: object) -> float:
    check_inputs(model, x, y)
    if len(x) != 1:
        raise ValueError(f"x must hold one example, shape (1, ...), got {tuple(x.shape)}")
    eps = check_nonnegative(eps, "eps")
    if eps == 0:
        raise ValueError("eps must be > 0: the distribution of x' is uniform on the eps-box")
    return eps


def naive_monte_carlo(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    samples: int = 100_000,
    batch_size: int = 10_000,
    generator: torch.Generator | None = None,
) -> MonteCarloResult:
    r"""Count violations :math:`s(x') \ge 0` among ``samples`` draws uniform on the eps-box around ``x`` (1, ...)."""
    eps = _check(model, x, y, eps)
    samples, batch_size = check_positive_int(samples, "samples"), check_positive_int(batch_size, "batch_size")
    lo, hi = LpBall(math.inf, eps).box(x)
    hits = 0
    with eval_mode(model), torch.no_grad():
        for start in range(0, samples, batch_size):
            n = min(batch_size, samples - start)
            hits += int((violation(model, _uniform(lo, hi, n, generator), y.expand(n)) >= 0).sum())
    return MonteCarloResult(hits, samples)


def _log_window(z: Tensor, width: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    r"""Per particle, :math:`\log |W(z)|` of the proposal window :math:`W(z) = [z - w, z + w] \cap [lo, hi]`."""
    w = per_example(width, z)
    return (torch.minimum(z + w, hi) - torch.maximum(z - w, lo)).log().flatten(1).sum(dim=1)


def mh_step(
    model: nn.Module, z: Tensor, s: Tensor, y: Tensor, level: float, width: Tensor, lo: Tensor, hi: Tensor,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""One Metropolis-Hastings move per particle targeting the uniform law on :math:`B \cap \{s \ge L\}`.

    :cite:`webb2019statistical`, the move of their Algorithm 1 (the refresh of step 4). The
    proposal :math:`z'` is uniform on the window :math:`W(z) = [z - w, z + w] \cap [lo, hi]`; the
    target is flat, so the Hastings ratio is that of the windows' volumes:

    .. math:: \alpha(z \to z') = \min\Big(1, \frac{|W(z)|}{|W(z')|}\Big)\,\mathbb{1}[s(z') \ge L].

    Taught in the chapter *Statistical evaluation* (book/05-verification/statistical.ipynb).

    Args:
        model: returns logits; evaluated as it is (:func:`multilevel_splitting` sets eval mode).
        z: the particles, shape (N, ...); ``s``: their values :func:`violation` (N,).
        y: the labels, (N,); ``level``: :math:`L`.
        width: each particle's half-width :math:`w`, (N,).
        lo, hi: the box :math:`B`, broadcastable to ``z``.
        generator: the random draws' generator.

    Returns:
        ``(z, s, accepted)``: the particles after the move, their values, and which moved (N,).
    """
    w = per_example(width, z)
    low, high = torch.maximum(z - w, lo), torch.minimum(z + w, hi)
    proposal = low + (high - low) * uniform(z.shape, z, generator)
    s_new = violation(model, proposal, y)
    log_accept = _log_window(z, width, lo, hi) - _log_window(proposal, width, lo, hi)
    u = uniform((len(z),), z, generator)
    accept = (u.log() <= log_accept) & (s_new >= level)
    return torch.where(per_example(accept, z), proposal, z), torch.where(accept, s_new, s), accept


def multilevel_splitting(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    particles: int = 1000,
    quantile: float = 0.1,
    mh_steps: int = 100,
    log_min_prob: float = math.log(1e-40),
    max_levels: int = 200,
    generator: torch.Generator | None = None,
) -> SplittingResult:
    r"""Estimate :math:`\log P(s(x') \ge 0)` for :math:`x'` uniform on the eps-box: Webb et al. (2019) Algorithm 1.

    :cite:`webb2019statistical`. With :math:`N` = ``particles`` and :math:`\rho` = ``quantile``:

    1. draw :math:`N` particles uniform on the box; :math:`\log \hat{\mathcal{I}} = 0`;
    2. set the level :math:`L_k = \min(0, s_{(\lceil (1-\rho) N \rceil)})`, the :math:`(1-\rho)`
       quantile of the particles' :math:`s` (0 if it did not rise above :math:`L_{k-1}`:
       :math:`s` can be flat where ReLUs are dead);
    3. add :math:`\log P_k`, the log fraction of particles with :math:`s \ge L_k`; stop with
       ``-inf`` if none survive or :math:`\log \hat{\mathcal{I}} <` ``log_min_prob``;
    4. if :math:`L_k = 0`, return :math:`\log \hat{\mathcal{I}}`; else replace the others by
       copies of uniformly chosen survivors and run ``mh_steps`` Metropolis-Hastings moves
       (:func:`mh_step`) above :math:`L_k`, each chain's width adapted to its acceptance rate
       (:data:`TARGET_ACCEPTANCE`), and go to 2.

    ``x`` holds one example (1, ...) and ``y`` its label (1,). The estimate is unbiased for
    :math:`\mathcal{I}` when the moves mix (Webb et al. Sec. 3); its log has standard deviation
    about :math:`\sqrt{k (1 - \rho) / (\rho N)}` after :math:`k` levels.
    """
    eps = _check(model, x, y, eps)
    n, steps = check_positive_int(particles, "particles"), check_positive_int(mh_steps, "mh_steps")
    rho = check_fraction(quantile, "quantile")
    if not 0 < rho < 1:
        raise ValueError(f"quantile must lie strictly between 0 and 1, got {quantile}")
    lo, hi = LpBall(math.inf, eps).box(x)
    labels = y.expand(n)
    log_prob, levels, level = 0.0, [], -math.inf
    width = torch.full((n,), eps * INITIAL_WIDTH, dtype=x.dtype, device=x.device)
    with eval_mode(model), torch.no_grad():
        z = _uniform(lo, hi, n, generator)
        s = violation(model, z, labels)
        evaluations = n
        for _ in range(check_positive_int(max_levels, "max_levels")):
            candidate = min(s.sort().values[math.ceil((1 - rho) * n) - 1].item(), 0.0)
            level = 0.0 if candidate <= level else candidate
            levels.append(level)
            alive = s >= level
            if not alive.any():
                return SplittingResult(-math.inf, tuple(levels), evaluations)
            log_prob += math.log(alive.float().mean().item())
            if level == 0:
                return SplittingResult(log_prob, tuple(levels), evaluations)
            if log_prob < log_min_prob:
                return SplittingResult(-math.inf, tuple(levels), evaluations)
            survivors = alive.nonzero().squeeze(1)
            pick = torch.where(alive, torch.arange(n, device=x.device),
                               survivors[integers(0, len(survivors), (n,), x.device, generator)])
            z, s, width = z[pick], s[pick], width[pick]
            for _ in range(steps):
                z, s, accept = mh_step(model, z, s, labels, level, width, lo, hi, generator)
                width = torch.where(accept, width * WIDEN, width * NARROW).clamp(max=2 * eps)
            evaluations += n * steps
    raise RuntimeError(f"no estimate after max_levels={max_levels} levels; raise it or the quantile")
