r"""Reliability assessment of a classifier from robustness and the operational profile (RAM).

The reliability assessment model of Zhao et al. (2021) :cite:`zhao2021assessing` (see also
Zhao et al. 2020 :cite:`zhao2020safety`) measures the *probability of misclassification per
input* (pmi) of the seed tutorial's Eq. (11),

.. math:: \lambda = \sum_{x \in \mathcal{D}} I_{\{x \text{ causes a failure}\}}(x)\, Op(x),

by partitioning the input space into cells :math:`c_i`, small enough that each holds one true
class (their radius follows the data's :math:`r`-separation, Yang et al. 2020
:cite:`yang2020closer`), and assembling the cells' *unastuteness*
:math:`\lambda_i = \Pr(\text{failure} \mid x \in c_i)` with the operational profile
:math:`Op_i = \Pr(x \in c_i)`:

.. math:: \lambda = \sum_i Op_i\, \lambda_i.

The pieces, one function each:

* :func:`r_separation` -- half the least distance between differently labelled points;
* :class:`Cells` -- Linf cells of radius :math:`\epsilon` on a grid: :func:`grid_cells` tiles a
  box (the 2-D examples), :func:`occupied_cells` keeps the cells holding data (a latent space);
* :func:`cell_labels` -- each cell's ground truth from the labelled data in it (none: *empty*,
  several classes: *cross*);
* :func:`operational_profile` -- :math:`Op_i` by kernel density estimation, with a bootstrap
  variance;
* :func:`cell_unastuteness` -- :math:`\lambda_i` by Monte Carlo sampling in the cell, with its
  variance (the paper's running example), and :func:`cell_robust` -- a 0/1 :math:`\lambda_i`
  by attack (PGD) or verification (CROWN) over the whole cell;
* :func:`estimate` -- ACU, :math:`\mathbb E[\lambda]`, :math:`\mathbb V[\lambda]` and the upper
  bound; :func:`assess` runs them all into a :class:`ReliabilityReport` (the columns of the
  paper's Table 1).

Cells may live in a latent space: an ``encoder`` maps images to it and a ``decoder`` maps cell
points back to images for the classifier, as the paper's MNIST and CIFAR-10 rows do with a VAE.
Taught in the chapter *Reliability assessment*.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm as normal
from torch import Tensor, nn

from robustdl._checks import check_fraction, check_labels, check_nonnegative, check_positive_int
from robustdl._model import accuracy, check_model, predict
from robustdl._random import uniform
from robustdl.attacks import pgd
from robustdl.threat import parse_norm
from robustdl.verify import certified

__all__ = [
    "CROSS",
    "EMPTY",
    "Cells",
    "OperationalProfile",
    "ReliabilityEstimate",
    "ReliabilityReport",
    "assess",
    "cell_labels",
    "cell_robust",
    "cell_unastuteness",
    "estimate",
    "grid_cells",
    "occupied_cells",
    "operational_profile",
    "r_separation",
]

#: Label of a cell that holds no labelled data: its truth is taken to be the model's majority vote.
EMPTY = -1
#: Label of a cell that holds data of two or more classes: conservatively, :math:`\lambda_i = 1`.
CROSS = -2

Map = Callable[[Tensor], Tensor]


def _check_points(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor of points (N, d)")
    if x.dim() != 2 or not len(x):
        raise ValueError(f"{name} must have shape (N, d) with N >= 1, got {tuple(x.shape)}")
    return x


def r_separation(x: Tensor, y: Tensor, p: str | float = "linf", chunk: int = 1024) -> float:
    r"""The :math:`r`-separation of labelled points, Yang et al. (2020) :cite:`yang2020closer` (Def. 1).

    The data are :math:`r`-separated if :math:`\mathrm{dist}(x, x') \ge 2r` whenever
    :math:`x, x'` carry different labels; the largest such :math:`r` is

    .. math:: r = \tfrac12 \min_{y_i \ne y_j} \|x_i - x_j\|_p,

    computed with ``torch.cdist`` ``chunk`` rows at a time over the flattened points.
    Returns ``inf`` if all labels agree.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise TypeError("x must be a floating torch.Tensor of shape (N, ...)")
    check_labels(y, x)
    chunk = check_positive_int(chunk, "chunk")
    flat = x.flatten(1)
    best = math.inf
    for rows, labels in zip(flat.split(chunk), y.split(chunk), strict=True):
        dist = torch.cdist(rows, flat, p=parse_norm(p))
        dist = dist.masked_fill(labels[:, None] == y[None, :], math.inf)
        best = min(best, dist.min().item())
    return best / 2


