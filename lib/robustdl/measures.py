r"""Generalisation measures: the complexity measures of the tutorial's Table 1 (average weight
correlation among them), the (robust) generalisation error, and Kendall's rank correlation.

Taught in the chapter *Robustness vs generalisation* (``book/04-generalisation``). The measures
follow Jin et al. (2020), :cite:`jin2020does`, and the PAC-Bayes sharpness search of Jiang et al.
(2020), :cite:`jiang2020fantastic`; layers, neurons, weight correlation and operator norms are
those of :mod:`robustdl.layers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from robustdl._checks import check_labels, check_positive_int
from robustdl._model import accuracy, batched_logits
from robustdl._random import normal
from robustdl.layers import layer_input_shapes, operator_norm, weight_correlation, weighted_layers
from robustdl.losses import cross_entropy

__all__ = [
    "KendallTau",
    "average_weight_correlation",
    "complexity_measures",
    "correlation_term",
    "generalisation_error",
    "kendall_tau",
    "pac_bayes",
    "pac_bayes_sigma",
    "robust_generalisation_error",
]

Data = tuple[Tensor, Tensor]
Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]


def average_weight_correlation(model: nn.Module) -> float:
    r"""WC of the tutorial's Table 1: :math:`\frac1L \sum_l \rho(W_l)` over the model's layers."""
    with torch.no_grad():
        return torch.stack([weight_correlation(m.weight) for m in weighted_layers(model)]).mean().item()


def _error(model: nn.Module, data: Data, batch_size: int = 1000) -> float:
    return 1 - accuracy(model, *data, batch_size=batch_size)


def _mean_cross_entropy(model: nn.Module, data: Data, batch_size: int) -> float:
    """The mean cross-entropy of ``model`` on ``data`` = (x, y), in eval mode, on the model's device."""
    x, y = data
    check_labels(y, x)
    logits = batched_logits(model, x, batch_size)
    return cross_entropy(logits, y.to(logits.device)).double().mean().item()


@torch.no_grad()
def _perturbed_error(model: nn.Module, data: Data, sigma: float, samples: int, generator: torch.Generator) -> float:
    """Mean training error of ``model`` with every parameter moved by N(0, sigma^2) noise."""
    params = list(model.parameters())
    originals = [p.detach().clone() for p in params]
    errors = []
    try:
        for _ in range(samples):
            for p, p0 in zip(params, originals, strict=True):
                noise = normal(p0.shape, p0, generator)
                p.copy_(p0 + sigma * noise)
            errors.append(_error(model, data))
    finally:
        for p, p0 in zip(params, originals, strict=True):
            p.copy_(p0)
    return sum(errors) / samples


def pac_bayes_sigma(model: nn.Module, data: Data, deviation: float = 0.1, samples: int = 4,
                    bisections: int = 12, bounds: tuple[float, float] = (1e-4, 1.0), seed: int = 0) -> float:
    r"""The sharpness search of Jiang et al. (2020), :cite:`jiang2020fantastic`: the largest
    :math:`\sigma` such that perturbing every parameter by :math:`\mathcal N(0, \sigma^2)` raises the
    training error by at most ``deviation`` (their 0.1) on average over ``samples`` draws; by
    bisection on :math:`\log\sigma` within ``bounds``. One :math:`\sigma` for all layers, as theirs.
    """
    was_training = model.training
    model.eval()
    base = _error(model, data)
    generator = torch.Generator().manual_seed(seed)
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    try:
        for _ in range(check_positive_int(bisections, "bisections")):
            mid = (lo + hi) / 2
            if _perturbed_error(model, data, math.exp(mid), samples, generator) - base <= deviation:
                lo = mid
            else:
                hi = mid
    finally:
        model.train(was_training)
    return math.exp(lo)


def pac_bayes(model: nn.Module, init_model: nn.Module, sigma: float) -> float:
    r"""PB of the tutorial's Table 1, the KL term of McAllester's bound (:cite:`mcallester1999pac`)
    for the prior :math:`\mathcal N(\theta^0, \sigma^2 I)` and posterior :math:`\mathcal N(\theta^F, \sigma^2 I)`:
    :math:`\sum_\ell \|\theta^0_\ell - \theta^F_\ell\|_{Fr}^2 / 2\sigma^2`."""
    return sum(((m0.weight - m.weight).detach().pow(2).sum() / (2 * sigma**2)).item()
               for m, m0 in zip(weighted_layers(model), weighted_layers(init_model), strict=True))


def correlation_term(weight: Tensor) -> float:
    r"""The weight-correlation term :math:`g(w_\ell)` that lifts PB to PBC (Jin et al. 2020,
    :cite:`jin2020does`), as we read their construction: the posterior covariance of a layer couples
    its :math:`N_\ell` neurons through the equicorrelation matrix :math:`R(\rho)` (ones on the
    diagonal, :math:`\rho = \rho(W_\ell)` off it) for each of the :math:`N_{\ell-1}` inputs, and the KL
    divergence to the isotropic prior gains

    .. math:: g(w_\ell) = -\frac{N_{\ell-1}}{2} \log\det R(\rho)
              = -\frac{N_{\ell-1}}{2} \big[(N_\ell - 1)\log(1-\rho) + \log(1 + (N_\ell - 1)\rho)\big] \ \ge 0,

    zero for uncorrelated neurons and growing with :math:`\rho`.
    """
    n, fan_in = weight.shape[0], weight[0].numel()
    rho = min(weight_correlation(weight.detach()).item(), 1 - 1e-12)
    return -fan_in / 2 * ((n - 1) * math.log1p(-rho) + math.log1p((n - 1) * rho))


