r"""Spatial attacks: move pixels instead of changing their values.

A *flow field* ``flow`` of shape (N, 2, H, W) gives, for every pixel :math:`i` of the output,
the displacement :math:`f_i = (\Delta u^{(i)}, \Delta v^{(i)})` in pixels of the point it samples
from the input: ``flow[:, 0]`` moves along the rows (down is positive) and ``flow[:, 1]`` along the
columns (right is positive). To draw it with matplotlib, ``plt.quiver(flow[1], -flow[0])`` over
an image shown with ``origin="upper"`` points each arrow where its pixel reads from.

* :func:`flow_warp` -- the bilinear spatial transformation of the seed tutorial,
* :func:`flow_loss` -- the local smoothness of a flow, the seed's :math:`\mathcal{L}_{flow}`,
* :func:`stadv` and :func:`stadv_flow` -- the stAdv attack of Xiao et al. (2018).

Taught in the chapter *Adversarial attacks* (spatially transformed examples); :func:`flow_warp`
and :func:`flow_loss` are reused by the universal attack :func:`robustdl.attacks.universal.guap`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustdl._checks import check_nonnegative, check_positive_int
from robustdl._model import check_inputs, eval_mode
from robustdl.losses import goal_margin, goal_reached

__all__ = ["flow_loss", "flow_warp", "stadv", "stadv_flow"]

#: The constant under each square root of :func:`flow_loss`: it keeps the second derivative
#: finite where neighbouring flows are equal (the gradient is bounded by 1 regardless).
FLOW_LOSS_TINY = 1e-12


def _check_flow(flow: object, x: object) -> None:
    """Check that ``flow`` is a floating (N, 2, H, W) or (1, 2, H, W) field for images ``x``."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating torch.Tensor, got {type(x).__name__}")
    if not isinstance(flow, Tensor) or not flow.is_floating_point():
        raise TypeError(f"flow must be a floating torch.Tensor, got {type(flow).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be images of shape (N, C, H, W) to be warped, got shape {tuple(x.shape)}")
    expected = (2, *x.shape[2:])
    if flow.dim() != 4 or flow.shape[1:] != expected or flow.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"flow must have shape ({x.shape[0]} or 1, {', '.join(map(str, expected))}) for x of shape "
            f"{tuple(x.shape)}, got {tuple(flow.shape)}"
        )
    if not torch.isfinite(flow).all():
        raise ValueError("flow must be finite")


def flow_warp(x: Tensor, flow: Tensor) -> Tensor:
    r"""The spatial transformation of stAdv, :cite:`xiao2018spatially` (eq. (1) there).

    Output pixel :math:`i` at :math:`(u_i, v_i)` reads the input at
    :math:`(u^{(i)}, v^{(i)}) = (u_i + \Delta u^{(i)}, v_i + \Delta v^{(i)})` by bilinear
    interpolation over its four integer neighbours :math:`\mathcal{N}(u^{(i)}, v^{(i)})`:

    .. math:: x_{adv}^{(i)} = \sum_{q \in \mathcal{N}(u^{(i)}, v^{(i)})}
              x^{(q)} (1 - |u^{(i)} - u^{(q)}|)(1 - |v^{(i)} - v^{(q)}|).

    Sampling points outside the image are clamped onto its border (the border pixels are
    repeated). The weights are non-negative and sum to one, so the output stays in [0, 1].
    Computed by :func:`torch.nn.functional.grid_sample` with ``align_corners=True``, for which
    pixel centre :math:`c \in \{0, \dots, W-1\}` has normalised coordinate :math:`2c/(W-1) - 1`.

    Args:
        x: images, shape (N, C, H, W).
        flow: displacements in pixels, shape (N, 2, H, W), or (1, 2, H, W) for one flow applied
            to every image (a universal flow).

    Returns:
        The warped images, shape (N, C, H, W); differentiable in ``x`` and ``flow``.
    """
    _check_flow(flow, x)
    n, _, h, w = x.shape
    rows = torch.arange(h, device=x.device, dtype=x.dtype).view(h, 1)
    cols = torch.arange(w, device=x.device, dtype=x.dtype).view(1, w)
    u = (rows + flow[:, 0]) * (2 / max(h - 1, 1)) - 1
    v = (cols + flow[:, 1]) * (2 / max(w - 1, 1)) - 1
    grid = torch.stack([v, u], dim=-1).expand(n, h, w, 2)  # grid_sample wants (x, y) = (column, row)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def flow_loss(flow: Tensor, tiny: float = FLOW_LOSS_TINY, fixed_frame: bool = False) -> Tensor:
    r"""The flow loss of stAdv, :cite:`xiao2018spatially` (eq. (4) there), per example.

    .. math:: \mathcal{L}_{flow}(f) = \sum_{p}^{\text{all pixels}} \sum_{q \in \mathcal{N}(p)}
              \sqrt{\|\Delta u^{(p)} - \Delta u^{(q)}\|_2^2 + \|\Delta v^{(p)} - \Delta v^{(q)}\|_2^2 + \text{tiny}}

    with :math:`\mathcal{N}(p)` the 4-neighbourhood of :math:`p` *inside the image*: border
    pixels have fewer neighbours, nothing is padded, so a constant flow (a translation) costs
    nothing but the ``tiny`` terms. As in the formula, each pair of neighbours is counted twice
    (once from each side). It measures how unevenly neighbouring pixels move, not how far.

    With ``fixed_frame=True`` the flow is first padded by a ring of zeros: the pixels just
    outside the image stay put, so moving the border costs too and a translation is no longer
    free. That is the budget of the universal attack :func:`~robustdl.attacks.universal.guap`,
    as in its authors' code; with ``tiny=0`` it is a norm (positively homogeneous).

    Args:
        flow: shape (N, 2, H, W).
        tiny: added under each square root so that its derivatives stay finite at zero.
        fixed_frame: pad the flow with zeros first.

    Returns:
        Shape (N,).
    """
    if not isinstance(flow, Tensor) or flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow must be a tensor of shape (N, 2, H, W), got {getattr(flow, 'shape', flow)!r}")
    if fixed_frame:
        flow = F.pad(flow, (1, 1, 1, 1))
    down = flow[:, :, 1:, :] - flow[:, :, :-1, :]
    right = flow[:, :, :, 1:] - flow[:, :, :, :-1]
    pairs = [(d.square().sum(dim=1) + tiny).sqrt().flatten(1).sum(dim=1) for d in (down, right)]
    return 2 * (pairs[0] + pairs[1])


