r"""Converging bounds by Lipschitz global optimisation: DeepGO, Ruan, Huang and Kwiatkowska (2018).

:cite:`ruan2018reachability` bound the reachable values of :math:`w = o \circ f`, a network
``f`` followed by a Lipschitz function ``o`` of its outputs, over a box :math:`[a, b]^n` of
chosen input dimensions (the other pixels fixed). A Lipschitz constant ``K`` gives the lower
bound function (their Eq. 7)

.. math:: h(x, y) = w(y) - K |x - y|, \qquad h(x, y) \le w(x), \quad h(x, x) = w(x),

and after sampling :math:`\mathcal{Y}_i = \{y_0, \dots, y_i\}` the bounds (Eq. 8-10)

.. math:: l_i = \min_{x \in [a, b]} \max_{y \in \mathcal{Y}_i} h(x, y)
          \;\le\; \min_{x \in [a, b]} w(x) \;\le\; u_i = \min_{y \in \mathcal{Y}_i} w(y),

with :math:`l_i` nondecreasing, :math:`u_i` nonincreasing and :math:`u_i - l_i \to 0`. The next
sample is the minimiser of the saw-tooth :math:`\max_y h(\cdot, y)`, in the interval
:math:`[y_j, y_{j+1}]` where its minimum :math:`z_j` is lowest (Piyavskii's rule,
:cite:`piyavskii1972algorithm`):

.. math:: y^\ast = \frac{y_j + y_{j+1}}{2} + \frac{w(y_j) - w(y_{j+1})}{2K}, \qquad
          z_j = \frac{w(y_j) + w(y_{j+1})}{2} - K \frac{y_{j+1} - y_j}{2}.

Several dimensions are handled by the paper's nested scheme,
:math:`\min_{x} w(x) = \min_{x_1} \cdots \min_{x_n} w(x_1, \dots, x_n)`: the value at ``x_1`` of
the outer one-dimensional search is itself a one-dimensional search over ``x_2`` (and so on),
which returns an interval [lower, upper] rather than a number. The outer search then draws its
saw-tooth from the inner lower bounds and takes its upper bound from the inner upper bounds, so
every level's bounds stay sound. Level ``k`` of ``n`` stops within :math:`\text{tol} \cdot (n - k)
/ n`, so each level adds at most ``tol / n`` to the gap of the level below.

Taught in the chapter *Converging bounds* (book/05-verification/converging-bounds.ipynb).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from robustdl._checks import check_images, check_nonnegative, check_positive_int
from robustdl._model import check_model, eval_mode
from robustdl.losses import goal_margin

__all__ = [
    "Bounds",
    "Level",
    "SafetyResult",
    "logit_of",
    "minimise",
    "oplus",
    "probability_of",
    "reachability",
    "safety",
    "sawtooth_minima",
    "search_1d",
]

#: An output function ``o``: logits of shape (1, m) to one value (the paper's Lipschitz ``o``).
OutputFn = Callable[[Tensor], Tensor]
#: A function to minimise: a point of shape (n,) to a real number.
Objective = Callable[[np.ndarray], float]
#: The safety factor :math:`\eta > 1` of the dynamic Lipschitz estimate
#: :math:`K = \eta \max_j |w(y_{j+1}) - w(y_j)| / (y_{j+1} - y_j)` (the observed slopes).
SAFETY_FACTOR = 2.0
#: Evaluations of each one-dimensional search (the ``MAX_ITERATION`` of the authors' code).
MAX_EVALS = 500
#: The smallest Lipschitz estimate, so that a flat start still gives a finite candidate point.
_MIN_LIPSCHITZ = 1e-12


@dataclass(frozen=True)
class Bounds:
    r"""The converging bounds :math:`l \le \min_{[a, b]^n} w \le u` of :func:`minimise`.

    Attributes:
        lower: the last :math:`l_i`, a lower bound of the minimum (given a valid ``K``).
        upper: the last :math:`u_i = w(\text{argmin})`, an attained value, so an upper bound.
        argmin: the sample where ``upper`` is attained, shape (n,).
        history: the pairs :math:`(l_i, u_i)` of the outermost one-dimensional search.
        samples: every point where ``w`` was evaluated, shape (E, n), and ``values`` there, (E,).
        lipschitz: the final Lipschitz constant of the outermost search.
    """

    lower: float
    upper: float
    argmin: np.ndarray
    history: tuple[tuple[float, float], ...]
    samples: np.ndarray
    values: np.ndarray
    lipschitz: float

    @property
    def gap(self) -> float:
        """:math:`u - l`, the width of the interval that holds the minimum."""
        return self.upper - self.lower


@dataclass(frozen=True)
class Level:
    r"""What one one-dimensional search (:func:`search_1d`) reports to the level above it.

    Attributes:
        lower, upper: :math:`l \le \min_{[a, b]} \phi \le u`; equal for an exact value.
        argmin: the point (of every dimension so far) where ``upper`` is attained.
        history: the pairs :math:`(l_i, u_i)` of the search, empty for an exact value.
        lipschitz: the constant ``K`` the search ended with (0 for an exact value).
    """

    lower: float
    upper: float
    argmin: np.ndarray
    history: tuple[tuple[float, float], ...]
    lipschitz: float


def sawtooth_minima(ys: np.ndarray, lows: np.ndarray, k: float) -> tuple[np.ndarray, np.ndarray]:
    r"""The minima of the saw-tooth lower bound between samples: Ruan et al. (2018) Eq. 9-10, Piyavskii's rule.

    :cite:`ruan2018reachability`, :cite:`piyavskii1972algorithm`. Per interval
    :math:`[y_j, y_{j+1}]`, the minimiser :math:`y^\ast` and minimum :math:`z_j` of
    :math:`\max(l_j - K|x - y_j|, l_{j+1} - K|x - y_{j+1}|)`:

    .. math:: y^\ast = \frac{y_j + y_{j+1}}{2} + \frac{l_j - l_{j+1}}{2K}, \qquad
              z_j = \max(l_j - K (y^\ast - y_j),\, l_{j+1} - K (y_{j+1} - y^\ast)).

    The crossing point is clipped into the interval, which covers bounds ``l_j`` that differ by
    more than :math:`K (y_{j+1} - y_j)` (inner levels report intervals, not exact values).
    Taught in the chapter *Converging bounds* (book/05-verification/converging-bounds.ipynb).

    Args:
        ys: the sorted samples :math:`y_0 < \dots < y_i`, shape (m,).
        lows: the lower bounds :math:`l_j` of the function at them (its values, at the innermost level), (m,).
        k: the Lipschitz constant :math:`K > 0`.

    Returns:
        ``(t, z)``, each of shape (m - 1,): the minimiser and the minimum of each interval.
    """
    left, right = ys[:-1], ys[1:]
    t = np.clip((left + right) / 2 + (lows[:-1] - lows[1:]) / (2 * k), left, right)
    z = np.maximum(lows[:-1] - k * (t - left), lows[1:] - k * (right - t))
    return t, z


def _slope_estimate(ys: np.ndarray, ups: np.ndarray) -> float:
    """The largest observed slope :math:`\\max_j |w(y_{j+1}) - w(y_j)| / (y_{j+1} - y_j)`."""
    return float(np.max(np.abs(np.diff(ups)) / np.diff(ys)))


def search_1d(
    phi: Callable[[float], Level],
    a: float,
    b: float,
    tol: float,
    lipschitz: float | None,
    max_evals: int,
) -> Level:
    r"""Bound :math:`\min_{t \in [a, b]} \phi(t)` by Piyavskii's search: one level of Ruan et al. (2018) Eq. 6-10.

    :cite:`ruan2018reachability`. After samples :math:`\mathcal{Y}_i` the bounds are (Eq. 8-10)
    :math:`l_i = \min_j z_j` (:func:`sawtooth_minima`) and :math:`u_i = \min_{y \in \mathcal{Y}_i}
    \phi(y)`; the next sample is the minimiser :math:`y^\ast` of the interval with the lowest
    :math:`z_j`. ``phi(t)`` reports an interval (:class:`Level`): the bounds of the inner
    dimensions' minimum at ``t`` (:func:`minimise` nests the searches), or an exact value.
    Taught in the chapter *Converging bounds* (book/05-verification/converging-bounds.ipynb).

    Args:
        phi: the function of one variable, returning a :class:`Level`.
        a, b: the interval, :math:`a \le b`.
        tol: stop when :math:`u_i - l_i \le` ``tol``.
        lipschitz: a Lipschitz constant ``K`` of ``phi``, or None to estimate it from the observed
            slopes (:data:`SAFETY_FACTOR` times the largest, never decreasing).
        max_evals: stop after this many evaluations of ``phi``.

    Returns:
        A :class:`Level`: the last bounds, where the upper one is attained, the history
        :math:`(l_i, u_i)` and the final ``K``.
    """
    if b - a <= 0:
        only = phi(a)
        return Level(only.lower, only.upper, only.argmin, ((only.lower, only.upper),), 0.0)
    # The ends alone can show no slope (|x| on [-1, 1]): start from the ends and the midpoint.
    ys = np.array([a, (a + b) / 2, b])
    found = [phi(y) for y in ys]
    lows, ups = np.array([f.lower for f in found]), np.array([f.upper for f in found])
    k, history = 0.0, []
    while True:
        k = lipschitz if lipschitz is not None else max(k, SAFETY_FACTOR * _slope_estimate(ys, ups), _MIN_LIPSCHITZ)
        t, z = sawtooth_minima(ys, lows, k)
        j, best = int(z.argmin()), int(ups.argmin())
        lower, upper = float(z[j]), float(ups[best])
        history.append((lower, upper))
        stuck = not ys[j] < t[j] < ys[j + 1]  # inner bounds too loose to split this interval further
        if upper - lower <= tol or ys.size >= max_evals or stuck:
            return Level(lower, upper, found[best].argmin, tuple(history), k)
        new = phi(float(t[j]))
        found.insert(j + 1, new)
        ys, lows, ups = np.insert(ys, j + 1, t[j]), np.insert(lows, j + 1, new.lower), np.insert(ups, j + 1, new.upper)


def _check_box(lower: Sequence[float] | np.ndarray, upper: Sequence[float] | np.ndarray) -> tuple[np.ndarray, ...]:
    lo, hi = np.atleast_1d(np.asarray(lower, dtype=float)), np.atleast_1d(np.asarray(upper, dtype=float))
    if lo.ndim != 1 or lo.shape != hi.shape or lo.size == 0:
        raise ValueError(f"lower and upper must be 1-D and of one length >= 1, got shapes {lo.shape} and {hi.shape}")
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()) or (lo > hi).any():
        raise ValueError(f"the box must be finite with lower <= upper, got lower {lo} and upper {hi}")
    return lo, hi


def _check_lipschitz(lipschitz: float | Sequence[float] | None, n: int) -> list[float | None]:
    if lipschitz is None:
        return [None] * n
    values = [lipschitz] * n if isinstance(lipschitz, (int, float)) else list(lipschitz)
    if len(values) != n:
        raise ValueError(f"lipschitz must be one number or one per dimension ({n}), got {len(values)}")
    for value in values:
        if check_nonnegative(value, "lipschitz") == 0:
            raise ValueError(f"lipschitz must be > 0, got {value}")
    return [float(v) for v in values]


def minimise(
    fn: Objective,
    lower: Sequence[float] | np.ndarray,
    upper: Sequence[float] | np.ndarray,
    tol: float,
    lipschitz: float | Sequence[float] | None = None,
    max_evals: int = MAX_EVALS,
) -> Bounds:
    r"""Bound :math:`\min_{x \in [a, b]^n} w(x)` from both sides, Ruan et al. (2018) Eq. 6-10.

    :cite:`ruan2018reachability`. One-dimensional searches by Piyavskii's rule with the lower
    bound function :math:`h(x, y) = w(y) - K|x - y|` (Eq. 7), nested over the dimensions (the
    module docstring). Each search stops when :math:`u_i - l_i \le` its tolerance or after
    ``max_evals`` evaluations.

    Args:
        fn: the function ``w``, called with a point of shape (n,), returning a real number.
        lower, upper: the box :math:`[a, b]^n`, sequences of length n (or numbers for n = 1).
        tol: the requested gap :math:`u - l > 0` (the paper's error :math:`\epsilon`).
        lipschitz: a Lipschitz constant of ``w`` in each coordinate (one number, or one per
            dimension; a constant for any :math:`L_p` norm serves). With it the bounds are
            guaranteed. Without it, each search estimates ``K`` as it goes, as the paper does:
            :data:`SAFETY_FACTOR` :math:`= 2` times the largest slope observed between neighbouring
            samples, never decreasing. Estimated bounds are only as sound as that estimate, and
            :math:`l_i` may step down when the estimate grows.
        max_evals: the evaluation budget of each one-dimensional search (>= 3); the total is at
            most ``max_evals ** n``.

    Returns:
        :class:`Bounds` with :math:`l \le \min w \le u`, the sequence :math:`(l_i, u_i)`, and every
        evaluated point.
    """
    lo, hi = _check_box(lower, upper)
    tol = check_nonnegative(tol, "tol")
    if tol == 0:
        raise ValueError("tol must be > 0: the bounds close only in the limit")
    if check_positive_int(max_evals, "max_evals") < 3:
        raise ValueError(f"max_evals must be >= 3 (the ends and the midpoint), got {max_evals}")
    constants, n = _check_lipschitz(lipschitz, lo.size), lo.size
    samples: list[np.ndarray] = []
    values: list[float] = []

    def level(k: int, prefix: tuple[float, ...]) -> Level:
        def phi(t: float) -> Level:
            point = (*prefix, t)
            if k == n - 1:
                x = np.array(point)
                value = float(fn(x))
                if not math.isfinite(value):
                    raise ValueError(f"fn must return finite values, got {value} at {x}")
                samples.append(x)
                values.append(value)
                return Level(value, value, x, (), 0.0)
            return level(k + 1, point)

        return search_1d(phi, float(lo[k]), float(hi[k]), tol * (n - k) / n, constants[k], max_evals)

    top = level(0, ())
    return Bounds(top.lower, top.upper, top.argmin, top.history, np.array(samples), np.array(values), top.lipschitz)


def logit_of(k: int) -> OutputFn:
    """The output function :math:`o(c) = c_k`: logit ``k``."""
    return lambda logits: logits[:, k]


def probability_of(k: int) -> OutputFn:
    """The output function :math:`o(c) = \\mathrm{softmax}(c)_k`: the probability of class ``k``."""
    return lambda logits: logits.softmax(dim=1)[:, k]


def oplus(j: int) -> OutputFn:
    r"""The seed's safety function :math:`\oplus(c) = \max_{i \ne j} (c_i - c_j)` for the label ``j``.

    Negative exactly where ``j`` keeps the largest logit. The seed takes the maximum over all
    ``i``, which includes :math:`c_j - c_j = 0`, so its :math:`\oplus \ge 0` and safety reads
    :math:`u(\oplus, X', \epsilon) \le 0`; leaving ``i = j`` out keeps the sign informative. It is
    minus the :func:`~robustdl.losses.goal_margin` of the untargeted goal away from ``j``.
    """
    def safety(logits: Tensor) -> Tensor:
        return -goal_margin(logits, logits.new_full((len(logits),), j, dtype=torch.long))

    return safety


def _check_single(model: object, x: object, dims: Sequence[int], radius: object) -> tuple[Tensor, list[int], float]:
    check_model(model)
    x = check_images(x)
    if x.shape[0] != 1:
        raise ValueError(f"x must hold one example, shape (1, ...), got {tuple(x.shape)}")
    dims = list(dims)
    if not dims or len(set(dims)) != len(dims) or not all(isinstance(d, int) and 0 <= d < x.numel() for d in dims):
        raise ValueError(f"dims must be distinct flat indices in [0, {x.numel()}), at least one, got {dims}")
    return x, dims, check_nonnegative(radius, "radius")


def _network_function(model: nn.Module, x: Tensor, dims: list[int], output_fn: OutputFn) -> Objective:
    """``w(v) = o(f(x'))`` where ``x'`` is ``x`` with the pixels ``dims`` set to ``v``."""
    index = torch.tensor(dims, device=x.device)
    flat = x.detach().flatten()

    def w(v: np.ndarray) -> float:
        z = flat.index_copy(0, index, torch.as_tensor(v, dtype=x.dtype, device=x.device))
        with torch.no_grad():
            return float(output_fn(model(z.view_as(x))).reshape(()))

    return w


def _box(x: Tensor, dims: list[int], radius: float) -> tuple[np.ndarray, np.ndarray]:
    """The box :math:`[x_d - r, x_d + r] \\cap [0, 1]` of each chosen dimension."""
    centre = x.detach().flatten()[dims].double().cpu().numpy()
    return np.clip(centre - radius, 0, 1), np.clip(centre + radius, 0, 1)


def reachability(
    model: nn.Module,
    x: Tensor,
    dims: Sequence[int],
    radius: float,
    output_fn: OutputFn,
    tol: float,
    lipschitz: float | Sequence[float] | None = None,
    max_evals: int = MAX_EVALS,
) -> tuple[float, float]:
    r"""The reachable interval :math:`R(o, X', \epsilon) = [l, u]` of Ruan et al. (2018) Eq. 4.

    :cite:`ruan2018reachability`. ``X'`` is ``x`` (one example, shape (1, ...)) with the flat
    input dimensions ``dims`` free in :math:`[x_d - r, x_d + r] \cap [0, 1]`. Two runs of
    :func:`minimise`, on :math:`w = o \circ f` and on :math:`-w`, give
    :math:`\inf w - \epsilon \le l \le \inf w` and :math:`\sup w \le u \le \sup w + \epsilon`
    with :math:`\epsilon` = ``tol`` (guaranteed when ``lipschitz`` is valid).
    """
    x, dims, radius = _check_single(model, x, dims, radius)
    a, b = _box(x, dims, radius)
    with eval_mode(model):
        w = _network_function(model, x, dims, output_fn)
        low = minimise(w, a, b, tol, lipschitz, max_evals)
        high = minimise(lambda v: -w(v), a, b, tol, lipschitz, max_evals)
    return low.lower, -high.lower


@dataclass(frozen=True)
class SafetyResult:
    r"""The answer of :func:`safety`.

    Attributes:
        status: ``"safe"`` (the upper bound of :math:`\max \oplus` is negative), ``"unsafe"``
            (a sample where another class reaches the label's logit: ``witness``), or
            ``"unknown"`` (the maximum lies within ``tol`` of 0, the seed's :math:`2\epsilon` band).
        label: the class ``j`` predicted at ``x``.
        lower, upper: bounds on :math:`\max_{x' \in X'} \oplus(f(x'))`.
        witness: the input with the largest :math:`\oplus` found, shape of ``x``.
    """

    status: Literal["safe", "unsafe", "unknown"]
    label: int
    lower: float
    upper: float
    witness: Tensor


def safety(
    model: nn.Module,
    x: Tensor,
    dims: Sequence[int],
    radius: float,
    tol: float,
    lipschitz: float | Sequence[float] | None = None,
    max_evals: int = MAX_EVALS,
) -> SafetyResult:
    r"""Decide safety (Ruan et al. 2018, Eq. 5) by reachability of :func:`oplus`.

    :cite:`ruan2018reachability`. The network is safe at ``x`` over ``X'`` (the box of
    :func:`reachability`) when every :math:`x' \in X'` keeps the label :math:`j = \arg\max_j
    c_j(x)`, i.e. when :math:`\sup_{X'} \oplus < 0`. Minimising :math:`-\oplus` brackets that
    supremum in an interval of width ``tol``: below 0 is safe, a sample at or above 0 is a
    counterexample, and an interval across 0 is undecided (the reduction's error :math:`2\epsilon`).
    """
    x, dims, radius = _check_single(model, x, dims, radius)
    a, b = _box(x, dims, radius)
    with eval_mode(model), torch.no_grad():
        label = int(model(x).argmax(dim=1))
        w = _network_function(model, x, dims, oplus(label))
        found = minimise(lambda v: -w(v), a, b, tol, lipschitz, max_evals)
    lower, upper = -found.upper, -found.lower
    status: Literal["safe", "unsafe", "unknown"] = "safe" if upper < 0 else "unsafe" if lower >= 0 else "unknown"
    witness = x.detach().flatten().index_copy(
        0, torch.tensor(dims, device=x.device), torch.as_tensor(found.argmin, dtype=x.dtype, device=x.device)
    ).view_as(x)
    return SafetyResult(status, label, lower, upper, witness)