def complexity_measures(model: nn.Module, init_model: nn.Module, train_data: Data, input_shape: tuple[int, ...],
                        sigma: float | None = None) -> dict[str, float]:
    r"""The complexity measures of the tutorial's Table 1 (Jin et al. 2020, :cite:`jin2020does`) for a
    network trained from ``init_model`` to ``model``, over their Linear/Conv2d weights:

    * PFN :math:`\prod_\ell \|\theta^F_\ell\|_{Fr}` and PSN :math:`\prod_\ell \|\theta^F_\ell\|_2`
      (spectral norms of convolutions as operators, :func:`~robustdl.layers.operator_norm`);
    * NoP, the number of parameters; SoSP, NoP :math:`\times \sum_\ell \|\theta^0_\ell - \theta^F_\ell\|_2`;
    * PB (:func:`pac_bayes`, with :math:`\sigma` from :func:`pac_bayes_sigma` on ``train_data`` unless
      given) and PBC, PB :math:`+ \sum_\ell g(w_\ell)` (:func:`correlation_term`);
    * WC, :func:`average_weight_correlation`.

    Also returned: ``sigma``, the sharpness :math:`\sigma` used.
    """
    layers, initial = weighted_layers(model), weighted_layers(init_model)
    shapes = layer_input_shapes(model, input_shape)
    sigma = pac_bayes_sigma(model, train_data) if sigma is None else sigma
    nop = sum(p.numel() for p in model.parameters())
    pb = pac_bayes(model, init_model, sigma)
    with torch.no_grad():
        return {
            "PFN": math.prod(m.weight.norm().item() for m in layers),
            "PSN": math.prod(operator_norm(m, shapes[m]) for m in layers),
            "NoP": float(nop),
            "SoSP": nop * sum(operator_norm(m, shapes[m], weight=m0.weight - m.weight)
                              for m, m0 in zip(layers, initial, strict=True)),
            "PB": pb,
            "PBC": pb + sum(correlation_term(m.weight) for m in layers),
            "WC": average_weight_correlation(model),
            "sigma": sigma,
        }


def generalisation_error(model: nn.Module, train: Data, test: Data, batch_size: int = 500) -> float:
    r"""GE of the tutorial: :math:`|\,l(f_\theta(S), Y) - \hat l(f_\theta(S_d), Y_d)\,|`, the cross-entropy on
    ``test`` (standing for the distribution) minus that on the training set ``train``
    (the mean over each set, in eval mode, as :func:`~robustdl.train.evaluate` reports it)."""
    test_loss, train_loss = (_mean_cross_entropy(model, d, batch_size) for d in (test, train))
    return abs(test_loss - train_loss)


def robust_generalisation_error(model: nn.Module, train: Data, test: Data, attack: Attack,
                                batch_size: int = 500) -> float:
    r"""RGE of the tutorial: the generalisation error between the adversarial examples ``attack``
    finds for the test set and for the training set, :cite:`schmidt2018adversarially`."""
    device = next(model.parameters()).device

    def adversarial(data: Data) -> Data:
        x, y = data
        return torch.cat([attack(model, x[i:i + batch_size].to(device), y[i:i + batch_size].to(device))
                          for i in range(0, len(x), batch_size)]), y.to(device)
    return generalisation_error(model, adversarial(train), adversarial(test), batch_size)


class KendallTau(NamedTuple):
    """Kendall's rank correlation and its pair counts."""

    tau: float
    concordant: int
    discordant: int


def kendall_tau(a: object, b: object) -> KendallTau:
    r"""Kendall's :math:`\tau` between two rankings (sequences, arrays, tensors on any device or pandas columns), as the
    tutorial's Table 2 ranks measures against the generalisation error: over the pairs
    :math:`i < j`, :math:`C` pairs ordered alike by ``a`` and ``b``, :math:`D` ordered oppositely, and

    .. math:: \tau = \frac{C - D}{\sqrt{(n_0 - t_a)(n_0 - t_b)}},

    with :math:`n_0` the number of pairs and :math:`t_a, t_b` the pairs tied in ``a`` or ``b``
    (:math:`\tau_b`, which is :math:`(C - D)/(C + D)` without ties, the table's value).
    """
    x, y = (torch.from_numpy(np.array(v.detach().cpu().numpy() if isinstance(v, Tensor) else v, dtype=np.float64))
            .flatten() for v in (a, b))
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"a and b need the same length, at least 2, got {len(x)} and {len(y)}")
    i, j = torch.triu_indices(len(x), len(x), offset=1)
    sa, sb = torch.sign(x[i] - x[j]), torch.sign(y[i] - y[j])
    concordant, discordant = int((sa * sb > 0).sum()), int((sa * sb < 0).sum())
    pairs = len(i)
    denominator = math.sqrt((pairs - int((sa == 0).sum())) * (pairs - int((sb == 0).sum())))
    tau = (concordant - discordant) / denominator if denominator else float("nan")
    return KendallTau(tau, concordant, discordant)
