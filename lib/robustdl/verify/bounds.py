r"""Sound bounds on a ReLU network's outputs over a threat model: interval and linear relaxations.

For an input :math:`x` and radius :math:`\epsilon` the input set is the box

.. math:: B(x) = \{x' : \|x' - x\|_\infty \le \epsilon\} \cap [0, 1]^d = [\underline{x}, \overline{x}],

and a *specification* :math:`C` (rows :math:`c_k`) asks for bounds :math:`\underline{m}_k \le
c_k^\top f(x') \le \overline{m}_k` for every :math:`x' \in B(x)`. With the margin specification
(:func:`margin_spec`, rows :math:`e_y - e_j`) all lower bounds positive *certify* that no
:math:`x' \in B(x)` changes the prediction from :math:`y`.

* :func:`interval_bounds` -- interval bound propagation (IBP), Gowal et al. (2018)
  :cite:`gowal2018effectiveness`: push the box through layer by layer;
* :func:`crown_bounds` -- CROWN, Zhang et al. (2018) :cite:`zhang2018efficient`: bound each ReLU
  between two lines and propagate the specification backwards as one linear function of the
  input, which is then bounded over the box.

A network is an :class:`~torch.nn.Sequential` of ``Linear``, ``Conv2d``, ``ReLU``, ``Flatten`` and
:class:`~robustdl.models.Normalize` layers, or one of our models whose ``.net`` is such a
sequence (:func:`layers`). Each layer becomes a small *bound operator* (:class:`BoundOp`) with
two methods, as in auto_LiRPA's ``operators``: ``interval`` (forward) and ``backward``
(the linear bounds of CROWN). The exact answer, by mixed-integer programming, is in
:mod:`robustdl.verify.milp`. Taught in the chapter *Linear relaxations and certified training*.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustdl._checks import check_images, check_labels, check_nonnegative, check_positive_int
from robustdl.models import Normalize

__all__ = [
    "BoundConv2d",
    "BoundFlatten",
    "BoundLinear",
    "BoundNormalize",
    "BoundOp",
    "BoundReLU",
    "certified",
    "certified_accuracy",
    "crown_bounds",
    "crown_margin",
    "ibp_margin",
    "input_box",
    "interval_bounds",
    "layers",
    "margin_spec",
    "operators",
    "preactivation_bounds",
]

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

    The backward step is the transposed convolution (the convolution's input gradient).
    """

    mixing = True

    def _conv(self, z: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        m = self.module
        return F.conv2d(z, weight, bias, m.stride, m.padding, m.dilation, m.groups)

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        centre = self._conv((upper + lower) / 2, self.module.weight, self.module.bias)
        radius = self._conv((upper - lower) / 2, self.module.weight.abs(), None)
        return centre - radius, centre + radius

    def backward(self, A: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        m, (n, k) = self.module, A.shape[:2]
        A_in = torch.nn.grad.conv2d_input((n * k, *lower.shape[1:]), m.weight, A.flatten(0, 1),
                                          m.stride, m.padding, m.dilation, m.groups)
        bias = A.sum(dim=(-2, -1)) @ m.bias if m.bias is not None else A.new_zeros(n, k)
        return A_in.view(n, k, *lower.shape[1:]), bias


class BoundNormalize(BoundOp):
    r""":class:`~robustdl.models.Normalize`, :math:`h = (z - \mu) / \sigma`, increasing in each coordinate."""

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        return self.module(lower), self.module(upper)

    def backward(self, A: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        shift = self.module(torch.zeros_like(lower[:1]))  # -mu / sigma, shaped like one input
        scale = self.module(torch.ones_like(lower[:1])) - shift  # 1 / sigma
        return A * scale, (A * shift).flatten(2).sum(-1)


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
        lower_slope, upper_slope, intercept = (t.unsqueeze(1) for t in self.relaxation(lower, upper))
        positive, negative = A.clamp_min(0), A.clamp_max(0)
        return positive * lower_slope + negative * upper_slope, (negative * intercept).flatten(2).sum(-1)


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


def input_box(x: Tensor, eps: float) -> Interval:
    r"""The box :math:`[\max(x - \epsilon, 0), \min(x + \epsilon, 1)]`: the Linf ball within [0, 1]."""
    check_images(x)
    eps = check_nonnegative(eps, "eps")
    return (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


def _concretize(A: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    r""":math:`\min_{z \in [l, u]} A z = A^+ l + A^- u`, shape (N, K), for ``A`` (N, K, \*in)."""
    return (A.clamp_min(0) * lower.unsqueeze(1) + A.clamp_max(0) * upper.unsqueeze(1)).flatten(2).sum(-1)


def _backward(ops: list[BoundOp], inputs: list[Interval], A: Tensor, box: Interval) -> Interval:
    r"""CROWN's backward pass: bounds on :math:`A \cdot g(x)`, :math:`x \in` ``box``, for the chain ``ops``.

    ``inputs[i]`` bounds the input of ``ops[i]``; ``A`` is (N, K, \*out), or (1, K, \*out) when the
    same for every example. The upper bound is minus the lower bound of :math:`-A`, so both run
    as one pass of 2K rows.
    """
    k = A.shape[1]
    A = torch.cat([A, -A], dim=1)
    bias = A.new_zeros(A.shape[:2])
    for op, (lower, upper) in zip(reversed(ops), reversed(inputs), strict=True):
        A, b = op.backward(A, lower, upper)
        bias = bias + b
    bound = (_concretize(A, *box) + bias).expand(len(box[0]), -1)
    return bound[:, :k], -bound[:, k:]


def _identity(lower: Tensor, rows: Tensor | None = None) -> Tensor:
    """The specification of a layer's coordinates ``rows`` (default: all m): (1, k, \\*shape).

    Its batch dimension is 1, the same for every example: affine layers keep it so (the backward
    pass through the last affine layers is done once for the batch), ReLUs broadcast it to N.
    """
    eye = torch.eye(lower[0].numel(), dtype=lower.dtype, device=lower.device)
    eye = eye if rows is None else eye[rows]
    return eye.view(1, len(eye), *lower.shape[1:])


def _tighten(ops: list[BoundOp], inputs: list[Interval], bounds: Interval, box: Interval) -> Interval:
    """Intersect ``bounds`` of the output of ``ops`` with CROWN's, run for the neurons they leave unstable.

    A neuron stable for every example of the batch stays as it is: bounding it again would not
    change a ReLU's relaxation, and CROWN's cost grows with the number of neurons bounded.
    """
    lower, upper = (b.flatten(1) for b in bounds)
    rows = ((lower < 0) & (upper > 0)).any(dim=0).nonzero().squeeze(1)
    if not len(rows):
        return bounds
    crown_lower, crown_upper = _backward(ops, inputs, _identity(bounds[0], rows), box)
    lower, upper = lower.clone(), upper.clone()
    lower[:, rows] = torch.maximum(lower[:, rows], crown_lower)
    upper[:, rows] = torch.minimum(upper[:, rows], crown_upper)
    return lower.view_as(bounds[0]), upper.view_as(bounds[1])


def _propagate(ops: list[BoundOp], box: Interval, crown: bool) -> tuple[list[Interval], Interval]:
    """Bounds on every layer's input, and on the output, by IBP, tightened by CROWN at ReLUs if ``crown``.

    CROWN bounds a ReLU's input only where interval arithmetic is not already exact, i.e. when
    two or more mixing layers lie below it; there the bounds are the intersection of both (each sound).
    """
    inputs: list[Interval] = []
    bounds = box
    for i, op in enumerate(ops):
        if crown and not op.affine and sum(o.mixing for o in ops[:i]) > 1:
            bounds = _tighten(ops[:i], inputs, bounds, box)
        inputs.append(bounds)
        bounds = op.interval(*bounds)
    return inputs, bounds


def _check_spec(spec: Tensor | None, x: Tensor, classes: int) -> Tensor | None:
    if spec is None:
        return None
    if not isinstance(spec, Tensor) or spec.dim() != 3 or spec.shape[0] != len(x) or spec.shape[2] != classes:
        shape = tuple(spec.shape) if isinstance(spec, Tensor) else type(spec).__name__
        raise ValueError(f"spec must be a tensor of shape (N={len(x)}, K, C={classes}), got {shape}")
    return spec.to(x.dtype)


def interval_bounds(model: nn.Module, x: Tensor, eps: float, spec: Tensor | None = None) -> Interval:
    r"""Interval bound propagation, Gowal et al. (2018) :cite:`gowal2018effectiveness` (eq. 6).

    Each layer maps the box of its input to the box of its output: for an affine layer with centre
    :math:`c = (\overline{z} + \underline{z})/2` and radius :math:`r = (\overline{z} - \underline{z})/2`,

    .. math:: \underline{h} = Wc + b - |W| r, \qquad \overline{h} = Wc + b + |W| r,

    and a ReLU clamps both ends. Bounds on :math:`f(x')` (N, C) for every :math:`x'` in the Linf ball of
    radius ``eps`` around ``x`` within [0, 1]. With ``spec`` :math:`C` (N, K, C), bounds (N, K) on
    :math:`C f(x')`; the specification is merged into the last affine layer first,
    :math:`(CW, Cb)`, as Gowal et al. do, which is tighter than bounding :math:`C` over the logits' box.
    Differentiable: :func:`robustdl.train.certified.ibp_loss` trains through it.
    """
    ops = operators(model)
    box = input_box(x, eps)
    inputs, (lower, upper) = _propagate(ops, box, crown=False)
    spec = _check_spec(spec, x, lower.shape[1])
    if spec is None:
        return lower, upper
    if ops and ops[-1].affine:
        A, bias = ops[-1].backward(spec, *inputs[-1])
        return _concretize(A, *inputs[-1]) + bias, -_concretize(-A, *inputs[-1]) + bias
    return _concretize(spec, lower, upper), -_concretize(-spec, lower, upper)


def crown_bounds(model: nn.Module, x: Tensor, eps: float, spec: Tensor | None = None,
                 intermediate: str = "crown") -> Interval:
    r"""CROWN, Zhang et al. (2018) :cite:`zhang2018efficient` (Theorem 3.2), with CROWN-Ada's lower slope.

    Going backwards from the specification :math:`\Lambda = C`, each affine layer maps
    :math:`\Lambda \leftarrow \Lambda W` (collecting :math:`\Lambda b`) and each ReLU replaces itself by
    one of its two lines (:class:`BoundReLU`), so that :math:`C f(x') \ge \Lambda x' + \beta` on the
    whole box; the linear function is then bounded exactly over the box,

    .. math:: \underline{m} = \Lambda^+ \underline{x} + \Lambda^- \overline{x} + \beta.

    The upper bound is minus the lower bound of :math:`-C`. The relaxation of each ReLU needs bounds
    on its input: with ``intermediate="crown"`` (the default, the paper's) they come from CROWN
    itself, run for the neurons that interval arithmetic leaves unstable (and intersected with the
    interval bounds); with ``"ibp"`` from interval arithmetic, the cheaper choice of CROWN-IBP
    :cite:`zhang2020towards`. Returns bounds (N, C), or (N, K) with ``spec`` (N, K, C). CROWN is
    exact for a network without ReLUs, but it is not always tighter than :func:`interval_bounds`
    (the chapter shows a network where it is looser).
    """
    if intermediate not in ("crown", "ibp"):
        raise ValueError(f"intermediate must be 'crown' or 'ibp', got {intermediate!r}")
    ops = operators(model)
    box = input_box(x, eps)
    inputs, (lower, _) = _propagate(ops, box, crown=intermediate == "crown")
    spec = _check_spec(spec, x, lower.shape[1])
    return _backward(ops, inputs, _identity(lower) if spec is None else spec, box)


def preactivation_bounds(model: nn.Module, x: Tensor, eps: float, method: str = "crown") -> list[Interval]:
    """Bounds on the input of every ReLU of ``model`` (in order), by ``method`` ``"crown"`` or ``"ibp"``.

    Neurons with lower bound >= 0 or upper bound <= 0 are *stable* over the ball; the others are
    the ones a relaxation (or a mixed-integer program's binary variable) must handle.
    """
    if method not in ("crown", "ibp"):
        raise ValueError(f"method must be 'crown' or 'ibp', got {method!r}")
    ops = operators(model)
    inputs, _ = _propagate(ops, input_box(x, eps), crown=method == "crown")
    return [bounds for op, bounds in zip(ops, inputs, strict=True) if isinstance(op, BoundReLU)]


def margin_spec(y: Tensor, classes: int) -> Tensor:
    r"""The margin specification (N, C-1, C): for each example, the rows :math:`e_y - e_j`, :math:`j \ne y`."""
    check_positive_int(classes, "classes")
    if not isinstance(y, Tensor) or y.dim() != 1 or y.is_floating_point():
        raise TypeError(f"y must be a 1-D tensor of class indices, got {y!r}")
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"y must hold class indices in [0, {classes}), got values in [{y.min()}, {y.max()}]")
    eye = torch.eye(classes, device=y.device)
    rows = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # (N, C, C), row j = e_y - e_j (zero at j = y)
    others = torch.arange(classes, device=y.device) != y.unsqueeze(1)
    return rows[others].view(len(y), classes - 1, classes)


Margin = Callable[[nn.Module, Tensor, Tensor, float], Tensor]


def _margin(bounds: Callable[..., Interval], model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    check_labels(y, check_images(x))
    with torch.no_grad():
        classes = model(x[:1]).shape[1]
    return bounds(model, x, eps, spec=margin_spec(y, classes))[0]


def ibp_margin(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    r"""IBP lower bounds (N, C-1) on the margins :math:`f_y(x') - f_j(x')`, :math:`j \ne y`, over the ball."""
    return _margin(interval_bounds, model, x, y, eps)


def crown_margin(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    r"""CROWN lower bounds (N, C-1) on the margins :math:`f_y(x') - f_j(x')`, :math:`j \ne y`, over the ball."""
    return _margin(crown_bounds, model, x, y, eps)


def certified(model: nn.Module, x: Tensor, y: Tensor, eps: float, bound: Margin = crown_margin) -> Tensor:
    """Whether every margin's lower bound is positive (N,) bool: no input in the ball changes the label from y."""
    return (bound(model, x, y, eps) > 0).all(dim=1)


def certified_accuracy(model: nn.Module, x: Tensor, y: Tensor, eps: float, bound: Margin = crown_margin,
                       batch_size: int = 50) -> float:
    """The fraction of examples certified correct at radius ``eps`` (a lower bound on robust accuracy).

    An example counts only if it is classified as ``y`` everywhere in its ball; bounds run without
    gradients, ``batch_size`` examples at a time (CROWN's memory grows with the batch).
    """
    check_labels(y, check_images(x))
    check_positive_int(batch_size, "batch_size")
    with torch.no_grad():
        hits = sum(int(certified(model, x[i:i + batch_size], y[i:i + batch_size], eps, bound).sum())
                   for i in range(0, len(x), batch_size))
    return hits / max(len(x), 1)