@dataclass(frozen=True)
class Cells:
    r"""Linf cells :math:`\{z : \|z - c_i\|_\infty \le \epsilon\}` on a grid of spacing :math:`2\epsilon`.

    ``keys`` (M, d) are the cells' integer grid coordinates from ``origin``: cell :math:`i` is the box
    :math:`\mathrm{origin} + 2\epsilon\,[k_i, k_i + 1)`.
    """

    keys: Tensor
    origin: Tensor
    radius: float

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def centres(self) -> Tensor:
        """The cells' centres (M, d), on the device and of the dtype of ``origin``."""
        return self.origin + (self.keys.to(self.origin) + 0.5) * 2 * self.radius

    def key_of(self, z: Tensor) -> Tensor:
        """The grid coordinates (N, d) of the cell holding each point of ``z``."""
        return torch.floor((z - self.origin) / (2 * self.radius)).long()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` uniform points of each cell, shape (M, n, d), on ``origin``'s device (any ``generator``)."""
        u = uniform((len(self), n, self.keys.shape[1]), self.origin, generator)
        return self.centres[:, None, :] + (2 * u - 1) * self.radius

    def subset(self, index: Tensor) -> Cells:
        """The cells selected by ``index`` (e.g. the top-k by operational profile)."""
        return Cells(self.keys[index.to(self.keys.device)], self.origin, self.radius)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Cells:
        """The same cells with their keys on ``device`` and their origin on ``device`` and of ``dtype``."""
        return Cells(self.keys.to(device), self.origin.to(device=device, dtype=dtype), self.radius)


def grid_cells(low: float, high: float, per_dim: int, dim: int = 2, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> Cells:
    """The ``per_dim ** dim`` cells tiling the box ``[low, high]^dim``, radius ``(high - low) / (2 per_dim)``.

    Their origin has ``dtype``; keys and origin lie on ``device`` (default the CPU).
    """
    per_dim = check_positive_int(per_dim, "per_dim")
    if not high > low:
        raise ValueError(f"high must exceed low, got low={low}, high={high}")
    axes = [torch.arange(per_dim, device=device)] * dim
    keys = torch.cartesian_prod(*axes).reshape(-1, dim)
    return Cells(keys, torch.full((dim,), float(low), dtype=dtype, device=device), (high - low) / (2 * per_dim))


def occupied_cells(z: Tensor, radius: float, origin: Tensor | None = None) -> Cells:
    """The cells of radius ``radius`` (grid from ``origin``, default 0) that hold at least one point of ``z``."""
    z = _check_points(z, "z")
    radius = check_nonnegative(radius, "radius")
    if radius == 0:
        raise ValueError("radius must be > 0")
    origin = torch.zeros(z.shape[1], dtype=z.dtype, device=z.device) if origin is None else origin
    keys = torch.unique(torch.floor((z - origin) / (2 * radius)).long(), dim=0)
    return Cells(keys, origin, radius)


def _cell_index(cells: Cells, z: Tensor) -> Tensor:
    """The index of the cell holding each point of ``z`` (N,), -1 where no cell does."""
    both = torch.cat([cells.keys.to(z.device), cells.key_of(z)])
    _, inverse = torch.unique(both, dim=0, return_inverse=True)
    slot = torch.full((int(inverse.max()) + 1,), -1, dtype=torch.long, device=z.device)
    slot[inverse[: len(cells)]] = torch.arange(len(cells), device=z.device)
    return slot[inverse[len(cells):]]


def cell_labels(cells: Cells, z: Tensor, y: Tensor) -> Tensor:
    """Each cell's ground-truth label from the labelled points ``(z, y)`` it holds (M,).

    One class in the cell: that class; no point: :data:`EMPTY`; two classes or more:
    :data:`CROSS` (the cell is too large for the data's separation), as in :cite:`zhao2021assessing`.
    """
    z = _check_points(z, "z")
    check_labels(y, z)
    index = _cell_index(cells, z)
    inside = index >= 0
    index, y = index[inside], y[inside]
    low = torch.full((len(cells),), torch.iinfo(torch.long).max, dtype=torch.long, device=z.device)
    high = torch.full((len(cells),), -1, dtype=torch.long, device=z.device)
    low = low.scatter_reduce(0, index, y.long(), "amin")
    high = high.scatter_reduce(0, index, y.long(), "amax")
    labels = torch.where(high < 0, EMPTY, low)
    return torch.where((high >= 0) & (low != high), CROSS, labels)


@dataclass(frozen=True)
class OperationalProfile:
    r"""The cells' probabilities :math:`Op_i` (M,), summing to 1, their bootstrap variances, and the KDE bandwidth."""

    op: Tensor
    var: Tensor
    bandwidth: float


def _kde(z: np.ndarray, bandwidth: float | None, cv_points: int = 2000) -> object:
    """A Gaussian KDE; the bandwidth by 5-fold cross-validated log-likelihood when not given.

    The search runs on at most ``cv_points`` points (a fixed subsample) and its bandwidth is
    rescaled by :math:`(m / n)^{1/(d+4)}`, the rate at which the optimal bandwidth shrinks with
    the sample size :math:`n` in :math:`d` dimensions.
    """
    from sklearn.model_selection import GridSearchCV
    from sklearn.neighbors import KernelDensity

    if bandwidth is None:
        sub = z[np.random.default_rng(0).permutation(len(z))[:cv_points]]
        grid = {"bandwidth": float(sub.std(0).mean()) * np.logspace(-2, 0, 12)}
        best = GridSearchCV(KernelDensity(kernel="gaussian"), grid, cv=5).fit(sub).best_params_["bandwidth"]
        bandwidth = best * (len(sub) / len(z)) ** (1 / (z.shape[1] + 4))
    return KernelDensity(kernel="gaussian", bandwidth=bandwidth).fit(z)


def operational_profile(cells: Cells, z: Tensor, bandwidth: float | None = None, bootstrap: int = 0,
                        seed: int = 0) -> OperationalProfile:
    r"""The cells' operational profile by Gaussian kernel density estimation, :cite:`zhao2021assessing` (Sec. 4.1).

    A KDE :math:`\hat p` fitted to the operational data ``z`` (in the cells' space) gives
    :math:`Op_i \propto \hat p(c_i)` at each cell's centre, normalised over the given cells (all
    cells have the same volume). The bandwidth is chosen by 5-fold cross-validation of the
    held-out log-likelihood (on a subsample of at most 2,000 points) unless given. With
    ``bootstrap`` :math:`B > 0`, :math:`B` KDEs fitted on resamples of half the data give
    :math:`\mathbb V[Op_i]` (the sample variance of their densities, scaled by the same
    normaliser), as the paper's tool does; else the variances are 0.
    """
    z = _check_points(z, "z")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"bootstrap must be an integer >= 0, got {bootstrap!r}")
    if bandwidth is not None:
        bandwidth = check_nonnegative(bandwidth, "bandwidth")
    data = z.detach().cpu().double().numpy()
    centres = cells.centres.detach().cpu().double().numpy()
    kde = _kde(data, bandwidth)
    density = np.exp(kde.score_samples(centres))
    scale = density.sum()
    if scale <= 0:
        raise ValueError("the KDE gives every cell zero density: are the cells in the data's space?")
    var = np.zeros_like(density)
    if bootstrap:
        rng = np.random.default_rng(seed)
        draws = [np.exp(_kde(data[rng.integers(0, len(data), len(data) // 2)], kde.bandwidth).score_samples(centres))
                 for _ in range(bootstrap)]
        var = np.var(draws, axis=0, ddof=1) / scale**2 if bootstrap > 1 else var
    like = cells.origin
    return OperationalProfile(like.new_tensor(density / scale), like.new_tensor(var), float(kde.bandwidth))


def _predict(model: nn.Module, x: Tensor, decoder: Map | None, batch_size: int) -> Tensor:
    """:func:`~robustdl.predict` of ``x``, mapped first through ``decoder`` in chunks when given."""
    if decoder is None:
        return predict(model, x, batch_size)
    with torch.no_grad():
        return torch.cat([predict(model, decoder(xb)) for xb in x.split(batch_size)])


def cell_unastuteness(model: nn.Module, cells: Cells, labels: Tensor, samples: int = 100,
                      decoder: Map | None = None, generator: torch.Generator | None = None,
                      batch_size: int = 4096) -> tuple[Tensor, Tensor]:
    r"""Each cell's unastuteness :math:`\lambda_i` by Monte Carlo, and its variance, :cite:`zhao2021assessing`.

    With :math:`n` = ``samples`` uniform points :math:`x_1, \dots, x_n` of cell :math:`c_i` (mapped
    through ``decoder`` when the cells are latent), :math:`\hat\lambda_i = \frac1n \sum_k
    I\{f(x_k) \ne y_i\}` and :math:`\mathbb V[\hat\lambda_i] = s^2 / n` with :math:`s^2` the sample
    variance of the indicators. An :data:`EMPTY` cell's label :math:`y_i` is the model's majority
    vote in it; a :data:`CROSS` cell gets :math:`\hat\lambda_i = 1`, variance 0. Returns (M,), (M,).
    """
    check_model(model)
    samples = check_positive_int(samples, "samples")
    if labels.shape != (len(cells),):
        raise ValueError(f"labels must have one entry per cell, shape ({len(cells)},), got {tuple(labels.shape)}")
    points = cells.sample(samples, generator)
    pred = _predict(model, points.flatten(0, 1), decoder, batch_size).view(len(cells), samples)
    labels = labels.to(pred.device)
    truth = torch.where(labels == EMPTY, pred.mode(1).values, labels)
    fail = (pred != truth[:, None]).to(cells.origin.dtype)
    lam = fail.mean(1)
    var = fail.var(1) / samples if samples > 1 else torch.zeros_like(lam)
    cross = labels == CROSS
    return torch.where(cross, 1.0, lam), torch.where(cross, 0.0, var)


def cell_robust(model: nn.Module, cells: Cells, labels: Tensor, method: str = "attack", steps: int = 20) -> Tensor:
    r"""Whether the model is astute on each whole cell (M,) bool: right and robust everywhere in it.

    Cell :math:`c_i` is the Linf ball of radius :math:`\epsilon` around its centre (within the
    [0, 1] box), so astuteness (Yang et al. 2020 :cite:`yang2020closer`) on it is local robustness
    at the centre with the cell's label :math:`y_i` (an :data:`EMPTY` cell's: the prediction at
    the centre). ``method="attack"`` declares the cell unastute if the centre is misclassified or
    PGD (:func:`robustdl.attacks.pgd`, ``steps`` steps) finds a counterexample -- an optimistic
    verdict; ``method="verify"`` declares it astute only if CROWN certifies it
    (:func:`robustdl.verify.certified`) -- a sound, pessimistic one. :data:`CROSS` cells are never
    astute. Then :math:`\lambda_i = 1 - \mathrm{robust}_i` is a 0/1 unastuteness. Cells in the
    input space only (no decoder).
    """
    check_model(model)
    if method not in ("attack", "verify"):
        raise ValueError(f"method must be 'attack' or 'verify', got {method!r}")
    if labels.shape != (len(cells),):
        raise ValueError(f"labels must have one entry per cell, shape ({len(cells)},), got {tuple(labels.shape)}")
    centres = cells.centres
    pred = _predict(model, centres, None, 4096)
    labels = labels.to(pred.device)
    truth = torch.where(labels < 0, pred, labels)  # EMPTY; CROSS cells are masked below
    if method == "verify":
        robust = certified(model, centres, truth, cells.radius)
    else:
        x_adv = pgd(model, centres, truth, eps=cells.radius, steps=steps, restarts=1)
        robust = (pred == truth) & (_predict(model, x_adv, None, 4096) == truth)
    return robust & (labels != CROSS)


@dataclass(frozen=True)
class ReliabilityEstimate:
    r"""ACU, :math:`\mathbb E[\lambda]`, :math:`\mathbb V[\lambda]` and the one-sided upper bound at ``confidence``."""

    acu: float
    mean: float
    var: float
    upper: float
    confidence: float


def estimate(op: Tensor, lam: Tensor, op_var: Tensor | None = None, lam_var: Tensor | None = None,
             confidence: float = 0.975) -> ReliabilityEstimate:
    r"""The pmi estimates of Zhao et al. (2021) :cite:`zhao2021assessing` (Sec. 4).

    * ACU, the average cell unastuteness :math:`\frac1M \sum_i \lambda_i` (the profile ignored);
    * :math:`\mathbb E[\lambda] = \sum_i Op_i\,\lambda_i`;
    * :math:`\mathbb V[\lambda] = \sum_i Op_i^2\, \mathbb V[\lambda_i] + \lambda_i^2\, \mathbb V[Op_i]
      + \mathbb V[\lambda_i]\, \mathbb V[Op_i]` (the variance of a sum of products of independent
      estimates);
    * :math:`Ub = \mathbb E[\lambda] + z_{c}\sqrt{\mathbb V[\lambda]}`, the normal upper bound at
      confidence :math:`c` (their Table 1 uses :math:`c = 97.5\%`).
    """
    confidence = check_fraction(confidence, "confidence")
    if op.shape != lam.shape or op.dim() != 1:
        raise ValueError(f"op and lam must be vectors of the same length, got {tuple(op.shape)} and {tuple(lam.shape)}")
    op, lam = op.double(), lam.double().to(op.device)
    op_var = torch.zeros_like(op) if op_var is None else op_var.double().to(op.device)
    lam_var = torch.zeros_like(op) if lam_var is None else lam_var.double().to(op.device)
    mean = (op * lam).sum().item()
    var = (op**2 * lam_var + lam**2 * op_var + lam_var * op_var).sum().item()
    upper = mean + float(normal.ppf(confidence)) * math.sqrt(var)
    return ReliabilityEstimate(lam.mean().item(), mean, var, upper, confidence)


@dataclass(frozen=True)
class ReliabilityReport:
    """The columns of Table 1 of :cite:`zhao2021assessing`, and the per-cell estimates behind them."""

    train_error: float
    test_error: float
    r_separation: float
    radius: float
    cells: int
    estimate: ReliabilityEstimate
    seconds_per_cell: float
    lam: Tensor
    lam_var: Tensor

    def row(self) -> dict[str, float]:
        """One row of Table 1 as a dict."""
        e = self.estimate
        return {"train error": self.train_error, "test error": self.test_error, "r-separation": self.r_separation,
                "cell radius": self.radius, "cells": self.cells, "ACU": e.acu, "E[lambda]": e.mean,
                "Var[lambda]": e.var, f"Ub{100 * e.confidence:g}%": e.upper, "s per cell": self.seconds_per_cell}


def assess(model: nn.Module, cells: Cells, profile: OperationalProfile, x_train: Tensor, y_train: Tensor,
           x_test: Tensor, y_test: Tensor, encoder: Map | None = None, decoder: Map | None = None,
           samples: int = 100, confidence: float = 0.975,
           generator: torch.Generator | None = None) -> ReliabilityReport:
    r"""The reliability assessment model of Zhao et al. (2021) :cite:`zhao2021assessing` end to end.

    Labels the cells from the training data (mapped to the cells' space by ``encoder``), measures
    each cell's unastuteness by Monte Carlo (:func:`cell_unastuteness`, ``samples`` points per
    cell, through ``decoder``), and assembles them with ``profile`` (:func:`estimate`). Also
    reports the train and test errors, the :math:`r`-separation of the training data in the cells'
    space, and the sampling time per cell: the columns of their Table 1.
    """
    if profile.op.shape != (len(cells),):
        raise ValueError(f"profile has {profile.op.numel()} cells but cells has {len(cells)}")
    with torch.no_grad():
        z_train = x_train if encoder is None else encoder(x_train)
    z_train = z_train.flatten(1)
    labels = cell_labels(cells, z_train, y_train)
    start = time.perf_counter()
    lam, lam_var = cell_unastuteness(model, cells, labels, samples, decoder, generator)
    seconds = (time.perf_counter() - start) / len(cells)
    return ReliabilityReport(
        train_error=1 - accuracy(model, x_train, y_train, 4096),
        test_error=1 - accuracy(model, x_test, y_test, 4096),
        r_separation=r_separation(z_train, y_train),
        radius=cells.radius,
        cells=len(cells),
        estimate=estimate(profile.op, lam, profile.var, lam_var, confidence),
        seconds_per_cell=seconds,
        lam=lam,
        lam_var=lam_var,
    )
