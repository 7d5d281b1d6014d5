r"""Bound operators: each layer of a ReLU network as the two steps that IBP and CROWN take through it.

A network is an :class:`~torch.nn.Sequential` of ``Linear``, ``Conv2d``, ``ReLU``, ``Flatten`` and
:class:`~robustdl.models.Normalize` layers, or one of our models whose ``.net`` is such a
sequence (:func:`layers`). Each layer becomes a small *bound operator* (:class:`BoundOp`), as in
auto_LiRPA's ``operators``, with two methods:

* ``interval`` -- forward: the box of the layer's output from the box of its input, the step of
  interval bound propagation, Gowal et al. (2018) :cite:`gowal2018effectiveness` (eq. 6);
* ``backward`` -- backward: K linear lower bounds on functions of the layer's output pulled back to
  its input, the step of CROWN, Zhang et al. (2018) :cite:`zhang2018efficient` (Theorem 3.2);
  exact for affine layers, through a linear relaxation for ReLUs.

Convolutions, ReLUs and ``Normalize`` also take the backward step for rows kept as local windows
(``backward_patches``, :mod:`robustdl.verify.patches`). The propagation itself, and the bounds on
a network's margins, are in :mod:`robustdl.verify.bounds`.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustdl.models import Normalize
from robustdl.threat import inner
from robustdl.verify.patches import Patches

__all__ = ["BoundConv2d", "BoundFlatten", "BoundLinear", "BoundNormalize", "BoundOp", "BoundReLU", "layers",
           "operators"]

#: A pair ``(lower, upper)`` of tensors of the same shape, elementwise lower <= upper.
Interval = tuple[Tensor, Tensor]


class BoundOp:
    r"""The protocol of a bound operator: one layer :math:`h = g(z)` of the network.

    Shapes: ``lower``, ``upper`` are the bounds of the layer's input, (N, \*in); ``A`` holds the
    coefficients of K linear functions of the layer's output, (N, K, \*out).
    """

    #: True when the layer is an affine map (its backward step is exact, no relaxation).
    affine = True
    #: True when the layer mixes coordinates (Linear, Conv2d): interval arithmetic is exact
    #: through any chain with at most one such layer (the others map boxes onto boxes).
    mixing = False
    #: True when the layer keeps each row of CROWN local (Conv2d, ReLU, Normalize): it has ``backward_patches``.
    local = False

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        """Bounds (N, \\*out) of the layer's output when its input lies in ``[lower, upper]``."""
        raise NotImplementedError

    def backward(self, A: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        r"""Pull K linear lower bounds back through the layer.

        Returns ``(A_in, bias)``, shapes (N, K, \*in) and (N, K), such that
        :math:`A \cdot g(z) \ge A_{in} \cdot z + \mathrm{bias}` for every :math:`z \in [\mathrm{lower},
        \mathrm{upper}]` (an equality for affine layers).
        """
        raise NotImplementedError

    def backward_patches(self, A: Patches, lower: Tensor, upper: Tensor) -> tuple[Patches, Tensor]:
        """:meth:`backward` for rows kept as windows of the output (:class:`~robustdl.verify.patches.Patches`)."""
        raise NotImplementedError


class BoundLinear(BoundOp):
    r"""``nn.Linear``, :math:`h = Wz + b`: interval :math:`Wc + b \pm |W| r` (centre c, radius r)."""

    mixing = True

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        centre = F.linear((upper + lower) / 2, self.module.weight, self.module.bias)
        radius = F.linear((upper - lower) / 2, self.module.weight.abs())
        return centre - radius, centre + radius

    def backward(self, A: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        bias = A @ self.module.bias if self.module.bias is not None else A.new_zeros(A.shape[:2])
        return A @ self.module.weight, bias


class BoundConv2d(BoundOp):
    r"""``nn.Conv2d``, :math:`h = w \star z + b`: interval :math:`w \star c + b \pm |w| \star r`.

    The backward step is the transposed convolution (the convolution's input gradient). With few
    input channels (a first layer) it is written as what it is, faster there: each output position
    sends :math:`W^\top A` back to its input patch (a matrix product), and overlapping patches add
    up (``fold``). On windows (:meth:`Patches.through_conv`) it is the same transposed convolution,
    window by window.
    """

    mixing = True
    local = True

    def _conv(self, z: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        m = self.module
        return F.conv2d(z, weight, bias, m.stride, m.padding, m.dilation, m.groups)

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        centre = self._conv((upper + lower) / 2, self.module.weight, self.module.bias)
        radius = self._conv((upper - lower) / 2, self.module.weight.abs(), None)
        return centre - radius, centre + radius

    def backward(self, A: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        m, (n, k) = self.module, A.shape[:2]
        if m.groups == 1 and m.in_channels <= 4:
            columns = m.weight.flatten(1).T @ A.flatten(3).flatten(0, 1)  # (N K, C_in kh kw, positions)
            A_in = F.fold(columns, lower.shape[-2:], m.kernel_size, m.dilation, m.padding, m.stride)
        else:
            A_in = torch.nn.grad.conv2d_input((n * k, *lower.shape[1:]), m.weight, A.flatten(0, 1),
                                              m.stride, m.padding, m.dilation, m.groups)
        bias = A.sum(dim=(-2, -1)) @ m.bias if m.bias is not None else A.new_zeros(n, k)
        return A_in.view(n, k, *lower.shape[1:]), bias

    def backward_patches(self, A: Patches, lower: Tensor, upper: Tensor) -> tuple[Patches, Tensor]:
        m = self.module
        bias = A.A.sum(dim=(-2, -1)) @ m.bias if m.bias is not None else A.A.new_zeros(A.A.shape[:2])
        return A.through_conv(m, lower.shape[1:]), bias


class BoundNormalize(BoundOp):
    r""":class:`~robustdl.models.Normalize`, :math:`h = (z - \mu) / \sigma`, increasing in each coordinate."""

    local = True

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        return self.module(lower), self.module(upper)

    def _scale_shift(self, lower: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`1 / \sigma` and :math:`-\mu / \sigma`, each shaped like one input (1, \*in)."""
        shift = self.module(torch.zeros_like(lower[:1]))
        return self.module(torch.ones_like(lower[:1])) - shift, shift

    def backward(self, A: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        scale, shift = self._scale_shift(lower)
        return A * scale, (A * shift).flatten(2).sum(-1)

    def backward_patches(self, A: Patches, lower: Tensor, upper: Tensor) -> tuple[Patches, Tensor]:
        scale, shift = self._scale_shift(lower)
        return replace(A, A=A.A * A.windows(scale)), A.inner(shift)


class BoundFlatten(BoundOp):
    """``nn.Flatten`` (of all but the batch dimension): a reshape."""

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        return lower.flatten(1), upper.flatten(1)

    def backward(self, A: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        return A.reshape(*A.shape[:2], *lower.shape[1:]), A.new_zeros(A.shape[:2])


class BoundReLU(BoundOp):
    r"""``nn.ReLU`` and its linear relaxation, Zhang et al. (2018) :cite:`zhang2018efficient`.

    On an *unstable* neuron, :math:`l < 0 < u`, CROWN bounds :math:`\mathrm{ReLU}(z)` between two lines,

    .. math:: \alpha z \;\le\; \mathrm{ReLU}(z) \;\le\; \frac{u}{u - l}(z - l), \qquad
              \alpha = \mathbb{1}[u > -l],

    the upper line the chord of the triangle relaxation, the lower slope the *adaptive* choice of
    CROWN-Ada (the one of least area). Stable neurons are exact: slope 1 if :math:`l \ge 0`,
    0 if :math:`u \le 0`. A lower bound on :math:`A \cdot \mathrm{ReLU}(z)` takes the lower line
    where :math:`A > 0` and the upper line where :math:`A < 0`.
    """

    affine = False
    local = True

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        return lower.clamp_min(0), upper.clamp_min(0)

    @staticmethod
    def relaxation(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The slopes of the lower and upper lines and the upper line's intercept, each shaped like ``lower``."""
        unstable = (lower < 0) & (upper > 0)
        chord = upper / (upper - lower).where(unstable, torch.ones_like(lower))
        upper_slope = torch.where(unstable, chord, (lower >= 0).to(lower))
        lower_slope = torch.where(unstable, (upper > -lower).to(lower), upper_slope)
        return lower_slope, upper_slope, torch.where(unstable, -chord * lower, torch.zeros_like(lower))

    def backward(self, A: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        lower_slope, upper_slope, intercept = self.relaxation(lower, upper)
        negative = A.clamp_max(0)  # these coefficients take the upper line
        bias = inner(negative, intercept)
        return (A * lower_slope.unsqueeze(1)).addcmul_(negative, (upper_slope - lower_slope).unsqueeze(1)), bias

    def backward_patches(self, A: Patches, lower: Tensor, upper: Tensor) -> tuple[Patches, Tensor]:
        lower_slope, upper_slope, intercept = (A.windows(t) for t in self.relaxation(lower, upper))
        negative = A.A.clamp_max(0)
        bias = (negative * intercept).flatten(2).sum(-1)
        return replace(A, A=(A.A * lower_slope).addcmul_(negative, upper_slope - lower_slope)), bias


_OPERATORS: dict[type, type[BoundOp]] = {
    nn.Linear: BoundLinear,
    nn.Conv2d: BoundConv2d,
    nn.ReLU: BoundReLU,
    nn.Flatten: BoundFlatten,
    Normalize: BoundNormalize,
}


def _check_layer(index: int, module: nn.Module) -> nn.Module:
    if type(module) not in _OPERATORS:
        raise TypeError(f"bound propagation supports Linear, Conv2d, ReLU, Flatten and Normalize layers; "
                        f"layer {index} is {type(module).__name__}: {module!r}")
    if isinstance(module, nn.Conv2d) and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
        raise TypeError(f"layer {index} {module!r}: only numeric zero padding is supported")
    if isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) != (1, -1):
        raise TypeError(f"layer {index} {module!r}: only Flatten(1, -1) is supported")
    return module


def layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` in order: an ``nn.Sequential`` (nested ones flattened) or a model's ``.net``.

    Raises ``TypeError`` naming the first layer that bound propagation does not support
    (max-pooling, batch normalisation, ...).
    """
    net = getattr(model, "net", model)
    if not isinstance(net, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential or have one as .net (as robustdl.models do), "
                        f"got {type(model).__name__}")
    flat: list[nn.Module] = []
    for module in net:
        flat += layers(module) if isinstance(module, nn.Sequential) else [module]
    return [_check_layer(i, m) for i, m in enumerate(flat)]


def operators(model: nn.Module) -> list[BoundOp]:
    """One bound operator per layer of ``model`` (:func:`layers`)."""
    return [_OPERATORS[type(m)](m) for m in layers(model)]