def stadv_flow(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Tensor | None = None,
    tau: float = 0.05,
    kappa: float = 0.0,
    steps: int = 200,
    lr: float = 0.01,
) -> Tensor:
    r"""The flow field of stAdv, :cite:`xiao2018spatially` (eq. (2) there): the flow of :func:`stadv`.

    .. math:: f^* = \arg\min_f \mathcal{L}_{adv}(x, f) + \tau\, \mathcal{L}_{flow}(f)

    with :math:`\mathcal{L}_{adv} = \max(\max_{i \ne t} g(x_{adv})_i - g(x_{adv})_t, \kappa)` on the
    logits :math:`g` of :math:`x_{adv} =` :func:`flow_warp` :math:`(x, f)` and
    :math:`\mathcal{L}_{flow} =` :func:`flow_loss`. Untargeted, the true label :math:`y` is pushed
    down instead: :math:`\max(g_y - \max_{i \ne y} g_i, \kappa)`. A negative ``kappa`` asks for a
    margin of :math:`-\kappa` beyond the boundary.
    The weight :math:`\tau` trades the two: targets far from the true class (a 0 made a 1)
    may need a smaller :math:`\tau` than the default 0.05 to be reached.

    The paper minimises with L-BFGS; here Adam runs ``steps`` steps from the zero flow. Adam
    works coordinate by coordinate, so each example is optimised independently inside the
    batch, where a batched L-BFGS shares one line search between all of them (on 20 MNIST
    digits it fooled 30-50% where Adam fooled all). Each example keeps the adversarial flow of
    smallest flow loss met on the way, or the last flow if none was adversarial.

    Args:
        model: a classifier returning logits, taking images in [0, 1].
        x: clean images in [0, 1], shape (N, C, H, W).
        y: true labels, shape (N,).
        target: target labels for a targeted attack, shape (N,).
        tau: the weight :math:`\tau \ge 0` of the flow loss.
        kappa: the floor :math:`\kappa` of the adversarial loss.
        steps: Adam steps.
        lr: Adam's learning rate, in pixels.

    Returns:
        The flow, shape (N, 2, H, W), detached.
    """
    check_inputs(model, x, y)
    if target is not None:
        check_inputs(model, x, target)
    if x.dim() != 4:
        raise ValueError(f"x must be images of shape (N, C, H, W), got shape {tuple(x.shape)}")
    tau, lr = check_nonnegative(tau, "tau"), check_nonnegative(lr, "lr")
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not math.isfinite(kappa):
        raise ValueError(f"kappa must be a finite real number, got {kappa!r}")
    steps = check_positive_int(steps, "steps")

    flow = x.new_zeros(x.shape[0], 2, *x.shape[2:]).requires_grad_(True)
    best = x.new_zeros(flow.shape)
    best_loss = x.new_full((len(x),), math.inf)
    optimiser = torch.optim.Adam([flow], lr=lr)
    with eval_mode(model), torch.enable_grad():
        for _ in range(steps):
            logits = model(flow_warp(x, flow))
            smoothness = flow_loss(flow)
            loss = goal_margin(logits, y, target).clamp_min(kappa) + tau * smoothness
            (flow.grad,) = torch.autograd.grad(loss.sum(), flow)  # the flow's only: none on the model
            with torch.no_grad():
                better = goal_reached(logits, y, target) & (smoothness < best_loss)
                best[better], best_loss[better] = flow[better], smoothness[better]
            optimiser.step()
    never = torch.isinf(best_loss)
    best[never] = flow.detach()[never]
    return best


def stadv(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Tensor | None = None,
    tau: float = 0.05,
    kappa: float = 0.0,
    steps: int = 200,
    lr: float = 0.01,
) -> Tensor:
    r"""Spatially transformed adversarial examples (stAdv), :cite:`xiao2018spatially`.

    Warps each image by the flow of :func:`stadv_flow` (eq. (2) of the paper, the seed
    tutorial's :math:`f^* = \arg\min_f \mathcal{L}_{adv}(x, f) + \tau \mathcal{L}_{flow}(f)`):
    :math:`x_{adv} =` :func:`flow_warp` :math:`(x, f^*)`. No pixel value is added: every output
    pixel interpolates input pixels, so it stays in [0, 1]. The arguments are those of
    :func:`stadv_flow`; call it directly to get the flow (e.g. to draw it with quiver).

    Returns:
        New adversarial images, detached, in [0, 1].

    Taught in the chapter *Adversarial attacks*.
    """
    flow = stadv_flow(model, x, y, target=target, tau=tau, kappa=kappa, steps=steps, lr=lr)
    with torch.no_grad():
        return flow_warp(x, flow).clamp(0, 1)

