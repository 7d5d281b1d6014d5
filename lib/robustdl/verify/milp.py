r"""The exact worst-case margin of a small ReLU network, by mixed-integer linear programming.

Tjeng et al. (2019) :cite:`tjeng2019evaluating` encode :math:`h = \mathrm{ReLU}(z)` with
pre-activation bounds :math:`l < 0 < u` exactly by one binary variable :math:`a`:

.. math:: h \ge z, \quad h \ge 0, \quad h \le u\,a, \quad h \le z - l\,(1 - a), \quad a \in \{0, 1\}

(:math:`a = 1`: :math:`h = z \ge 0`; :math:`a = 0`: :math:`h = 0 \ge z`). Stable neurons need no binary
(:math:`h = z` if :math:`l \ge 0`, :math:`h = 0` if :math:`u \le 0`), so tighter bounds (here CROWN's,
:func:`~robustdl.verify.bounds.preactivation_bounds`) mean fewer binaries and smaller big-M
constants. Minimising :math:`f_y - f_j` over the Linf ball within [0, 1] is then a MILP, solved to
optimality by HiGHS (``scipy.optimize.milp``): the reference against which every relaxation of
:mod:`robustdl.verify.bounds` is tested. Exponential in the number of unstable neurons: for small
networks. Taught in the chapter *Linear relaxations and certified training*.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, OptimizeResult, milp
from scipy.sparse import lil_array
from torch import Tensor, nn

from robustdl._checks import check_images, check_labels, check_nonnegative
from robustdl.verify.bounds import crown_margin, input_box, preactivation_bounds
from robustdl.verify.operators import layers

__all__ = ["MarginResult", "Program", "exact_margin", "exact_min_margin"]


@dataclass(frozen=True)
class MarginResult:
    """The exact minimum of each margin :math:`f_y - f_j` over the ball, and where it is attained.

    ``margins`` (C-1,) and ``inputs`` (C-1, \\*x.shape[1:]) are indexed like ``classes`` (the
    :math:`j \\ne y` in increasing order); ``status`` is the solver's message.
    """

    margins: Tensor
    inputs: Tensor
    classes: Tensor
    status: str


def _affine_map(modules: list[nn.Module], shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The matrix and offset ``(W, b)`` of a chain of affine layers on flattened inputs of ``shape``."""
    dim = int(np.prod(shape))
    basis = torch.cat([torch.zeros(1, dim), torch.eye(dim)]).double().view(dim + 1, *shape)
    with torch.no_grad():
        out = nn.Sequential(*modules)(basis).flatten(1).numpy()
    return (out[1:] - out[0]).T, out[0]


class Program:
    r"""A mixed-integer linear program built layer by layer: Tjeng et al. (2019), Sec. 3.

    :cite:`tjeng2019evaluating`. The variables are the input (bounded by the box), then each
    ReLU layer's outputs and one binary per unstable neuron; the constraints are rows
    ``lower <= coefficients @ variables <= upper``. :meth:`relu_layer` adds a layer with the
    exact encoding of the module docstring; :meth:`solver` minimises a linear objective over the
    program with HiGHS. :func:`exact_margin` builds one per example. Taught in the chapter
    *Linear relaxations and certified training* (book/05-verification/linear-relaxations.ipynb).

    Args:
        lower, upper: the bounds of the input variables, shape (n,).
    """

    def __init__(self, lower: np.ndarray, upper: np.ndarray) -> None:
        self.lower, self.upper, self.integer = list(lower), list(upper), [0] * len(lower)
        self.rows: list[tuple[dict[int, float], float, float]] = []

    def add_variables(self, lower: np.ndarray, upper: np.ndarray, integer: bool) -> np.ndarray:
        first = len(self.lower)
        self.lower += list(lower)
        self.upper += list(upper)
        self.integer += [int(integer)] * len(lower)
        return np.arange(first, first + len(lower))

    def add_row(self, coefficients: dict[int, float], lower: float, upper: float) -> None:
        self.rows.append((coefficients, lower, upper))

    def relu_layer(self, prev: np.ndarray, W: np.ndarray, b: np.ndarray, lo: np.ndarray, up: np.ndarray) -> np.ndarray:
        r"""Variables :math:`h = \mathrm{ReLU}(W h_{prev} + b)` with :math:`z \in [l, u]`, Tjeng et al.'s encoding."""
        h = self.add_variables(np.maximum(lo, 0), np.maximum(up, 0), integer=False)
        for i in range(len(b)):
            z = {int(v): -float(w) for v, w in zip(prev, W[i], strict=True) if w != 0}  # -z's linear part
            if lo[i] >= 0:  # active: h = z
                self.add_row({**z, int(h[i]): 1.0}, b[i], b[i])
            elif up[i] > 0:  # unstable: h >= z, h <= u a, h <= z - l (1 - a)
                (a,) = self.add_variables(np.zeros(1), np.ones(1), integer=True)
                self.add_row({**z, int(h[i]): 1.0}, b[i], np.inf)
                self.add_row({int(h[i]): 1.0, int(a): -float(up[i])}, -np.inf, 0.0)
                self.add_row({**z, int(h[i]): 1.0, int(a): -float(lo[i])}, -np.inf, b[i] - lo[i])
        return h  # inactive neurons keep the bounds [0, 0]

    def solver(self, time_limit: float | None) -> Callable[[np.ndarray], OptimizeResult]:
        """A function minimising ``c @ variables`` over the program, the constraint matrix built once."""
        A = lil_array((len(self.rows), len(self.lower)))
        for r, (coefficients, _, _) in enumerate(self.rows):
            for v, w in coefficients.items():
                A[r, v] = w
        constraints = [LinearConstraint(A.tocsr(), [lo for _, lo, _ in self.rows], [hi for _, _, hi in self.rows])]
        options = {"mip_rel_gap": 1e-9, **({} if time_limit is None else {"time_limit": time_limit})}
        bounds = Bounds(self.lower, self.upper)
        return lambda c: milp(c, integrality=np.array(self.integer), bounds=bounds,
                              constraints=constraints if self.rows else [], options=options)


