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
  input, which is then bounded over the box;
* :func:`crown_ibp_margin` -- CROWN-IBP, Zhang et al. (2020) :cite:`zhang2020towards`: IBP for the
  intermediate layers, one CROWN pass for the margins (cheap enough to train through).

A network is an :class:`~torch.nn.Sequential` of ``Linear``, ``Conv2d``, ``ReLU``, ``Flatten`` and
:class:`~robustdl.models.Normalize` layers, or one of our models whose ``.net`` is such a
sequence (:func:`~robustdl.verify.operators.layers`). Each layer becomes a small *bound operator*
(:mod:`robustdl.verify.operators`) with two methods: ``interval`` (forward) and ``backward`` (the
linear bounds of CROWN); this module chains them. The exact answer, by mixed-integer programming,
is in :mod:`robustdl.verify.milp`. Taught in the chapter *Linear relaxations and certified training*.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from robustdl._checks import check_fraction, check_images, check_labels, check_positive_int
from robustdl.threat import LpBall, as_ball
from robustdl.verify.operators import BoundConv2d, BoundOp, BoundReLU, Interval, operators
from robustdl.verify.patches import Patches

__all__ = [
    "certified",
    "certified_accuracy",
    "crown_bounds",
    "crown_ibp_margin",
    "crown_margin",
    "ibp_margin",
    "input_box",
    "interval_bounds",
    "margin_spec",
    "preactivation_bounds",
]


def input_box(x: Tensor, eps: float | LpBall) -> Interval:
    r"""The smallest box around the threat model, :math:`[\max(x - \epsilon, 0), \min(x + \epsilon, 1)]`.

    :meth:`LpBall.box`; for the Linf ball (a bare ``eps``) the box is the input set itself.
    """
    check_images(x)
    return as_ball(eps).box(x)


