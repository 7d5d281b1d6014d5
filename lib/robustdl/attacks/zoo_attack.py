r"""ZOO, zeroth-order optimisation: the C&W attack with gradients estimated from queries (Chen et al. 2017).

:func:`zoo_adam` -- coordinate-wise ADAM on symmetric-difference estimates of the gradient of
the C&W objective, L2, through a :class:`~robustdl.attacks.oracle.QueryOracle`.

Taught in the chapter on black-box attacks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from robustdl._checks import check_nonnegative, check_positive_int
from robustdl._random import uniform
from robustdl.attacks.oracle import QueryOracle, log_scores, setup_oracle
from robustdl.losses import goal_margin

__all__ = ["zoo_adam"]

#: ADAM's constants in ZOO-ADAM (Chen et al. 2017, Algorithm 2): the defaults of Kingma and Ba.
ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.9, 0.999, 1e-8


def _random_coordinates(n: int, d: int, b: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """``b`` distinct coordinates out of ``d``, drawn uniformly for each of ``n`` examples, shape (n, b)."""
    return uniform((n, d), like, generator, dtype=torch.float32).argsort(dim=1)[:, :b]


def _symmetric_probes(x_adv: Tensor, coords: Tensor, h: float) -> Tensor:
    r"""The points :math:`x + h e_i` (first ``b``) and :math:`x - h e_i` (last ``b``) per example.

    ``x_adv`` (n, d) flattened, ``coords`` (n, b); returns (n, 2b, d), clipped into [0, 1] so
    that every query is a valid image (at a pixel on the box's edge the difference is one-sided).
    """
    b = coords.shape[1]
    probes = x_adv[:, None, :].repeat(1, 2 * b, 1)
    offsets = torch.cat([torch.full_like(coords, 1), torch.full_like(coords, -1)], dim=1).to(x_adv.dtype) * h
    probes.scatter_add_(2, coords.repeat(1, 2)[..., None], offsets[..., None])
    return probes.clamp(0, 1)


def _coordinate_gradient(objective: Tensor, probes: Tensor, coords: Tensor) -> Tensor:
    r"""ZOO's estimate :math:`\hat g_i = (f(x + h e_i) - f(x - h e_i)) / 2h` of :cite:`chen2017zoo`.

    The divisor is the actual distance between the two (clipped) probes, :math:`2h` inside the box.
    """
    b = coords.shape[1]
    index = coords[..., None]
    spacing = probes[:, :b].gather(2, index) - probes[:, b:].gather(2, index)
    return (objective[:, :b] - objective[:, b:]) / spacing.squeeze(2)


def _adam_step(state: tuple[Tensor, Tensor, Tensor], rows: Tensor, coords: Tensor, g: Tensor, lr: float) -> Tensor:
    r"""One ZOO-ADAM step on the coordinates ``coords`` of the examples ``rows`` (Algorithm 2).

    Each coordinate keeps its own moments and count :math:`T_i` (the state ``(M, v, T)``, updated
    in place): :math:`M_i \leftarrow \beta_1 M_i + (1 - \beta_1)\hat g_i`,
    :math:`v_i \leftarrow \beta_2 v_i + (1 - \beta_2)\hat g_i^2`, and the step is
    :math:`\delta^\star = -\eta\, \hat M_i / (\sqrt{\hat v_i} + \epsilon)` with the bias-corrected
    :math:`\hat M_i = M_i / (1 - \beta_1^{T_i})`, :math:`\hat v_i = v_i / (1 - \beta_2^{T_i})`.
    """
    m, v, t = state
    i = (rows[:, None], coords)
    t[i] += 1
    m[i] = ADAM_BETA1 * m[i] + (1 - ADAM_BETA1) * g
    v[i] = ADAM_BETA2 * v[i] + (1 - ADAM_BETA2) * g**2
    m_hat = m[i] / (1 - ADAM_BETA1 ** t[i])
    v_hat = v[i] / (1 - ADAM_BETA2 ** t[i])
    return -lr * m_hat / (v_hat.sqrt() + ADAM_EPS)


def zoo_adam(
    model_or_oracle: nn.Module | QueryOracle,
    x: Tensor,
    y: Tensor,
    *,
    c: float = 1.0,
    kappa: float = 0.0,
    steps: int = 1000,
    batch_coordinates: int = 128,
    lr: float = 0.01,
    h: float = 1e-4,
    target: Tensor | None = None,
    abort_early: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""ZOO-ADAM, the score-based L2 attack of Chen et al. (2017), :cite:`chen2017zoo` (Sec. 3, Algorithm 2).

    The C&W L2 problem with the logits replaced by the log-probabilities the oracle returns:

    .. math:: \min_{x' \in [0, 1]^d} \|x' - x\|_2^2 + c\, f(x'), \qquad
              f(x') = \max\big(\log F(x')_y - \max_{i \ne y} \log F(x')_i,\ -\kappa\big)

    (targeted: :math:`f(x') = \max(\max_{i \ne t} \log F(x')_i - \log F(x')_t, -\kappa)`),
    solved without gradients by stochastic coordinate descent. Each iteration picks
    ``batch_coordinates`` random coordinates :math:`i` per example, estimates each partial
    derivative by the symmetric difference :math:`\hat g_i = (F(x' + h e_i) - F(x' - h e_i))/2h`
    of the whole objective, and moves those coordinates by ADAM with per-coordinate moments.
    The box is kept by projection (each updated pixel is clipped to [0, 1], exact because the
    box constraint is separable), not by the paper's alternative change of variables through
    tanh, under which MNIST's many pixels at exactly 0 or 1 could hardly move.

    Each iteration asks the oracle, in one call, :math:`2B + 1` queries per example: the current
    iterate (to know whether it succeeded) and its :math:`2B` neighbours. An example stops when
    its query budget cannot pay for another iteration.

    Args:
        model_or_oracle: a classifier returning logits, or a ``"scores"`` :class:`QueryOracle`.
        x: clean images in [0, 1], shape (N, ...).
        y: true labels, shape (N,).
        c: the constant weighing the loss :math:`f` against the squared distortion.
        kappa: the confidence :math:`\kappa \ge 0`: success needs the gap below :math:`-\kappa`.
        steps: iterations (each moves ``batch_coordinates`` coordinates per example).
        batch_coordinates: coordinates :math:`B` estimated and updated per iteration (128 in the paper).
        lr: ADAM's step size :math:`\eta` (0.01 in the paper).
        h: the finite-difference step, in (0, 0.5) (1e-4 in the paper).
        target: target labels for a targeted attack, shape (N,).
        abort_early: stop each example at its first successful iterate (saves queries); otherwise
            run all ``steps`` and keep the successful iterate of smallest distortion.
        generator: the random generator choosing coordinates (on any device: a CPU generator
            chooses the same coordinates for ``x`` on the CPU or a GPU).

    Returns:
        New images, detached, in [0, 1]: per example the successful iterate of smallest L2
        distortion, or the last iterate where none succeeded.
    """
    oracle, y, target = setup_oracle(model_or_oracle, x, y, target, "scores")
    c = check_nonnegative(c, "c")
    kappa, lr = check_nonnegative(kappa, "kappa"), check_nonnegative(lr, "lr")
    h = check_nonnegative(h, "h")
    if not 0 < h < 0.5:
        raise ValueError(f"h must be in (0, 0.5), a small finite-difference step, got {h}")
    steps = check_positive_int(steps, "steps")
    x = x.detach()
    n, flat = len(x), x.flatten(1)
    b = min(check_positive_int(batch_coordinates, "batch_coordinates"), flat.shape[1])
    x_adv, best = flat.clone(), flat.clone()
    best_distance = flat.new_full((n,), math.inf)
    adam = (torch.zeros_like(flat), torch.zeros_like(flat), torch.zeros_like(flat))
    active = torch.arange(n, device=x.device)
    for _ in range(steps):
        active = active[oracle.remaining(active) >= 2 * b + 1]
        if len(active) == 0:
            break
        coords = _random_coordinates(len(active), flat.shape[1], b, generator, x)
        probes = torch.cat([x_adv[active, None], _symmetric_probes(x_adv[active], coords, h)], dim=1)
        queries = active.repeat_interleave(2 * b + 1)
        # the goal margin of the log-probabilities: the C&W logit gap, as the log-normaliser cancels
        gap = goal_margin(log_scores(oracle(probes.view(-1, *x.shape[1:]), queries)), y[queries],
                          None if target is None else target[queries]).view(len(active), -1)
        distance = (probes - flat[active, None]).pow(2).sum(dim=2)
        # the current iterate (column 0): keep it if it succeeds closer than before
        success = gap[:, 0] < -kappa
        better = success & (distance[:, 0] < best_distance[active])
        best[active[better]], best_distance[active[better]] = x_adv[active[better]], distance[better, 0]
        keep = ~success if abort_early else torch.ones_like(success)
        active, coords, probes = active[keep], coords[keep], probes[keep, 1:]
        objective = (distance + c * gap.clamp_min(-kappa))[keep, 1:]
        g = _coordinate_gradient(objective, probes, coords)
        i = (active[:, None], coords)
        x_adv[i] = (x_adv[i] + _adam_step(adam, active, coords, g, lr)).clamp(0, 1)
    found = best_distance.isfinite()[:, None]
    return torch.where(found, best, x_adv).view_as(x)
