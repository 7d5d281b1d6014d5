r"""Structural test coverage of neural networks: neuron, k-multisection, boundary and sign-sign coverage.

A *neuron* here is an output of an ``nn.ReLU`` module of the model, read with forward hooks:
a unit of a fully connected layer, or a channel of a convolutional layer, whose value is the
channel's spatial mean (as DeepXplore does for convolutions, :cite:`pei2017deepxplore`). Layers
are the ReLU modules in the order they run; a model must call each ``nn.ReLU`` module once per
forward pass (every model of :mod:`robustdl.models` does). :func:`activations` also keeps each
neuron's *pre-activation* (the ReLU's input), which :mod:`robustdl.verify.testgen` climbs.

* :func:`neuron_coverage` -- Pei et al. (2017) :cite:`pei2017deepxplore`;
* :func:`kmultisection_coverage` and :func:`boundary_coverage` -- DeepGauge, Ma et al. (2018)
  :cite:`ma2018deepgauge`, against an :func:`activation_profile` of the training set;
* :func:`sign_sign_coverage` -- the SS-coverage of neuron pairs in adjacent layers, Sun et al.
  (2019) :cite:`sun2019structural`, as stated in the seed tutorial.

Each criterion returns a :class:`Coverage`: the number of covered items, their total, and a
boolean mask over the items. Every criterion is monotone: adding tests never lowers it.
Taught in the chapter *Testing neural networks*.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustdl._checks import check_images, check_nonnegative, check_positive_int
from robustdl._model import check_model, eval_mode

__all__ = [
    "ActivationProfile",
    "Activations",
    "Coverage",
    "activation_profile",
    "activations",
    "boundary_coverage",
    "kmultisection_coverage",
    "neuron_coverage",
    "sign_sign_coverage",
]


@dataclass(frozen=True)
class Coverage:
    """``covered`` of ``total`` items (neurons, sections, corners or neuron pairs) are covered.

    ``mask`` marks the covered items; its shape is the criterion's (e.g. ``(neurons,)`` for
    neuron coverage, ``(neurons, k)`` for k-multisection coverage).
    """

    covered: int
    total: int
    mask: Tensor

    @property
    def ratio(self) -> float:
        """The fraction ``covered / total`` (0 when there is nothing to cover)."""
        return self.covered / self.total if self.total else 0.0

    @classmethod
    def of(cls, mask: Tensor) -> Coverage:
        """The coverage whose covered items are the true entries of ``mask``."""
        return cls(int(mask.sum()), mask.numel(), mask)


@dataclass(frozen=True)
class Activations:
    """Per-layer neuron values of a batch: ``post[l]`` and ``pre[l]`` have shape (N, neurons of layer l).

    ``logits`` is the model's output on the batch.
    """

    post: list[Tensor]
    pre: list[Tensor]
    logits: Tensor

    def flat(self) -> Tensor:
        """All neurons side by side, shape (N, total neurons)."""
        return torch.cat(self.post, dim=1)


def _neurons(t: Tensor) -> Tensor:
    """(N, C, ...) -> (N, C): a channel's spatial mean; (N, D) stays as it is."""
    return t.flatten(2).mean(2) if t.dim() > 2 else t


