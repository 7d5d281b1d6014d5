r"""Optimisation attacks: the smallest perturbation that changes the decision, found by a solver.

Instead of a step of fixed size (FGSM, PGD), the attacks of Carlini and Wagner (2017),
:func:`cw_l2`, :func:`cw_linf` and :func:`cw_l0`, solve the seed tutorial's problem (1) --
minimise :math:`\|r\|` subject to :math:`\arg\max_l f_l(x + r) = t` and
:math:`x + r \in [0, 1]^d` -- through its penalty form (3),
:math:`\min_r \|r\|_p + c \cdot F(x + r)`, and search per example for the constant :math:`c`.
All three are per example throughout: each example has its own constant :math:`c`, its own
search and its own result; an example the attack cannot break is returned unchanged. The
box-constrained L-BFGS attack of Szegedy et al. (2014) is :mod:`robustdl.attacks.lbfgs`.

Taught in the chapter *Adversarial attacks* (optimisation-based attacks).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from robustdl._checks import check_labels, check_nonnegative, check_positive_int
from robustdl._model import check_inputs, eval_mode, logits_of
from robustdl._progress import progress_bar
from robustdl.attacks._core import _L2, _search_step, input_gradient
from robustdl.losses import goal_margin
from robustdl.threat import LpBall, per_example

__all__ = ["cw_l0", "cw_l2", "cw_linf"]

#: Pixels at exactly 0 or 1 have no finite preimage under :math:`x = (\tanh w + 1)/2`, so the
#: change of variables starts from :math:`w_0 = \operatorname{artanh}((2x - 1)\,s)` with this
#: factor :math:`s` (the authors' code uses the same): 0 and 1 start 5e-7 inside the box.
TANH_SQUEEZE = 1 - 1e-6
#: The per-example L-infinity norm of :mod:`robustdl.threat` (only ``norm`` is used, so the radius is 0).
_LINF = LpBall("linf", 0.0)

#: A distance term of an objective: per-example perturbation ``delta`` (N, ...) -> (N,).
Distance = Callable[[Tensor], Tensor]
#: A descent over the examples ``idx`` with constants ``c``: ``(c, idx) -> (x_adv, distance)``.
Descent = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _goal(model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None) -> tuple[Tensor, bool]:
    """Check the arguments; return the label the attack steers towards (or away from) and whether targeted."""
    check_inputs(model, x, y)
    if target is None:
        return y, False
    return check_labels(target, x, "target"), True


def _logit_gap(logits: Tensor, goal: Tensor, targeted: bool) -> Tensor:
    r"""The C&W objective before its floor, :math:`f_6` of :cite:`carlini2017towards` (Sec. IV-B).

    The :func:`~robustdl.losses.goal_margin` of the attack's one label ``goal``: the target
    when ``targeted``, else the true label. The attack succeeds with confidence :math:`\kappa`
    exactly where the gap is below :math:`-\kappa`, and the objective is
    :math:`f = \max(\text{gap}, -\kappa)`. Shape (N,).
    """
    return goal_margin(logits, goal, goal if targeted else None)


def _squared_l2(delta: Tensor) -> Tensor:
    """:math:`\\|\\delta\\|_2^2` per example, the distance of the L2 and L0 attacks."""
    return _L2.norm(delta) ** 2


def _excess_over(tau: Tensor) -> Distance:
    r"""The L-infinity attack's distance :math:`\sum_i \max(|\delta_i| - \tau, 0)` with a per-example :math:`\tau`."""
    return lambda delta: (delta.abs() - per_example(tau, delta)).clamp_min(0).flatten(1).sum(dim=1)


def _to_tanh_space(x: Tensor) -> Tensor:
    """The :math:`w` with :math:`(\\tanh w + 1)/2 = x`, squeezed inside the box (coarser for half precision)."""
    return torch.atanh((2 * x - 1) * min(TANH_SQUEEZE, 1 - torch.finfo(x.dtype).eps))


def _from_tanh_space(w: Tensor) -> Tensor:
    return (torch.tanh(w) + 1) / 2


