r"""Weight regularisers that plug into the training loop: spectral normalisation, Parseval
retraction, a Lipschitz (input-gradient) penalty and the weight-correlation penalty.

Taught in the chapter *Robustness vs generalisation* (``book/04-generalisation``). A *penalty* is
``penalty(model, x, y) -> Tensor``; :func:`regularised` adds it to any objective of
:mod:`robustdl.train`. Spectral normalisation is a reparametrisation of the weights and Parseval
retraction an update after each optimiser step, so neither changes the loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from robustdl._checks import check_nonnegative, check_positive_int
from robustdl._random import normal
from robustdl.layers import layer_input_shapes, layer_map, power_iteration, weight_correlation, weighted_layers
from robustdl.train.loop import Objective

__all__ = [
    "Penalty",
    "SpectralNorm",
    "attach_parseval",
    "lipschitz_penalty",
    "parseval_step",
    "regularised",
    "spectral_normalise",
    "weight_correlation_penalty",
]

Penalty = Callable[[nn.Module, Tensor, Tensor], Tensor]


class SpectralNorm(nn.Module):
    r"""The reparametrisation :math:`W \mapsto W / \max(1, \sigma(W)/c)` of one layer, Miyato et al.
    (2018), :cite:`miyato2018spectral`, with :math:`\sigma(W)` the layer's operator norm estimated by
    power iteration from a persistent vector, refined by ``iters`` steps at each training forward
    (none in eval mode). For a convolution the operator is the convolution on its actual input
    shape, as Farnia et al. (2019), :cite:`farnia2019generalizable`, do, rather than Miyato's reshaped
    kernel, whose norm does not bound the layer's Lipschitz constant.
    """

    def __init__(self, layer: nn.Module, input_shape: tuple[int, ...], coeff: float, iters: int) -> None:
        super().__init__()
        self.coeff, self.iters = check_nonnegative(coeff, "coeff"), check_positive_int(iters, "iters")
        self._map = lambda w: layer_map(layer, w)
        weight = layer.weight.detach()
        start = normal((1, *input_shape), weight, torch.Generator().manual_seed(0))
        self.register_buffer("v", start / start.norm())

    def forward(self, weight: Tensor) -> Tensor:
        apply = self._map(weight)
        if self.training:
            with torch.no_grad():
                self.v.copy_(power_iteration(self._map(weight.detach()), self.v, self.iters)[1])
        sigma = apply(self.v).norm()
        return weight / torch.clamp(sigma / self.coeff, min=1.0)


def spectral_normalise(model: nn.Module, input_shape: tuple[int, ...], coeff: float = 1.0, iters: int = 1) -> nn.Module:
    r"""Spectrally normalise every Linear and Conv2d layer of ``model`` in place
    (:class:`SpectralNorm`): each layer's operator norm stays at most ``coeff``, so the network's
    Lipschitz constant (in :math:`\ell_2`) is at most :math:`c^L` times that of its activations. The
    layers' input shapes come from one forward pass with inputs of shape ``input_shape``.
    Returns ``model``.
    """
    if coeff <= 0:
        raise ValueError(f"coeff must be positive, got {coeff}")
    shapes = layer_input_shapes(model, input_shape)
    for layer in weighted_layers(model):
        parametrize.register_parametrization(layer, "weight", SpectralNorm(layer, shapes[layer], coeff, iters))
    return model


@torch.no_grad()
def parseval_step(model: nn.Module, beta: float = 3e-4) -> None:
    r"""One Parseval retraction of Cisse et al. (2017), :cite:`cisse2017parseval`, on every Linear and
    Conv2d weight :math:`W` (a convolution's as its ``(out, in * kh * kw)`` matrix):

    .. math:: W \leftarrow (1 + \beta) W - \beta\, W W^\top W,

    a gradient step on :math:`\frac{\beta}{4}\|W W^\top - I\|_F^2` that pulls the rows towards a
    Parseval tight frame (:math:`W W^\top = I`). Cisse et al. retract a random subset of rows per
    step for speed; here all rows.
    """
    check_nonnegative(beta, "beta")
    for layer in weighted_layers(model):
        w = layer.weight.flatten(1)
        layer.weight.copy_(((1 + beta) * w - beta * w @ w.T @ w).view_as(layer.weight))


def attach_parseval(optimizer: torch.optim.Optimizer, model: nn.Module, beta: float = 3e-4) -> RemovableHandle:
    """Run :func:`parseval_step` after every step of ``optimizer`` (a step post-hook), so that training
    with :func:`~robustdl.train.fit` trains a Parseval network. Returns the hook's handle."""
    check_nonnegative(beta, "beta")
    return optimizer.register_step_post_hook(lambda *_: parseval_step(model, beta))


def lipschitz_penalty(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    r"""The input-gradient penalty of Ross and Doshi-Velez (2018), :cite:`ross2018improving`,
    :math:`\frac1N \sum_i \|\nabla_x \ell(f(x_i), y_i)\|_2^2`: a local, data-dependent Lipschitz
    penalty on the loss, differentiable in the weights by double backpropagation."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x, create_graph=True)
    return grad.flatten(1).pow(2).sum(1).mean()


def weight_correlation_penalty(model: nn.Module, *_batch: Tensor) -> Tensor:
    r"""The weight-correlation regulariser of Jin et al. (2020), :cite:`jin2020does`:
    :math:`\sum_\ell \rho(W_\ell)` over the Linear and Conv2d layers (the batch is not used)."""
    return torch.stack([weight_correlation(m.weight) for m in weighted_layers(model)]).sum()


def regularised(objective: Objective, penalty: Penalty, weight: float) -> Objective:
    r"""The objective :math:`L(\theta) + \lambda\, \Omega(\theta)`: ``objective(model, x, y) +
    weight * penalty(model, x, y)``."""
    check_nonnegative(weight, "weight")

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return objective(model, x, y) + weight * penalty(model, x, y)

    return loss
