r"""Threat models: the set of inputs an adversary may choose from.

The threat model around a clean input :math:`x \in [0, 1]^d` is

.. math:: S(x) = \{x' : \|x' - x\|_p \le \epsilon\} \cap [0, 1]^d,

the :math:`L_p` ball of the seed tutorial's problem statement intersected with the box of
valid images. :class:`LpBall` holds everything that depends on the norm, once, so that
attacks, training objectives and verifiers never branch on ``p``:

* :meth:`LpBall.project` -- the Euclidean projection onto :math:`S(x)` (exact, box included),
* :meth:`LpBall.random` -- a uniform random point of the ball, clipped into the box,
* :meth:`LpBall.step` -- the steepest-ascent step :math:`\arg\max_{\|v\|_p \le \alpha} \langle g, v\rangle`,
* :meth:`LpBall.norm` and :meth:`LpBall.dual_norm` -- per-example norms, reduced over every
  non-batch dimension,
* :meth:`LpBall.box` and :meth:`LpBall.concretise` -- the smallest box around the set, and sound
  lower bounds on linear functions over the set (through the dual norm), for the verifiers.

Taught in the chapter *Introduction* (threat models) and used by every attack.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from robustdl._checks import check_fraction, check_images, check_nonnegative
from robustdl._random import integers, normal, uniform

__all__ = ["LpBall", "as_ball", "inner", "parse_norm", "per_example"]

_NORM_NAMES = {"inf": math.inf, "linf": math.inf, "l2": 2.0, "2": 2.0, "l1": 1.0, "1": 1.0}
#: Bisection iterations for the exact L1/L2 projections: the bracket shrinks by 2**-50.
_BISECTION_STEPS = 50


def parse_norm(p: object) -> float:
    """Return the norm order as ``math.inf``, ``2.0`` or ``1.0``.

    Accepts ``float('inf')``, ``2``, ``1`` or the names ``"linf"``, ``"inf"``, ``"l2"``, ``"l1"``.
    """
    if isinstance(p, str) and p.lower() in _NORM_NAMES:
        return _NORM_NAMES[p.lower()]
    if isinstance(p, (int, float)) and not isinstance(p, bool) and float(p) in (math.inf, 2.0, 1.0):
        return float(p)
    raise ValueError(f"norm p must be one of inf, 2, 1 (or 'linf', 'l2', 'l1'), got {p!r}")


def per_example(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-example vector of shape (N,) to broadcast against ``like`` (N, ...)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _bisect(norm_at: Callable[[Tensor], Tensor], hi: Tensor, eps: float) -> Tensor:
    """Smallest multiplier ``lam`` in [0, hi] with ``norm_at(lam) <= eps``, per example.

    ``norm_at`` must be non-increasing in ``lam`` and satisfy ``norm_at(hi) <= eps``. Returns
    the upper end of the final bracket, so the result is always feasible.
    """
    lo = torch.zeros_like(hi)
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        feasible = norm_at(mid) <= eps
        hi = torch.where(feasible, mid, hi)
        lo = torch.where(feasible, lo, mid)
    return hi


def inner(A: Tensor, v: Tensor) -> Tensor:
    r""":math:`\langle A_k, v \rangle` for each example and row: ``A`` (N or 1, K, ...), ``v`` (N, ...) -> (N, K)."""
    a, v = A.flatten(2), v.flatten(1)
    if a.shape[0] == 1:
        return v @ a[0].T
    return torch.bmm(a, v.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class LpBall:
    r"""The threat model :math:`\{x' : \|x' - x\|_p \le \epsilon\} \cap [0, 1]^d`.

    Args:
        p: the norm, ``math.inf``, ``2`` or ``1`` (or ``"linf"``, ``"l2"``, ``"l1"``).
        eps: the radius :math:`\epsilon \ge 0`, in the units of images scaled to [0, 1].

    Example:
        >>> ball = LpBall("linf", 0.3)
        >>> x_adv = ball.project(x + ball.step(grad, 0.01), x)
    """

    p: float
    eps: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", parse_norm(self.p))
        object.__setattr__(self, "eps", check_nonnegative(self.eps, "eps"))

    @property
    def name(self) -> str:
        """The norm's short name: ``"linf"``, ``"l2"`` or ``"l1"``."""
        return {math.inf: "linf", 2.0: "l2", 1.0: "l1"}[self.p]

    def norm(self, delta: Tensor) -> Tensor:
        """The :math:`L_p` norm of each example of ``delta``, shape (N,)."""
        return torch.linalg.vector_norm(delta.flatten(1), ord=self.p, dim=1)

    @property
    def dual_exponent(self) -> float:
        r"""The dual exponent :math:`q`, :math:`1/p + 1/q = 1`: 1 for Linf, 2 for L2, ``math.inf`` for L1."""
        return {math.inf: 1.0, 2.0: 2.0, 1.0: math.inf}[self.p]

    def dual_norm(self, g: Tensor) -> Tensor:
        r"""The dual norm :math:`\|g\|_q`, :math:`1/p + 1/q = 1`, of each example, shape (N,).

        It is the largest first-order change :math:`\max_{\|v\|_p \le 1} \langle g, v \rangle`.
        """
        return torch.linalg.vector_norm(g.flatten(1), ord=self.dual_exponent, dim=1)

    def box(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""The smallest box containing the threat model: :math:`[\max(x - \epsilon, 0), \min(x + \epsilon, 1)]`.

        Every norm's ball lies in the Linf ball of the same radius, and each coordinate reaches
        :math:`x_i \pm \epsilon` (clipped) alone, so this box is the tightest; for Linf it *is* the set.
        """
        return (x - self.eps).clamp(0, 1), (x + self.eps).clamp(0, 1)

    def concretise(self, A: Tensor, x: Tensor) -> Tensor:
        r"""Lower bounds on K linear functions over the set: :math:`\min_{x' \in S(x)} \langle A_k, x' \rangle`.

        ``A`` is (N, K, \*x.shape[1:]), or (1, K, ...) when the same for every example; ``x`` is
        (N, ...). Returns (N, K), the tighter of two sound bounds (the upper bound of
        :math:`\langle A_k, x' \rangle` is minus the lower bound of :math:`-A_k`):

        * over the ball, by Hölder's inequality, exact when the box does not bind:
          :math:`\langle A_k, x \rangle - \epsilon \|A_k\|_q` (:attr:`dual_exponent`);
        * over the :meth:`box` :math:`[l, u]` with centre :math:`c` and radius :math:`r`:
          :math:`\langle A_k, c \rangle - \langle |A_k|, r \rangle`, exact for Linf.

        For Linf the box is the whole set, so only the box bound is computed. This is how IBP and
        CROWN (:mod:`robustdl.verify.bounds`) bound a linear function of the input.
        """
        lower, upper = self.box(x)
        bound = inner(A, (upper + lower) / 2) - inner(A.abs(), (upper - lower) / 2)
        if self.p == math.inf:
            return bound
        dual = torch.linalg.vector_norm(A.flatten(2), ord=self.dual_exponent, dim=2)
        return torch.maximum(bound, inner(A, x) - self.eps * dual)

    def contains(self, x_adv: Tensor, x: Tensor, atol: float = 1e-6) -> Tensor:
        """Whether each ``x_adv`` lies in the ball around ``x`` and in [0, 1], shape (N,) bool."""
        in_box = ((x_adv >= -atol) & (x_adv <= 1 + atol)).flatten(1).all(dim=1)
        return in_box & (self.norm(x_adv - x) <= self.eps * (1 + 1e-5) + atol)

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        r"""Euclidean projection of ``x_adv`` onto the ball around ``x`` intersected with [0, 1].

        The KKT conditions of :math:`\min_u \tfrac12\|u - z\|_2^2` subject to
        :math:`\|u - x\|_p \le \epsilon,\ u \in [0, 1]^d` separate over coordinates:

        * :math:`p = \infty`: :math:`u = \mathrm{clip}(z, x - \epsilon, x + \epsilon)` clipped to [0, 1];
        * :math:`p = 2`: :math:`u(\lambda) = \mathrm{clip}_{[0,1]}(x + (z - x)/(1 + \lambda))`;
        * :math:`p = 1`: :math:`u(\lambda) = \mathrm{clip}_{[0,1]}(x + \mathrm{soft}(z - x, \lambda))`,

        with the multiplier :math:`\lambda \ge 0` the smallest that makes :math:`u` feasible,
        found per example by bisection. Points already inside are returned unchanged.
        """
        if x_adv.shape != x.shape:
            raise ValueError(f"x_adv must have the shape of x {tuple(x.shape)}, got {tuple(x_adv.shape)}")
        if self.p == math.inf:
            return torch.maximum(torch.minimum(x_adv, x + self.eps), x - self.eps).clamp(0, 1)
        if self.eps == 0:
            return x.clone()
        z = x_adv - x
        if self.p == 2:
            def candidate(lam: Tensor) -> Tensor:
                return (x + z / (1 + per_example(lam, z))).clamp(0, 1)
            hi = self.norm(z) / self.eps
        else:
            def candidate(lam: Tensor) -> Tensor:
                return (x + z.sign() * (z.abs() - per_example(lam, z)).clamp_min(0)).clamp(0, 1)
            hi = z.flatten(1).abs().amax(dim=1)
        in_box = x_adv.clamp(0, 1)
        inside = self.norm(in_box - x) <= self.eps
        if inside.all():
            return in_box
        lam = _bisect(lambda lam: self.norm(candidate(lam) - x), hi, self.eps)
        return torch.where(per_example(inside, x), in_box, candidate(lam))

    def project_perturbation(self, delta: Tensor) -> Tensor:
        r"""Euclidean projection of a perturbation ``delta`` onto :math:`\{\|\delta\|_p \le \epsilon\}`, no box.

        For perturbations not tied to one input (universal perturbations). The ball of radius
        1/2 about the box's centre lies inside the box, so there the box never binds: scale
        ``delta`` by :math:`1 / 2\epsilon`, :meth:`project` about the centre, and scale back.
        """
        if self.eps == 0:
            return torch.zeros_like(delta)
        scale = 2 * self.eps
        centre = torch.full_like(delta, 0.5)
        return scale * (LpBall(self.p, 0.5).project(centre + delta / scale, centre) - centre)

    def random(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        r"""A point drawn uniformly from the ball around each ``x``, then clipped to [0, 1].

        * :math:`p = \infty`: each coordinate uniform in :math:`[-\epsilon, \epsilon]`;
        * :math:`p = 2`: a Gaussian direction scaled to radius :math:`\epsilon\, U^{1/d}`;
        * :math:`p = 1`: :math:`(e_1, \dots, e_d) / \sum_{i=1}^{d+1} e_i` for i.i.d.
          :math:`e_i \sim \mathrm{Exp}(1)`, with random signs (uniform in the cross-polytope).

        Clipping moves every coordinate towards ``x``, so the point stays in the ball. The numbers
        are drawn on ``generator``'s device, then moved to ``x``'s (:mod:`robustdl._random`): a
        seeded CPU generator gives the same point for ``x`` on the CPU or a GPU, float32 or float64.
        """
        check_images(x)
        n, d = x.shape[0], x[0].numel()
        if self.p == math.inf:
            delta = (2 * uniform(x.shape, x, generator) - 1) * self.eps
        elif self.p == 2:
            direction = normal(x.shape, x, generator)
            radius = self.eps * uniform((n,), x, generator) ** (1.0 / d)
            delta = direction * per_example(radius / self.norm(direction).clamp_min(1e-12), x)
        else:
            e = -torch.log1p(-uniform((n, d + 1), x, generator))  # i.i.d. Exp(1)
            signs = integers(0, 2, (n, d), x.device, generator).to(x.dtype) * 2 - 1
            delta = (self.eps * signs * e[:, :d] / e.sum(dim=1, keepdim=True)).view_as(x)
        return (x + delta).clamp(0, 1)

    def step(self, grad: Tensor, alpha: float, sparsity: float = 1.0) -> Tensor:
        r"""The steepest-ascent step :math:`v^\star = \arg\max_{\|v\|_p \le \alpha} \langle g, v\rangle`.

        * :math:`p = \infty`: :math:`\alpha\,\mathrm{sign}(g)` (the FGSM step);
        * :math:`p = 2`: :math:`\alpha\, g / \|g\|_2`;
        * :math:`p = 1`: :math:`\alpha\,\mathrm{sign}(g_i) e_i` at the coordinate :math:`i` of
          largest :math:`|g_i|`.

        The exact L1 step moves one coordinate, which makes L1 PGD crawl. With ``sparsity``
        :math:`q < 1` the L1 step is instead spread evenly over the :math:`k = \lceil (1 - q) d
        \rceil` coordinates of largest :math:`|g_i|` (the set :math:`T`),
        :math:`v = \alpha\, \mathrm{sign}(g) \odot 1_T / k`: the sparse L1 descent of SLIDE,
        Tramèr and Boneh (2019) :cite:`tramer2019adversarial`, whose percentile :math:`P_{100 q}(|g|)`
        selects the same set. ``sparsity=1`` (the default) is the exact steepest step; the other
        norms ignore ``sparsity``, their steepest steps being dense.

        Its norm is exactly ``alpha`` unless ``grad`` is zero, where the step is zero (zero
        gradient coordinates in :math:`T` are left out of the count :math:`k`).
        """
        alpha = check_nonnegative(alpha, "alpha")
        sparsity = check_fraction(sparsity, "sparsity")
        if self.p == math.inf:
            return alpha * grad.sign()
        if self.p == 2:
            return alpha * grad / per_example(self.norm(grad).clamp_min(1e-12), grad)
        flat = grad.flatten(1)
        k = max(1, math.ceil((1 - sparsity) * flat.shape[1] - 1e-9))
        top = flat.abs().topk(k, dim=1).indices
        v = torch.zeros_like(flat).scatter_(1, top, flat.gather(1, top).sign())
        return (alpha * v / v.abs().sum(dim=1, keepdim=True).clamp_min(1)).view_as(grad)


def as_ball(eps: float | LpBall, norm: str | float = "linf") -> LpBall:
    """The threat model a function is given: an :class:`LpBall` as it is, or the ball of ``norm`` and radius ``eps``.

    Every attack, objective and verifier takes its threat model through this, so each accepts
    either form: ``pgd(model, x, y, LpBall("l2", 0.5))`` or ``pgd(model, x, y, 0.5, "l2")``. A
    ball given with a ``norm`` other than the default beside it is an error, not a silent choice.
    """
    if isinstance(eps, LpBall):
        if parse_norm(norm) not in (math.inf, eps.p):
            raise ValueError(f"norm {norm!r} contradicts the ball given as eps, {eps}; give the norm once")
        return eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a radius (a float) or a robustdl.threat.LpBall, "
                        f"got {type(eps).__name__}: {eps!r}")
    return LpBall(norm, eps)