def _stalled(loss: Tensor, previous: Tensor) -> Tensor:
    """Whether each loss failed to fall by 0.01% since the last check (the authors' abort rule)."""
    return previous.isfinite() & (loss > previous - 1e-4 * previous.abs())


def _descend(
    model: nn.Module,
    x: Tensor,
    start: Tensor,
    goal: Tensor,
    targeted: bool,
    c: Tensor,
    kappa: float,
    distance: Distance,
    steps: int,
    lr: float,
    abort_early: bool,
    allowed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Adam on :math:`w` for :math:`\min_w D(x'(w) - x) + c\, \max(\text{gap}(x'(w)), -\kappa)`.

    :math:`x'(w) = (\tanh w + 1)/2` starts at ``start``; where ``allowed`` is False, :math:`x'`
    is held at ``x``. Returns, per example, the adversarial iterate (gap below
    :math:`-\kappa`) of smallest distance :math:`D` and that distance, ``inf`` where no
    iterate was adversarial. Stops early once every example has an adversarial iterate at
    distance 0, or (``abort_early``) when no example's loss fell over a tenth of the steps.
    """
    w = _to_tanh_space(start).requires_grad_(True)
    optimiser = torch.optim.Adam([w], lr=lr)
    best, best_distance = start.clone(), torch.full_like(c, math.inf)
    previous = torch.full_like(c, math.inf)
    for step in range(steps):
        x_adv = _from_tanh_space(w) if allowed is None else torch.where(allowed, _from_tanh_space(w), x)
        gap = _logit_gap(logits_of(model, x_adv), goal, targeted)
        dist = distance(x_adv - x)
        loss = dist + c * gap.clamp_min(-kappa)
        (w.grad,) = torch.autograd.grad(loss.sum(), w)
        optimiser.step()
        with torch.no_grad():
            loss, dist = loss.detach(), dist.detach()
            better = (gap < -kappa) & (dist < best_distance)
            best = torch.where(per_example(better, x), x_adv, best)
            best_distance = torch.where(better, dist, best_distance)
            if (best_distance == 0).all():
                break
            if abort_early and step % max(steps // 10, 1) == 0:
                if _stalled(loss, previous).all():
                    break
                previous = loss
    return best.detach(), best_distance


def _doubling_search(descend: Descent, start: Tensor, c: Tensor, c_max: float, accept: float) -> tuple[Tensor, ...]:
    """Warm-started search over ``c`` of the L-infinity and L0 attacks (Sec. V-B, V-C).

    Run ``descend`` and double ``c`` for the examples whose best distance exceeds ``accept``,
    until each is accepted or its ``c`` passes ``c_max``. Returns the accepted points
    (``start`` where none), their distances (``inf`` where none) and the final constants.
    """
    result, found, c = start.clone(), torch.full_like(c, math.inf), c.clone()
    todo = torch.arange(len(c), device=c.device)
    while len(todo):
        x_adv, dist = descend(c[todo], todo)
        ok = dist.isfinite() & (dist <= accept)
        result[todo[ok]], found[todo[ok]] = x_adv[ok], dist[ok]
        c[todo[~ok]] *= 2
        todo = todo[~ok][c[todo[~ok]] <= c_max]
    return result, found, c


def _check_common(kappa: object, steps: object, lr: object, c_init: object) -> tuple[float, int, float, float]:
    kappa, lr, c_init = (check_nonnegative(v, name) for v, name in ((kappa, "kappa"), (lr, "lr"), (c_init, "c_init")))
    if c_init == 0:
        raise ValueError("c_init must be > 0, got 0")
    return kappa, check_positive_int(steps, "steps"), lr, c_init


def cw_l2(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Tensor | None = None,
    kappa: float = 0.0,
    steps: int = 1000,
    lr: float = 0.01,
    binary_search_steps: int = 9,
    c_init: float = 1e-3,
    abort_early: bool = True,
    progress: bool | None = None,
) -> Tensor:
    r"""The L2 attack of Carlini and Wagner (2017), :cite:`carlini2017towards` (Sec. V-A).

    The seed tutorial's eq. (3) with :math:`p = 2`, the box removed by the change of variables
    :math:`x' = \tfrac12(\tanh w + 1)`:

    .. math:: \min_w \big\|\tfrac12(\tanh w + 1) - x\big\|_2^2 + c\, f\big(\tfrac12(\tanh w + 1)\big),
              \qquad f(x') = \max\big(\max_{i \ne t} Z(x')_i - Z(x')_t,\ -\kappa\big),

    (untargeted: :math:`f(x') = \max(Z(x')_y - \max_{i \ne y} Z(x')_i, -\kappa)`), solved by
    Adam on :math:`w` from :math:`x' = x`. Per example, :math:`c` is found by binary search:
    divided (bisected) after a success, multiplied by 10 after a failure until bracketed. The
    result is the adversarial iterate of smallest distortion over all steps and all constants.
    Adam moves :math:`w` by about ``lr`` per step, and MNIST's black pixels start near
    :math:`w = -7`: short runs need a larger ``lr`` (50 steps: about 0.2) than the paper's 0.01
    with 1000 steps.

    Args:
        model: a classifier returning logits (pre-softmax), taking images in [0, 1].
        x: clean images in [0, 1], shape (N, ...).
        y: true labels, shape (N,); only checked when ``target`` is given.
        target: target labels for a targeted attack, shape (N,).
        kappa: the confidence :math:`\kappa \ge 0`: success needs the gap below :math:`-\kappa`.
        steps: Adam steps per constant.
        lr: Adam's learning rate.
        binary_search_steps: constants tried per example (1: run at ``c_init`` only).
        c_init: the first constant.
        abort_early: stop a descent once no example's loss fell over a tenth of the steps.
        progress: show a progress bar over the constants (default: ``$ROBUSTDL_PROGRESS``).

    Returns:
        New adversarial images, detached, in [0, 1]; an example never broken is returned as is.

    Taught in the chapter *Adversarial attacks*.
    """
    goal, targeted = _goal(model, x, y, target)
    x = x.detach()
    kappa, steps, lr, c = _check_common(kappa, steps, lr, c_init)
    search_steps = check_positive_int(binary_search_steps, "binary_search_steps")
    c = x.new_full((len(x),), c)
    lower, upper = torch.zeros_like(c), torch.full_like(c, math.inf)
    best, best_distance = x.clone(), torch.full_like(c, math.inf)
    with eval_mode(model), torch.enable_grad():
        for _ in progress_bar(range(search_steps), progress, desc="C&W L2"):
            x_adv, dist = _descend(model, x, x, goal, targeted, c, kappa, _squared_l2, steps, lr, abort_early)
            better = dist < best_distance
            best = torch.where(per_example(better, x), x_adv, best)
            best_distance = torch.minimum(dist, best_distance)
            c, lower, upper = _search_step(c, lower, upper, grow=dist.isinf(), factor=10.0)
    return best


def cw_linf(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Tensor | None = None,
    kappa: float = 0.0,
    steps: int = 1000,
    lr: float = 5e-3,
    c_init: float = 1e-5,
    c_max: float = 20.0,
    tau_decrease: float = 0.9,
    tau_min: float = 1 / 256,
    abort_early: bool = True,
    progress: bool | None = None,
) -> Tensor:
    r"""The L-infinity attack of Carlini and Wagner (2017), :cite:`carlini2017towards` (Sec. V-C).

    The term :math:`\|\delta\|_\infty` of eq. (3) is replaced, since its gradient moves one
    coordinate at a time, by a penalty on every coordinate above a threshold :math:`\tau`:

    .. math:: \min_w\ c\, f(x + \delta) + \sum_i \max(|\delta_i| - \tau, 0),
              \qquad x + \delta = \tfrac12(\tanh w + 1),

    with :math:`f` of :func:`cw_l2`. Starting from :math:`\tau = 1`, each round solves this
    with Adam from the previous round's solution, and the smallest constant found by doubling
    :math:`c` (warm-started from the previous round) that gives an adversarial example with
    every :math:`|\delta_i| \le \tau`. If one is found, :math:`\tau` becomes ``tau_decrease``
    times :math:`\min(\tau, \|\delta\|_\infty)` (the paper's factor 0.9; jumping first to the
    actual :math:`\|\delta\|_\infty` is the authors' code) and a new round begins; otherwise the
    search ends with the last success. Rounds stop once :math:`\tau <` ``tau_min``.

    Args:
        model, x, y, target, kappa, steps, lr, abort_early, progress: as for :func:`cw_l2`.
        c_init: the first constant (later rounds start from the last one that worked).
        c_max: give up on a round once :math:`c` would exceed this.
        tau_decrease: the factor :math:`\in (0, 1)` by which :math:`\tau` shrinks.
        tau_min: the smallest threshold tried (the authors' 1/256).

    Returns:
        New adversarial images, detached, in [0, 1]; an example never broken is returned as is.

    Taught in the chapter *Adversarial attacks*.
    """
    goal, targeted = _goal(model, x, y, target)
    x = x.detach()
    kappa, steps, lr, c_init = _check_common(kappa, steps, lr, c_init)
    c_max, tau_decrease, tau_min = (check_nonnegative(v, name) for v, name in
                                    ((c_max, "c_max"), (tau_decrease, "tau_decrease"), (tau_min, "tau_min")))
    for value, name in ((tau_decrease, "tau_decrease"), (tau_min, "tau_min")):
        if not 0 < value < 1:
            raise ValueError(f"{name} must lie in (0, 1), got {value}")
    best, tau = x.clone(), x.new_ones(len(x))
    c, active = torch.full_like(tau, c_init), torch.ones(len(x), dtype=torch.bool, device=x.device)
    rounds = math.ceil(math.log(tau_min) / math.log(tau_decrease)) + 1  # tau <= tau_min after these
    with eval_mode(model), torch.enable_grad():
        for _ in progress_bar(range(rounds), progress, desc="C&W Linf"):
            idx = active.nonzero().flatten()
            if len(idx) == 0:
                break

            def descend(c_sub: Tensor, sub: Tensor, idx: Tensor = idx) -> tuple[Tensor, Tensor]:
                i = idx[sub]
                return _descend(model, x[i], best[i], goal[i], targeted, c_sub, kappa,
                                _excess_over(tau[i]), steps, lr, abort_early)

            x_adv, dist, c[idx] = _doubling_search(descend, best[idx], c[idx], c_max, accept=0.0)
            ok = dist == 0
            best[idx[ok]] = x_adv[ok]
            tau[idx] = torch.where(ok, tau_decrease * torch.minimum(tau[idx], _LINF.norm(x_adv - x[idx])), tau[idx])
            active[idx] = ok & (tau[idx] >= tau_min)
    return best


def _pixels(t: Tensor) -> Tensor:
    """Sum an image-shaped tensor over its channels, (N, C, ...) -> (N, 1, ...); (N, D) is kept."""
    return t.sum(dim=1, keepdim=True) if t.dim() > 2 else t


def _fix_least_important(
    model: nn.Module, x: Tensor, x_adv: Tensor, goal: Tensor, targeted: bool, allowed: Tensor, k: Tensor
) -> Tensor:
    r"""Remove from ``allowed`` the ``k`` pixels (per example) of least :math:`\sum_{\text{channels}} |g_i \delta_i|`.

    :math:`g = \nabla f(x + \delta)` is the gradient of the logit gap at the adversarial point,
    so :math:`g_i \delta_i` estimates how much pixel :math:`i` contributes to the drop of
    :math:`f` from :math:`x` to :math:`x + \delta` (Sec. V-B).
    """
    g = input_gradient(model, x_adv, goal, lambda logits, labels: _logit_gap(logits, labels, targeted))
    score = _pixels((g * (x_adv - x)).abs()).masked_fill(~allowed, math.inf).flatten(1)
    drop = score.topk(min(int(k.max()), score.shape[1]), dim=1, largest=False).indices
    removed = torch.arange(drop.shape[1], device=drop.device) < k[:, None]
    return (allowed.flatten(1) & ~torch.zeros_like(score, dtype=torch.bool).scatter(1, drop, removed)).view_as(allowed)


def cw_l0(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Tensor | None = None,
    kappa: float = 0.0,
    steps: int = 1000,
    lr: float = 0.01,
    c_init: float = 1e-3,
    c_max: float = 2e6,
    pixels_per_round: int = 1,
    abort_early: bool = True,
    progress: bool | None = None,
) -> Tensor:
    r"""The L0 attack of Carlini and Wagner (2017), :cite:`carlini2017towards` (Sec. V-B).

    :math:`\|\delta\|_0` has no useful gradient, so the attack shrinks an *allowed set* of
    pixels, starting from all of them. Each round runs the L2 attack of :func:`cw_l2` with the
    pixels outside the allowed set held at ``x``, from the last solution, with the smallest
    constant found by doubling :math:`c` (warm-started from the last round). If it finds an
    adversarial :math:`x + \delta`, the pixels :math:`i` of least :math:`|g_i \delta_i|`, with
    :math:`g = \nabla f(x + \delta)`, leave the allowed set; when it fails after removing one
    pixel, the attack returns the last adversarial example found.

    The paper removes one pixel per round (``pixels_per_round=1``, the default). Removing
    several is proportionally faster (the authors' code removes up to
    :math:`0.3\sqrt{\|\delta\|_0}` at a time); so that it ends as finely, a round that fails
    after removing :math:`k > 1` pixels is retried from the last allowed set with
    :math:`\lceil k/2 \rceil`, and later rounds keep the smaller :math:`k`. A pixel is a
    location: its channels are allowed or fixed together, and its score sums over them. Unlike
    the paper's ``argmin`` of the signed :math:`g_i \delta_i`, the score is its absolute value,
    as in the authors' code: the pixel whose change matters least for :math:`f`. Here :math:`g`
    is the gradient of the logit gap :math:`\max_{i \ne t} Z_i - Z_t` itself: the floor
    :math:`-\kappa` of :math:`f` would make it zero at a successful point.

    Args:
        model, x, y, target, kappa, steps, lr, abort_early, progress: as for :func:`cw_l2`.
        c_init: the first constant (later rounds start from the last one that worked).
        c_max: give up on a round once :math:`c` would exceed this.
        pixels_per_round: how many pixels leave the allowed set after a successful round.

    Returns:
        New adversarial images, detached, in [0, 1], equal to ``x`` outside the allowed set of
        the last success (its size is the L0 distance); an example never broken is returned as is.

    Taught in the chapter *Adversarial attacks*.
    """
    goal, targeted = _goal(model, x, y, target)
    x = x.detach()
    kappa, steps, lr, c_init = _check_common(kappa, steps, lr, c_init)
    c_max, k = check_nonnegative(c_max, "c_max"), check_positive_int(pixels_per_round, "pixels_per_round")
    allowed = torch.ones_like(_pixels(x), dtype=torch.bool)
    last = allowed.clone()  # the allowed set of each example's best
    best, c, k = x.clone(), x.new_full((len(x),), c_init), torch.full((len(x),), k, device=x.device)
    active = torch.ones(len(x), dtype=torch.bool, device=x.device)
    found = torch.zeros_like(active)
    with eval_mode(model), torch.enable_grad():
        for _ in progress_bar(itertools.count(), progress, desc="C&W L0 rounds"):
            idx = active.nonzero().flatten()
            if len(idx) == 0:
                break

            def descend(c_sub: Tensor, sub: Tensor, idx: Tensor = idx) -> tuple[Tensor, Tensor]:
                i = idx[sub]
                return _descend(model, x[i], best[i], goal[i], targeted, c_sub, kappa,
                                _squared_l2, steps, lr, abort_early, allowed[i])

            x_adv, dist, c[idx] = _doubling_search(descend, best[idx], c[idx], c_max, accept=math.inf)
            won, lost = idx[dist.isfinite()], idx[dist.isinf()]
            best[won], last[won], found[won] = x_adv[dist.isfinite()], allowed[won], True
            active[lost[(k[lost] == 1) | ~found[lost]]] = False  # even one pixel fewer fails: done
            k[lost] = (k[lost] + 1) // 2
            active[idx] &= last[idx].flatten(1).any(dim=1)  # nothing left to remove
            go = idx[active[idx]]
            if len(go):
                allowed[go] = _fix_least_important(model, x[go], best[go], goal[go], targeted, last[go], k[go])
    return best
