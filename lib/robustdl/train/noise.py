r"""Training under Gaussian noise, the base classifier of randomised smoothing.

A smoothed classifier :math:`g(x) = \arg\max_c \mathbb P(f(x + \varepsilon) = c)` certifies large
radii only if the base classifier :math:`f` is right most of the time *under* noise; Cohen et al.
(2019) train it on noisy copies of the data. The smoothed classifier and its certificates are in
:mod:`robustdl.verify.smoothing`. Taught in the chapter *Randomised smoothing*.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from robustdl._checks import check_positive
from robustdl._random import normal

__all__ = ["gaussian_noise_loss"]


def gaussian_noise_loss(model: nn.Module, x: Tensor, y: Tensor, sigma: float = 0.25) -> Tensor:
    r"""Gaussian data augmentation, Cohen et al. (2019) :cite:`cohen2019certified`, Section 4 (Training).

    The mean cross-entropy on one noisy copy of each example,
    :math:`\frac1N \sum_i J(\theta, x_i + \varepsilon_i, y_i)`, :math:`\varepsilon_i \sim
    \mathcal N(0, \sigma^2 I)`, with the same :math:`\sigma` as the smoothing that will certify
    the model. The noisy input is not clipped to [0, 1], as in the paper. Noise is drawn from
    PyTorch's global generator on ``x``'s device (seeded by :func:`~robustdl.train.seed_everything`).
    """
    sigma = check_positive(sigma, "sigma", "the noise's standard deviation")
    return F.cross_entropy(model(x + sigma * normal(x.shape, x)), y)
