r"""Randomised smoothing: a classifier certified in the L2 ball by sampling, Cohen et al. (2019).

From any base classifier :math:`f` (a model returning logits), the *smoothed* classifier returns
the class that :math:`f` picks most often under Gaussian noise,

.. math:: g(x) = \arg\max_c \; \mathbb P\big(f(x + \varepsilon) = c\big), \qquad
          \varepsilon \sim \mathcal N(0, \sigma^2 I).

Theorem 1 of Cohen, Rosenfeld and Kolter (2019) :cite:`cohen2019certified`: if the top class
:math:`c_A` has probability at least :math:`\underline{p_A}` and every other class at most
:math:`\overline{p_B}`, then :math:`g(x + \delta) = c_A` for every :math:`\|\delta\|_2 < R`,

.. math:: R = \frac{\sigma}{2}\big(\Phi^{-1}(\underline{p_A}) - \Phi^{-1}(\overline{p_B})\big),

and with :math:`\overline{p_B} = 1 - \underline{p_A}` the radius is :math:`R = \sigma\,\Phi^{-1}(\underline{p_A})`.
The probabilities are estimated by Monte Carlo, so the guarantee holds with probability at least
:math:`1 - \alpha` over the noise:

* :func:`smoothed_predict` -- PREDICT (the paper's Pseudocode): the top class, or abstain (-1)
  unless a two-sided binomial test separates it from the runner-up at level :math:`\alpha`;
* :func:`certify` -- CERTIFY: guess :math:`c_A` from ``n0`` samples, bound :math:`p_A` from below
  with ``n`` fresh samples (one-sided Clopper-Pearson, :func:`clopper_pearson_lower`), return the
  radius :func:`certified_radius`, or abstain when :math:`\underline{p_A} \le 1/2`;
* :func:`smoothed_certified_accuracy` -- the fraction of a dataset certified correct at radius ``r``.

Taught in the chapter *Randomised smoothing*.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from scipy.stats import beta, binom
from torch import Tensor, nn

from robustdl._checks import (
    check_fraction,
    check_images,
    check_labels,
    check_nonnegative,
    check_positive,
    check_positive_int,
)
from robustdl._model import batched_logits, check_model
from robustdl._random import normal

__all__ = [
    "ABSTAIN",
    "Certificate",
    "binomial_test_half",
    "certified_radius",
    "certify",
    "class_counts",
    "clopper_pearson_lower",
    "smoothed_certified_accuracy",
    "smoothed_predict",
]

#: The label that PREDICT and CERTIFY return when they abstain.
ABSTAIN = -1


class Certificate(NamedTuple):
    """What :func:`certify` returns for N examples, each a tensor of shape (N,).

    ``prediction``: the smoothed class :math:`c_A`, or :data:`ABSTAIN`; ``radius``: the certified
    L2 radius :math:`\\sigma\\Phi^{-1}(\\underline{p_A})` (0 where it abstains); ``p_lower``: the
    lower confidence bound :math:`\\underline{p_A}` (float64).
    """

    prediction: Tensor
    radius: Tensor
    p_lower: Tensor


def _check_alpha(alpha: object) -> float:
    alpha = check_fraction(alpha, "alpha")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie strictly between 0 and 1 (a significance level), got {alpha}")
    return alpha


def class_counts(
    model: nn.Module,
    x: Tensor,
    sigma: float,
    n: int,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""How often the base classifier picks each class under noise: :math:`\#\{i : f(x + \varepsilon_i) = c\}`.

    The paper's SAMPLEUNDERNOISE (Cohen et al. 2019 :cite:`cohen2019certified`, Section 3.2):
    for every example of ``x`` (N, ...), ``n`` draws :math:`\varepsilon_i \sim \mathcal N(0,
    \sigma^2 I)`, classified ``batch_size`` at a time. The noisy inputs are not clipped to [0, 1]
    (the theorem is about Gaussian noise on all of :math:`\mathbb R^d`). Returns int64 counts
    (N, K) on the model's device; draws come from ``generator`` (:mod:`robustdl._random`), so a
    seeded CPU generator gives the same counts on any device. Taught in *Randomised smoothing*.
    """
    check_model(model)
    check_images(x)
    sigma = check_positive(sigma, "sigma", "the noise's standard deviation")
    n, batch_size = check_positive_int(n, "n"), check_positive_int(batch_size, "batch_size")
    if len(x) == 0:
        raise ValueError("x must hold at least one example, got none")
    rows = []
    for example in x:
        counts = None
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            noisy = example + sigma * normal((m, *example.shape), example, generator)
            logits = batched_logits(model, noisy)
            if logits.dim() != 2 or logits.shape[1] < 2:
                raise ValueError(f"model must return logits (N, K) of K >= 2 classes, got shape {tuple(logits.shape)}; "
                                 "wrap a one-output (sigmoid) model to return the two logits (0, z)")
            hits = torch.bincount(logits.argmax(1), minlength=logits.shape[1])
            counts = hits if counts is None else counts + hits
        rows.append(counts)
    return torch.stack(rows)