def _blocks(modules: list[nn.Module]) -> list[list[nn.Module]]:
    """Split the layers at each ReLU: the affine chains before, between and after them."""
    blocks: list[list[nn.Module]] = [[]]
    for m in modules:
        if isinstance(m, nn.ReLU):
            blocks.append([])
        else:
            blocks[-1].append(m)
    return blocks


def exact_margin(model: nn.Module, x: Tensor, y: Tensor, eps: float, time_limit: float | None = None,
                 classes: Sequence[int] | None = None) -> MarginResult:
    r"""The exact :math:`\min_{x' \in B(x)} f_y(x') - f_j(x')` for every :math:`j \ne y`, Tjeng et al. (2019).

    One example, ``x`` of shape (1, ...) and ``y`` (1,); :math:`B(x)` is the Linf ball of radius
    ``eps`` within [0, 1]. The network's affine chains are read off as dense matrices, on the CPU
    in float64 (a copy: the model stays where it is), so this is for small networks. The margins
    come back in float64, the inputs in ``x``'s dtype, both on ``x``'s device. ``classes``
    restricts the solves to those :math:`j` (default: all). Raises ``RuntimeError`` if HiGHS
    does not prove optimality (e.g. within ``time_limit`` seconds per margin).
    """
    check_labels(y, check_images(x))
    if len(x) != 1:
        raise ValueError(f"x must hold one example, shape (1, ...), got shape {tuple(x.shape)}")
    eps = check_nonnegative(eps, "eps")
    net = copy.deepcopy(nn.Sequential(*layers(model))).to("cpu", torch.float64)  # leaving the model as it is
    x64 = x.detach().to("cpu", torch.float64)
    box_lower, box_upper = (t.flatten().numpy() for t in input_box(x64, eps))
    with torch.no_grad():
        relu_bounds = preactivation_bounds(net, x64, eps)
    blocks = _blocks(list(net))

    program, prev, shape = Program(box_lower, box_upper), np.arange(len(box_lower)), tuple(x.shape[1:])
    for block, (lower, upper) in zip(blocks, relu_bounds, strict=False):  # the last block has no ReLU
        W, b = _affine_map(block, shape)
        prev = program.relu_layer(prev, W, b, lower.flatten().numpy(), upper.flatten().numpy())
        shape = tuple(lower.shape[1:])
    W, b = _affine_map(blocks[-1], shape)

    label = int(y)
    classes = torch.tensor([j for j in (range(len(b)) if classes is None else classes) if j != label],
                           dtype=torch.long, device=x.device)
    solve, margins, inputs = program.solver(time_limit), [], []
    for j in classes.tolist():
        c = np.zeros(len(program.lower))
        c[prev] = W[label] - W[j]
        result = solve(c)
        if result.status != 0:
            raise RuntimeError(f"the MILP for margin {label} - {j} was not solved to optimality: {result.message}")
        margins.append(result.fun + b[label] - b[j])
        inputs.append(result.x[: len(box_lower)])
    inputs_t = torch.tensor(np.clip(np.stack(inputs), box_lower, box_upper)).view(len(classes), *x.shape[1:])
    margins_t = torch.tensor(margins, dtype=torch.float64, device=x.device)
    return MarginResult(margins_t, inputs_t.to(device=x.device, dtype=x.dtype), classes, "optimal")


def exact_min_margin(model: nn.Module, x: Tensor, y: Tensor, eps: float, time_limit: float | None = None) -> float:
    r"""The exact worst-case margin :math:`\min_{j \ne y} \min_{x' \in B(x)} f_y(x') - f_j(x')`: positive iff robust.

    Solves the margins in increasing order of their CROWN lower bounds and skips every :math:`j`
    whose CROWN bound is already above the smallest exact margin found: its exact margin is larger.
    """
    with torch.no_grad():
        crown = crown_margin(copy.deepcopy(model).double(), x.double(), y, eps)[0]
    others = [j for j in range(len(crown) + 1) if j != int(y)]
    best = math.inf
    for k in crown.argsort().tolist():
        if crown[k] >= best:
            break
        best = min(best, float(exact_margin(model, x, y, eps, time_limit, classes=[others[k]]).margins[0]))
    return best
