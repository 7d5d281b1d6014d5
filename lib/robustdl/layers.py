r"""The geometry of a model's weights: its Linear and Conv2d layers, their matrices, their norms.

Layers are the ``nn.Linear`` and ``nn.Conv2d`` modules of a model, in the order they were
registered; a layer's *neurons* are the rows of its weight matrix (a convolution's filters, each
reshaped to a vector). The measures of :mod:`robustdl.measures` (Jin et al. 2020,
:cite:`jin2020does`) and the regularisers of :mod:`robustdl.train.regularisers` (spectral
normalisation, Parseval networks, weight correlation) are built on these.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustdl._checks import check_positive_int
from robustdl._random import normal

__all__ = [
    "layer_input_shapes",
    "layer_map",
    "operator_norm",
    "power_iteration",
    "weight_correlation",
    "weight_matrices",
    "weighted_layers",
]


def weighted_layers(model: nn.Module) -> list[nn.Module]:
    """The ``nn.Linear`` and ``nn.Conv2d`` layers of ``model``, in the order they were registered."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise ValueError(f"model has no Linear or Conv2d layer to measure: {type(model).__name__}")
    return layers


def weight_matrices(model: nn.Module) -> list[Tensor]:
    """Every layer's weight as a matrix whose rows are its neurons: Linear ``(out, in)``, Conv2d
    ``(out_channels, in_channels * kh * kw)``."""
    return [m.weight.flatten(1) for m in weighted_layers(model)]


def weight_correlation(weight: Tensor) -> Tensor:
    r"""The average weight correlation of a layer, Jin et al. (2020), :cite:`jin2020does`:

    .. math:: \rho(W_l) = \frac{1}{N_l (N_l - 1)} \sum_{i \ne j} \frac{|w_{l,i}^\top w_{l,j}|}
              {\|w_{l,i}\|_2 \, \|w_{l,j}\|_2},

    the mean absolute cosine similarity of the weight vectors of two distinct neurons (filters of
    a convolution, reshaped). Differentiable, so it serves as a regulariser too.
    """
    if not isinstance(weight, Tensor) or weight.dim() < 2 or weight.shape[0] < 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a tensor of at least two neurons, shape (N >= 2, ...), got {shape}")
    unit = F.normalize(weight.flatten(1), dim=1)
    cosine = (unit @ unit.T).abs()
    n = weight.shape[0]
    return (cosine.sum() - cosine.diagonal().sum()) / (n * (n - 1))


def layer_map(layer: nn.Module, weight: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """The linear map ``v -> W v`` a Linear or Conv2d layer applies (no bias), with ``weight`` in place of
    the layer's own when given."""
    _check_layer(layer)
    w = layer.weight if weight is None else weight
    if isinstance(layer, nn.Linear):
        return lambda v: F.linear(v, w)
    if layer.padding_mode != "zeros":
        raise ValueError(f"only zero-padded convolutions are linear maps, got padding_mode={layer.padding_mode!r}")
    return lambda v: F.conv2d(v, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def _check_layer(layer: object) -> None:
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"layer must be nn.Linear or nn.Conv2d, got {type(layer).__name__}")


def power_iteration(apply: Callable[[Tensor], Tensor], v: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    r"""The largest singular value of the linear map ``apply`` by ``iters`` steps of power iteration on
    :math:`A^\top A` from ``v``; the adjoint :math:`A^\top` comes from autograd, so any convolution
    (stride, padding) is handled exactly. Returns :math:`\|A v\|` for the final unit ``v`` (a lower
    bound that converges to :math:`\sigma_{\max}`) and ``v``.
    """
    v = v.detach() / v.norm()
    for _ in range(iters):
        _, adjoint = torch.func.vjp(apply, v)
        (v,) = adjoint(apply(v).detach())
        v = (v / v.norm().clamp_min(1e-30)).detach()
    return apply(v).norm(), v


def operator_norm(layer: nn.Module, input_shape: tuple[int, ...] | None = None, iters: int = 100,
                  weight: Tensor | None = None) -> float:
    r"""The spectral norm :math:`\sigma(W) = \max_{\|x\|_2 \le 1} \|W x\|_2` of a layer's linear map,
    :cite:`miyato2018spectral`.

    A Linear layer's is exact (``torch.linalg.matrix_norm(ord=2)``). A Conv2d's is that of the
    convolution as an operator on inputs of shape ``input_shape`` (C, H, W), by power iteration
    (Farnia et al. 2019, :cite:`farnia2019generalizable`), which needs the shape: the same kernel
    has different norms on different image sizes. ``weight`` replaces the layer's weight (e.g. a
    difference of weights).
    """
    _check_layer(layer)
    w = (layer.weight if weight is None else weight).detach()
    if isinstance(layer, nn.Linear):
        return torch.linalg.matrix_norm(w, ord=2).item()
    if input_shape is None:
        raise ValueError("input_shape (C, H, W) is needed for the operator norm of a Conv2d layer")
    apply = layer_map(layer, w)
    v = normal((1, *input_shape), w, torch.Generator().manual_seed(0))
    return power_iteration(apply, v, check_positive_int(iters, "iters"))[0].item()


def layer_input_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[nn.Module, tuple[int, ...]]:
    """The shape (without the batch) of the input each Linear/Conv2d layer of ``model`` receives for
    inputs of shape ``input_shape``, found by one forward pass on zeros."""
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def record(layer: nn.Module, args: tuple[Tensor, ...], _out: Tensor) -> None:
        shapes.setdefault(layer, tuple(args[0].shape[1:]))

    hooks = [m.register_forward_hook(record) for m in weighted_layers(model)]
    try:
        probe = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), dtype=probe.dtype, device=probe.device))
    finally:
        for h in hooks:
            h.remove()
    return shapes