def activations(model: nn.Module, x: Tensor, grad: bool = False) -> Activations:
    """Run ``model`` on ``x`` in eval mode and read every ``nn.ReLU`` module's input and output.

    With ``grad=True`` the values stay on the autograd graph (for test generation).
    """
    check_model(model)
    check_images(x)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError(f"model has no nn.ReLU modules to cover: {type(model).__name__}")
    post: list[Tensor] = []
    pre: list[Tensor] = []

    def hook(_module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        pre.append(_neurons(inputs[0]))
        post.append(_neurons(output))

    handles = [m.register_forward_hook(hook) for m in relus]
    try:
        with eval_mode(model), torch.set_grad_enabled(grad):
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    if len(post) != len(relus):
        raise ValueError(f"each nn.ReLU module must run once per forward pass, got {len(post)} calls of {len(relus)}")
    return Activations(post, pre, logits)


def _scaled(layer: Tensor) -> Tensor:
    """DeepXplore's per-input scaling of a layer's outputs to [0, 1]: (v - min) / (max - min)."""
    low, high = layer.amin(1, keepdim=True), layer.amax(1, keepdim=True)
    return (layer - low) / (high - low).clamp_min(torch.finfo(layer.dtype).tiny)


def neuron_coverage(model: nn.Module, x: Tensor, threshold: float = 0.0, scaled: bool = True) -> Coverage:
    r"""Neuron coverage of Pei et al. (2017), :cite:`pei2017deepxplore` (Sec. 4.1, Def. 1).

    .. math:: \mathrm{NCov}(T) = \frac{|\{n : \exists x \in T,\ \mathrm{out}(n, x) > t\}|}{|N|}

    With ``scaled=True`` (DeepXplore's code), :math:`\mathrm{out}(n, x)` is the neuron's value
    scaled per input and per layer to [0, 1] by the layer's minimum and maximum, so that one
    threshold :math:`t` serves every layer; with ``scaled=False`` it is the raw ReLU output.
    Returns the coverage over neurons, mask of shape (neurons,).
    """
    threshold = check_nonnegative(threshold, "threshold")
    layers = activations(model, x).post
    values = torch.cat([_scaled(v) if scaled else v for v in layers], dim=1)
    return Coverage.of((values > threshold).any(0))


@dataclass(frozen=True)
class ActivationProfile:
    """Each neuron's range ``[low, high]`` on the training set, shapes (neurons,) (DeepGauge Sec. 3.1)."""

    low: Tensor
    high: Tensor


def activation_profile(model: nn.Module, x_train: Tensor, batch_size: int = 1000) -> ActivationProfile:
    """The per-neuron minimum and maximum of the ReLU outputs over ``x_train``, :cite:`ma2018deepgauge`."""
    check_images(x_train, "x_train")
    batch_size = check_positive_int(batch_size, "batch_size")
    if not len(x_train):
        raise ValueError("x_train must hold at least one input")
    values = torch.cat([activations(model, xb).flat() for xb in x_train.split(batch_size)])
    return ActivationProfile(values.amin(0), values.amax(0))


def _check_profile(profile: object, neurons: int) -> ActivationProfile:
    if not isinstance(profile, ActivationProfile):
        raise TypeError(f"profile must be an ActivationProfile (see activation_profile), got {type(profile).__name__}")
    if profile.low.shape != (neurons,):
        raise ValueError(f"profile has {profile.low.numel()} neurons but the model has {neurons}")
    return profile


def kmultisection_coverage(model: nn.Module, x: Tensor, profile: ActivationProfile, k: int = 10) -> Coverage:
    r"""k-multisection neuron coverage (KMNC) of DeepGauge, :cite:`ma2018deepgauge` (Sec. 3.1).

    Each neuron's training range :math:`[\mathrm{low}_n, \mathrm{high}_n]` is cut into
    :math:`k` equal sections :math:`S^n_1, \dots, S^n_k`;

    .. math:: \mathrm{KMNC}(T, k) = \frac{\sum_n |\{S^n_i : \exists x \in T,\ \phi(x, n) \in S^n_i\}|}{k\,|N|}.

    Values outside the range cover no section (they count for :func:`boundary_coverage`).
    The last section is closed on the right. Returns the mask of shape (neurons, k).
    """
    k = check_positive_int(k, "k")
    values = activations(model, x).flat()
    profile = _check_profile(profile, values.shape[1])
    low, high = profile.low.to(values), profile.high.to(values)
    inside = (values >= low) & (values <= high)
    width = (high - low) / k
    section = ((values - low) / width.clamp_min(torch.finfo(values.dtype).tiny)).floor().long().clamp(0, k - 1)
    hits = torch.nn.functional.one_hot(section, k).bool() & inside.unsqueeze(-1)
    return Coverage.of(hits.any(0))


def boundary_coverage(model: nn.Module, x: Tensor, profile: ActivationProfile) -> Coverage:
    r"""Neuron boundary coverage (NBC) of DeepGauge, :cite:`ma2018deepgauge` (Sec. 3.1).

    .. math:: \mathrm{NBC}(T) = \frac{|\mathrm{UpperCorner}| + |\mathrm{LowerCorner}|}{2|N|},

    where :math:`n \in \mathrm{UpperCorner}` if some test drives :math:`\phi(x, n) > \mathrm{high}_n`
    and :math:`n \in \mathrm{LowerCorner}` if some test drives it below :math:`\mathrm{low}_n`.
    Returns the mask of shape (2, neurons): row 0 the lower corners, row 1 the upper corners
    (row 1 alone is DeepGauge's strong neuron activation coverage). A ReLU output cannot go
    below 0, so a neuron whose training minimum is 0 has a lower corner no test can reach.
    """
    values = activations(model, x).flat()
    profile = _check_profile(profile, values.shape[1])
    lower = (values < profile.low.to(values)).any(0)
    upper = (values > profile.high.to(values)).any(0)
    return Coverage.of(torch.stack([lower, upper]))


def sign_sign_coverage(model: nn.Module, x: Tensor, chunk: int = 4096) -> list[Coverage]:
    r"""Sign-sign (SS) coverage of neuron pairs in adjacent layers, Sun et al. (2019) :cite:`sun2019structural`.

    The sign of a neuron is whether its ReLU is active (:math:`v_{k,l}[x] > 0`). Two tests
    :math:`x_1, x_2` exploit the sign change :math:`sc(n_{k,l}, x_1, x_2)` if the signs differ.
    A pair :math:`\alpha = (n_{k,i}, n_{k+1,j})` is SS-covered by :math:`x_1, x_2` if

    * :math:`sc(n_{k,i}, x_1, x_2)`;
    * :math:`\neg sc(n_{k,l}, x_1, x_2)` for every other neuron :math:`l \ne i` of layer :math:`k`;
    * :math:`sc(n_{k+1,j}, x_1, x_2)`.

    A pair is covered by a test set if some pair of its tests covers it. Returns one
    :class:`Coverage` per pair of adjacent ReLU layers (mask of shape
    :math:`(s_k, s_{k+1})`); the overall SS-coverage sums their counts. The
    :math:`N(N-1)/2` pairs of tests are compared ``chunk`` at a time.
    """
    chunk = check_positive_int(chunk, "chunk")
    signs = [v > 0 for v in activations(model, x).post]
    first, second = torch.triu_indices(len(x), len(x), 1, device=x.device)  # every pair of tests once
    coverages = []
    for below, above in itertools.pairwise(signs):
        covered = torch.zeros(below.shape[1], above.shape[1], dtype=torch.bool, device=below.device)
        for a, b in zip(first.split(chunk), second.split(chunk), strict=True):
            change_k = below[a] ^ below[b]
            single = change_k.sum(1) == 1  # exactly one neuron of layer k changes sign
            change_k1 = above[a[single]] ^ above[b[single]]
            covered |= (change_k[single].T.float() @ change_k1.float()) > 0
        coverages.append(Coverage.of(covered))
    return coverages