def clopper_pearson_lower(successes: Tensor | int, n: int, alpha: float) -> Tensor:
    r"""The one-sided :math:`(1 - \alpha)` Clopper-Pearson lower bound on a binomial proportion.

    With :math:`k` successes in :math:`n` trials, :math:`\underline p = B^{-1}(\alpha; k, n - k + 1)`,
    the :math:`\alpha` quantile of a Beta distribution, and :math:`\underline p = 0` for :math:`k = 0`:
    :math:`\mathbb P(\underline p \le p) \ge 1 - \alpha` (Clopper and Pearson 1934), the
    LOWERCONFBOUND of CERTIFY in Cohen et al. (2019) :cite:`cohen2019certified`. ``successes``:
    an int or an integer tensor; returns a float64 tensor of its shape, on its device.
    """
    n = check_positive_int(n, "n")
    alpha = _check_alpha(alpha)
    k = torch.as_tensor(successes)
    if k.is_floating_point() or k.dtype == torch.bool:
        raise TypeError(f"successes must be integer counts, got dtype {k.dtype}")
    if k.numel() and (k.min() < 0 or k.max() > n):
        raise ValueError(f"successes must lie in [0, n={n}], got values in [{k.min().item()}, {k.max().item()}]")
    counts = k.cpu().double().numpy()
    bound = torch.from_numpy(np.asarray(beta.ppf(alpha, counts, n - counts + 1)))  # NaN where k = 0
    return torch.where(k.cpu() > 0, bound, torch.zeros((), dtype=torch.float64)).to(k.device)


def binomial_test_half(successes: Tensor, trials: Tensor) -> Tensor:
    r"""The two-sided p-value of the exact binomial test of :math:`p = 1/2`, for many tests at once.

    It is :math:`\min(1, 2\,\mathbb P(X \le \min(k, m - k)))`: :math:`X \sim \mathrm{Bin}(m, 1/2)` is
    symmetric, so the outcomes at most as likely as :math:`k` are the two tails beyond :math:`k` and
    :math:`m - k`. The BINOMPVALUE of PREDICT in Cohen et al. (2019) :cite:`cohen2019certified`
    (scipy's ``binomtest(k, m, 0.5).pvalue``). ``successes`` :math:`k` and ``trials`` :math:`m`: integer tensors of one
    shape; returns float64 p-values of that shape on the CPU.
    """
    k, m = successes.cpu().double().numpy(), trials.cpu().double().numpy()
    return torch.from_numpy(np.minimum(1.0, 2 * binom.cdf(np.minimum(k, m - k), m, 0.5)))


def certified_radius(p_lower: Tensor | float, sigma: float) -> Tensor:
    r"""The certified L2 radius of Theorem 1, :math:`R = \sigma\,\Phi^{-1}(\underline{p_A})`.

    Cohen et al. (2019) :cite:`cohen2019certified`, Theorem 1 with :math:`\overline{p_B} = 1 -
    \underline{p_A}`, as CERTIFY uses it. Where
    :math:`\underline{p_A} \le 1/2` nothing is certified and the radius is 0; it grows without
    bound as :math:`\underline{p_A} \to 1`. ``p_lower`` in [0, 1], a float or a tensor; returns a
    float64 tensor of its shape.
    """
    sigma = check_positive(sigma, "sigma", "the noise's standard deviation")
    p = torch.as_tensor(p_lower, dtype=torch.float64)
    if p.numel() and (p.isnan().any() or p.min() < 0 or p.max() > 1):
        raise ValueError(f"p_lower must lie in [0, 1], got values in [{p.min().item()}, {p.max().item()}]")
    return (sigma * torch.special.ndtri(p)).clamp_min(0.0)