def _concretize(A: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    r""":math:`\min_{z \in [l, u]} A z = A^+ l + A^- u`, shape (N, K), for ``A`` (N, K, \*in)."""
    return (A.clamp_min(0) * lower.unsqueeze(1) + A.clamp_max(0) * upper.unsqueeze(1)).flatten(2).sum(-1)


def _backward(ops: list[BoundOp], inputs: list[Interval], A: Tensor) -> tuple[Tensor, Tensor]:
    r"""CROWN's backward pass (Zhang et al. 2018, Theorem 3.2): :math:`A \cdot g(z) \ge \Lambda z + \beta` on ``ops``.

    ``inputs[i]`` bounds the input of ``ops[i]``; ``A`` is (N, K, \*out), or (1, K, \*out) when the
    same for every example (affine layers keep the batch dimension 1, ReLUs broadcast it to N).
    Returns :math:`\Lambda` (N or 1, K, \*in) and :math:`\beta` (N or 1, K).
    """
    bias = A.new_zeros(A.shape[:2])
    for op, (lower, upper) in zip(reversed(ops), reversed(inputs), strict=True):
        A, b = op.backward(A, lower, upper)
        bias = bias + b
    return A, bias


def _crown(ops: list[BoundOp], inputs: list[Interval], A: Tensor, ball: LpBall, x: Tensor,
           upper: bool = True) -> tuple[Tensor, Tensor | None]:
    r"""Bounds (N, K) on :math:`A \cdot f(x')` over the threat model: the backward pass, then :meth:`LpBall.concretise`.

    The upper bound is minus the lower bound of :math:`-A`, so both run as one pass of 2K rows;
    with ``upper=False`` only the lower bound is computed (and ``None`` returned for the upper).
    """
    k = A.shape[1]
    Lambda, beta = _backward(ops, inputs, torch.cat([A, -A], dim=1) if upper else A)
    bound = ball.concretise(Lambda, x) + beta
    return bound[:, :k], -bound[:, k:] if upper else None


def _identity(shape: torch.Size, rows: Tensor, like: Tensor) -> Tensor:
    """The specification of a layer's coordinates ``rows`` (one-hot rows), shape (1, len(rows), \\*shape)."""
    eye = like.new_zeros(len(rows), shape.numel()).scatter_(1, rows.unsqueeze(1), 1.0)
    return eye.view(1, len(rows), *shape)


def _affine_tail(ops: list[BoundOp]) -> int:
    """Where the chain's last run of affine layers starts: ``ops[i:]`` are all affine."""
    i = len(ops)
    while i and ops[i - 1].affine:
        i -= 1
    return i


def _dense_rows(ops: list[BoundOp], inputs: list[Interval], union: Tensor, order: Tensor, sign: float,
                ball: LpBall, x: Tensor, shape: torch.Size) -> Tensor:
    r"""CROWN's lower bounds (N, m) on :math:`\mathrm{sign} \cdot z_j` for each example's neurons ``union[order]``.

    The identity rows of the ``union`` go through the last affine layers once for the whole batch;
    then each example keeps its own rows only (``order``, (N, m)), so that the costly part of the
    pass, through the ReLUs below, grows with the neurons of each example, not of the batch.
    """
    split = _affine_tail(ops)
    A, beta = _backward(ops[split:], inputs[split:], sign * _identity(shape, union, x))
    Lambda, b = _backward(ops[:split], inputs[:split], A[0][order])
    return ball.concretise(Lambda, x) + beta[0][order] + b


def _local(ops: list[BoundOp]) -> bool:
    """Whether ``ops`` end in a convolution and keep each of its neurons' rows local (Conv2d, ReLU, Normalize only)."""
    return isinstance(ops[-1], BoundConv2d) and all(op.local for op in ops)


def _patch_rows(ops: list[BoundOp], inputs: list[Interval], neurons: Tensor, sign: float, ball: LpBall, x: Tensor,
                shape: torch.Size) -> Tensor:
    r"""The bounds of :func:`_dense_rows` for the neurons (N, m) of a convolution above local layers (:func:`_local`).

    Each row is kept as the window of its receptive field (:class:`~robustdl.verify.patches.Patches`):
    the same backward pass, :math:`\Lambda \leftarrow \Lambda W` and the ReLUs' lines, on the window alone.
    """
    A, bias = Patches.of_conv(ops[-1].module, neurons, shape, inputs[-1][0].shape[1:], sign)
    for op, (lower, upper) in zip(reversed(ops[:-1]), reversed(inputs[:-1]), strict=True):
        A, b = op.backward_patches(A, lower, upper)
        bias = bias + b
    return A.concretise(ball, x) + bias


def _neuron_bounds(ops: list[BoundOp], inputs: list[Interval], rows: Tensor, sign: float, ball: LpBall,
                   x: Tensor, shape: torch.Size) -> Tensor:
    r"""CROWN's lower bounds on :math:`\mathrm{sign} \cdot z_j` for the neurons ``rows`` (N, m) of each example.

    ``z`` (of ``shape`` per example) is the output of ``ops``. Returns (N, m), ``-inf`` where ``rows``
    is False. Each example bounds its own neurons only (padded to the largest count): with each
    row kept as its window (:func:`_patch_rows`) for a convolution's neurons above local layers,
    else with dense rows (:func:`_dense_rows`).
    """
    out = torch.full(rows.shape, -math.inf, dtype=x.dtype, device=x.device)
    union = rows.any(dim=0).nonzero().squeeze(1)
    if not len(union):
        return out
    picked = rows[:, union]
    count = picked.sum(dim=1)
    order = torch.argsort((~picked).to(torch.int8), dim=1, stable=True)[:, :int(count.max())]  # own rows first
    if _local(ops):
        bound = _patch_rows(ops, inputs, union[order], sign, ball, x, shape)
    else:
        bound = _dense_rows(ops, inputs, union, order, sign, ball, x, shape)
    valid = torch.arange(order.shape[1], device=x.device) < count.unsqueeze(1)
    return out.scatter_(1, union[order], bound.where(valid, out[:, :1]))


def _tighten(ops: list[BoundOp], inputs: list[Interval], bounds: Interval, ball: LpBall, x: Tensor) -> Interval:
    """Intersect ``bounds`` of the output of ``ops`` with CROWN's, for the neurons they leave unstable.

    Stable neurons stay as they are: bounding them again would not change a ReLU's relaxation, and
    CROWN's cost grows with the number of neurons bounded. Upper bounds come first; a neuron CROWN
    proves inactive (upper bound <= 0) needs no lower bound (its ReLU is 0 whatever it is), so it
    keeps the interval's.
    """
    shape = bounds[0].shape[1:]
    lower, upper = (b.flatten(1) for b in bounds)
    unstable = (lower < 0) & (upper > 0)
    upper = torch.minimum(upper, -_neuron_bounds(ops, inputs, unstable, -1.0, ball, x, shape))
    lower = torch.maximum(lower, _neuron_bounds(ops, inputs, unstable & (upper > 0), 1.0, ball, x, shape))
    return lower.view_as(bounds[0]), upper.view_as(bounds[1])


def _exact_affine(ops: list[BoundOp], inputs: list[Interval], bounds: Interval, ball: LpBall, x: Tensor) -> Interval:
    r"""Exact bounds on the output of an affine chain ``ops`` (the first linear/conv layer and what precedes it).

    Each output :math:`w_j \cdot x' + b_j` is bounded over the threat model by :meth:`LpBall.concretise`:
    through the dual norm of the row :math:`w_j`, and over the box (the interval ``bounds``).
    """
    shape = bounds[0].shape[1:]
    Lambda, beta = _backward(ops, inputs, _identity(shape, torch.arange(shape.numel(), device=x.device), x))
    lower = ball.concretise(Lambda, x) + beta
    upper = -ball.concretise(-Lambda, x) + beta
    return lower.view_as(bounds[0]), upper.view_as(bounds[1])


def _propagate(ops: list[BoundOp], ball: LpBall, x: Tensor, crown: bool) -> tuple[list[Interval], Interval]:
    """Bounds on every layer's input, and on the output, by IBP, tightened by CROWN at ReLUs if ``crown``.

    The first mixing layer's outputs are exact functions of the input set: interval arithmetic is
    exact there for a box (Linf); for another ball they are concretised through the dual norm
    (:func:`_exact_affine`). CROWN bounds a ReLU's input only when two or more mixing layers lie
    below it; there the bounds are the intersection of both (each sound).
    """
    inputs: list[Interval] = []
    bounds, mixing = ball.box(x), 0
    for i, op in enumerate(ops):
        if crown and not op.affine and mixing > 1:
            bounds = _tighten(ops[:i], inputs, bounds, ball, x)
        inputs.append(bounds)
        bounds = op.interval(*bounds)
        mixing += op.mixing
        if op.mixing and mixing == 1 and ball.p != math.inf:  # a box: interval arithmetic is already exact
            bounds = _exact_affine(ops[:i + 1], inputs, bounds, ball, x)
    return inputs, bounds


def _check_spec(spec: Tensor | None, x: Tensor, classes: int) -> Tensor | None:
    if spec is None:
        return None
    if not isinstance(spec, Tensor) or spec.dim() != 3 or spec.shape[0] != len(x) or spec.shape[2] != classes:
        shape = tuple(spec.shape) if isinstance(spec, Tensor) else type(spec).__name__
        raise ValueError(f"spec must be a tensor of shape (N={len(x)}, K, C={classes}), got {shape}")
    return spec.to(x.dtype)


def interval_bounds(model: nn.Module, x: Tensor, eps: float | LpBall, spec: Tensor | None = None) -> Interval:
    r"""Interval bound propagation, Gowal et al. (2018) :cite:`gowal2018effectiveness` (eq. 6).

    Each layer maps the box of its input to the box of its output: for an affine layer with centre
    :math:`c = (\overline{z} + \underline{z})/2` and radius :math:`r = (\overline{z} - \underline{z})/2`,

    .. math:: \underline{h} = Wc + b - |W| r, \qquad \overline{h} = Wc + b + |W| r,

    and a ReLU clamps both ends. Bounds on :math:`f(x')` (N, C) for every :math:`x'` in the threat
    model ``eps``: an :class:`~robustdl.threat.LpBall`, or a bare radius for the Linf ball, within
    [0, 1]. For an L2 or L1 ball the first linear/conv layer is bounded through the dual norm of
    its rows, :math:`Wx + b \pm \epsilon \|W_j\|_q` (and the box, whichever is tighter); the later
    layers by intervals. With ``spec`` :math:`C` (N, K, C), bounds (N, K) on
    :math:`C f(x')`; the specification is merged into the last affine layer first,
    :math:`(CW, Cb)`, as Gowal et al. do, which is tighter than bounding :math:`C` over the logits' box.
    Differentiable: :func:`robustdl.train.certified.ibp_loss` trains through it.
    """
    ops, ball = operators(model), as_ball(eps)
    inputs, output = _propagate(ops, ball, check_images(x), crown=False)
    spec = _check_spec(spec, x, output[0].shape[1])
    return output if spec is None else _interval_spec(ops, inputs, output, spec)


def _interval_spec(ops: list[BoundOp], inputs: list[Interval], output: Interval, spec: Tensor) -> Interval:
    """IBP's bounds (N, K) on ``spec`` (N, K, C) times the output, merged into the last affine layer if there is one."""
    if ops and ops[-1].affine:
        A, bias = ops[-1].backward(spec, *inputs[-1])
        return _concretize(A, *inputs[-1]) + bias, -_concretize(-A, *inputs[-1]) + bias
    return _concretize(spec, *output), -_concretize(-spec, *output)


def crown_bounds(model: nn.Module, x: Tensor, eps: float | LpBall, spec: Tensor | None = None,
                 intermediate: str = "crown", upper: bool = True) -> tuple[Tensor, Tensor | None]:
    r"""CROWN, Zhang et al. (2018) :cite:`zhang2018efficient` (Theorem 3.2), with CROWN-Ada's lower slope.

    Going backwards from the specification :math:`\Lambda = C`, each affine layer maps
    :math:`\Lambda \leftarrow \Lambda W` (collecting :math:`\Lambda b`) and each ReLU replaces itself by
    one of its two lines (:class:`BoundReLU`), so that :math:`C f(x') \ge \Lambda x' + \beta` on the
    whole input set; the linear function is then bounded over the set (:meth:`LpBall.concretise`):
    over the box :math:`[\underline{x}, \overline{x}]` (exact for Linf) and, for an L2 or L1 ball,
    through the dual norm, keeping the tighter,

    .. math:: \underline{m} = \max\big(\Lambda^+ \underline{x} + \Lambda^- \overline{x},\;
              \Lambda x - \epsilon \|\Lambda\|_q\big) + \beta.

    ``eps`` is an :class:`~robustdl.threat.LpBall` or a bare radius (the Linf ball).
    The upper bound is minus the lower bound of :math:`-C` (``upper=False`` skips it and returns
    ``None`` in its place). The relaxation of each ReLU needs bounds
    on its input: with ``intermediate="crown"`` (the default, the paper's) they come from CROWN
    itself, run for the neurons that interval arithmetic leaves unstable (and intersected with the
    interval bounds); with ``"ibp"`` from interval arithmetic, the cheaper choice of CROWN-IBP
    :cite:`zhang2020towards`. Returns bounds (N, C), or (N, K) with ``spec`` (N, K, C). CROWN is
    exact for a network without ReLUs, but it is not always tighter than :func:`interval_bounds`
    (the chapter shows a network where it is looser).
    """
    if intermediate not in ("crown", "ibp"):
        raise ValueError(f"intermediate must be 'crown' or 'ibp', got {intermediate!r}")
    ops, ball = operators(model), as_ball(eps)
    inputs, (lower, _) = _propagate(ops, ball, check_images(x), crown=intermediate == "crown")
    spec = _check_spec(spec, x, lower.shape[1])
    if spec is None:
        spec = _identity(lower.shape[1:], torch.arange(lower.shape[1], device=x.device), x)
    return _crown(ops, inputs, spec, ball, x, upper)


def preactivation_bounds(model: nn.Module, x: Tensor, eps: float | LpBall, method: str = "crown") -> list[Interval]:
    """Bounds on the input of every ReLU of ``model`` (in order), by ``method`` ``"crown"`` or ``"ibp"``.

    Neurons with lower bound >= 0 or upper bound <= 0 are *stable* over the ball; the others are
    the ones a relaxation (or a mixed-integer program's binary variable) must handle. With CROWN,
    only the neurons interval arithmetic leaves unstable are tightened, and a neuron proved
    inactive keeps its interval lower bound (:func:`_tighten`).
    """
    if method not in ("crown", "ibp"):
        raise ValueError(f"method must be 'crown' or 'ibp', got {method!r}")
    ops = operators(model)
    inputs, _ = _propagate(ops, as_ball(eps), check_images(x), crown=method == "crown")
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


#: A margin bound: ``(model, x, y, eps) -> `` lower bounds (N, C-1); ``eps`` a radius or an ``LpBall``.
Margin = Callable[[nn.Module, Tensor, Tensor, "float | LpBall"], Tensor]


def _margin(bounds: Callable[..., tuple[Tensor, Tensor | None]], model: nn.Module, x: Tensor, y: Tensor,
            eps: float | LpBall, **options: bool) -> Tensor:
    check_labels(y, check_images(x))
    with torch.no_grad():
        classes = model(x[:1]).shape[1]
    return bounds(model, x, eps, spec=margin_spec(y, classes), **options)[0]


def ibp_margin(model: nn.Module, x: Tensor, y: Tensor, eps: float | LpBall) -> Tensor:
    r"""IBP lower bounds (N, C-1) on the margins :math:`f_y(x') - f_j(x')`, :math:`j \ne y`, over the ball."""
    return _margin(interval_bounds, model, x, y, eps)


def crown_margin(model: nn.Module, x: Tensor, y: Tensor, eps: float | LpBall) -> Tensor:
    r"""CROWN lower bounds (N, C-1) on the margins :math:`f_y(x') - f_j(x')`, :math:`j \ne y`, over the ball."""
    return _margin(crown_bounds, model, x, y, eps, upper=False)


def crown_ibp_margin(model: nn.Module, x: Tensor, y: Tensor, eps: float | LpBall, beta: float = 1.0) -> Tensor:
    r"""CROWN-IBP lower bounds (N, C-1) on the margins, Zhang et al. (2020) :cite:`zhang2020towards`, Section 3.

    One interval pass (IBP) bounds every layer; one CROWN backward pass from the margin
    specification to the input then bounds the margins, relaxing each ReLU with the interval bounds
    of its input (:func:`crown_bounds` with ``intermediate="ibp"``: the cost of a backward pass of
    C-1 rows, against CROWN's pass per layer). With ``beta`` in [0, 1] it returns the paper's mix of
    the two sound bounds of the same interval pass, itself sound,

    .. math:: \beta\, \underline{m}_{\text{CROWN-IBP}} + (1 - \beta)\, \underline{m}_{\text{IBP}},

    which :func:`robustdl.train.certified.crown_ibp_loss` trains through (``beta=0`` is
    :func:`ibp_margin` exactly). Differentiable. Neither bound is always the tighter: on IBP-trained
    networks CROWN-IBP is often the looser, as the paper observes. Taught in the chapter
    *Linear relaxations and certified training*.
    """
    beta = check_fraction(beta, "beta")
    check_labels(y, check_images(x))
    ops, ball = operators(model), as_ball(eps)
    inputs, output = _propagate(ops, ball, x, crown=False)
    spec = margin_spec(y, output[0].shape[1]).to(x.dtype)
    crown = _crown(ops, inputs, spec, ball, x, upper=False)[0] if beta > 0 else 0.0
    ibp = _interval_spec(ops, inputs, output, spec)[0] if beta < 1 else 0.0
    return beta * crown + (1 - beta) * ibp  # each term skipped at its weight 0, the other kept exactly


def certified(model: nn.Module, x: Tensor, y: Tensor, eps: float | LpBall, bound: Margin = crown_margin) -> Tensor:
    """Whether every margin's lower bound is positive (N,) bool: no input in the ball changes the label from y."""
    return (bound(model, x, y, eps) > 0).all(dim=1)


def certified_accuracy(model: nn.Module, x: Tensor, y: Tensor, eps: float | LpBall, bound: Margin = crown_margin,
                       batch_size: int = 50) -> float:
    """The fraction of examples certified correct in the threat model ``eps`` (a lower bound on robust accuracy).

    An example counts only if it is classified as ``y`` everywhere in its ball; bounds run without
    gradients, ``batch_size`` examples at a time (CROWN's memory grows with the batch).
    """
    check_labels(y, check_images(x))
    check_positive_int(batch_size, "batch_size")
    as_ball(eps)  # a bad eps fails here, before any batch
    with torch.no_grad():
        hits = sum(int(certified(model, x[i:i + batch_size], y[i:i + batch_size], eps, bound).sum())
                   for i in range(0, len(x), batch_size))
    return hits / max(len(x), 1)