def smoothed_predict(
    model: nn.Module,
    x: Tensor,
    sigma: float,
    n: int = 100,
    alpha: float = 0.001,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""PREDICT of Cohen et al. (2019) :cite:`cohen2019certified`: the smoothed class :math:`g(x)`, or abstain.

    Counts the base classifier's classes under ``n`` noise draws (:func:`class_counts`); returns
    the top class :math:`c_A` if a two-sided binomial test of :math:`n_A` against :math:`n_A + n_B`
    (the runner-up's count) at level ``alpha`` rejects :math:`p = 1/2`, and :data:`ABSTAIN` (-1)
    otherwise. The paper's Proposition 1: it returns a class other than :math:`g(x)` with
    probability at most ``alpha``. Returns int64 labels (N,) on the model's device. Taught in
    *Randomised smoothing*.
    """
    alpha = _check_alpha(alpha)
    counts = class_counts(model, x, sigma, n, batch_size, generator)
    top = counts.topk(2, dim=1)
    keep = binomial_test_half(top.values[:, 0], top.values.sum(1)).to(counts.device) <= alpha
    return torch.where(keep, top.indices[:, 0], torch.full_like(top.indices[:, 0], ABSTAIN))


def certify(
    model: nn.Module,
    x: Tensor,
    sigma: float,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
) -> Certificate:
    r"""CERTIFY of Cohen et al. (2019) :cite:`cohen2019certified`: the smoothed class and its certified L2 radius.

    For every example of ``x`` (N, ...): the top class :math:`\hat c_A` of ``n0`` noise draws
    (selection), then :math:`\underline{p_A}`, the one-sided Clopper-Pearson lower bound at
    :math:`1 - \alpha` (:func:`clopper_pearson_lower`) on how often :math:`\hat c_A` wins ``n``
    fresh draws (estimation). If :math:`\underline{p_A} > 1/2` it returns :math:`\hat c_A` and
    :math:`R = \sigma\,\Phi^{-1}(\underline{p_A})` (:func:`certified_radius`, Theorem 1), else
    :data:`ABSTAIN` and radius 0. With probability at least :math:`1 - \alpha` a returned class is
    :math:`g(x)` and :math:`g` is constant on the open L2 ball of radius :math:`R` (the paper's
    Proposition 2). The paper uses ``n0=100``, ``n=100000``, ``alpha=0.001``; the largest radius
    ``n`` samples can certify is :math:`\sigma\,\Phi^{-1}(\alpha^{1/n})`. Taught in *Randomised smoothing*.
    """
    alpha, n0 = _check_alpha(alpha), check_positive_int(n0, "n0")
    guess = class_counts(model, x, sigma, n0, batch_size, generator).argmax(1)
    counts = class_counts(model, x, sigma, n, batch_size, generator)
    p_lower = clopper_pearson_lower(counts.gather(1, guess.unsqueeze(1)).squeeze(1), n, alpha)
    prediction = torch.where(p_lower.to(guess.device) > 0.5, guess, torch.full_like(guess, ABSTAIN))
    return Certificate(prediction, certified_radius(p_lower, sigma), p_lower)  # radius 0 where p_lower <= 1/2


def smoothed_certified_accuracy(
    certificate: Certificate, y: Tensor, radius: float | Sequence[float]
) -> float | list[float]:
    r"""The certified accuracy of the smoothed classifier at L2 ``radius``: the fraction certified correct.

    An example counts if :func:`certify` returned its label ``y`` with a radius at least
    ``radius`` (Cohen et al. 2019 :cite:`cohen2019certified`, Section 4: "approximate certified
    test accuracy"); abstentions count as errors. ``radius``: a float, or several (then a list).
    Taught in *Randomised smoothing*.
    """
    if not isinstance(certificate, Certificate):
        raise TypeError(f"certificate must be a Certificate from certify(), got {type(certificate).__name__}")
    check_labels(y, certificate.prediction.unsqueeze(1))
    if len(y) == 0:
        raise ValueError("certificate must hold at least one example, got none")
    radii = [radius] if isinstance(radius, (int, float)) else list(radius)
    correct = certificate.prediction == y.to(certificate.prediction.device)
    out = []
    for r in radii:
        r = check_nonnegative(r, "radius")
        hits = correct & (certificate.radius.to(correct.device) >= r)
        out.append(hits.sum().item() / len(y))
    return out[0] if isinstance(radius, (int, float)) else out
