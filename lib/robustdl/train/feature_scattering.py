r"""Feature scattering: the batch perturbed jointly, without labels (Zhang and Wang 2019).

* :func:`sinkhorn` -- entropic optimal transport (Cuturi 2013);
* :func:`feature_scattering_attack` -- perturbations that maximise the optimal-transport
  distance between the clean and perturbed batch's logits;
* :func:`feature_scattering_loss` -- the objective: label-smoothed cross-entropy there.

As in :mod:`~robustdl.train.adversarial`, the inner maximisation runs on the module inside a
DistributedDataParallel wrapper (:func:`~robustdl.train.distributed.unwrap`) in eval mode and
returns detached points in the [0, 1] box; the training loss goes through the model itself, in
train mode, and by Danskin's theorem its gradient at the (detached) maximiser is the gradient
of the maximum. Taught in the chapter *Distributional robustness*.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustdl._checks import (
    check_fraction,
    check_images,
    check_labels,
    check_nonnegative,
    check_positive,
    check_positive_int,
)
from robustdl._model import check_model, eval_mode
from robustdl.ascent import projected_ascent
from robustdl.threat import LpBall, as_ball
from robustdl.train.distributed import unwrap

__all__ = ["feature_scattering_attack", "feature_scattering_loss", "sinkhorn"]


def sinkhorn(cost: Tensor, epsilon: float = 0.01, iterations: int = 100) -> Tensor:
    r"""Entropic optimal transport by Sinkhorn's iterations, Cuturi (2013), :cite:`cuturi2013sinkhorn`.

    The transport plan between uniform marginals :math:`\mu = \mathbf{1}/m`,
    :math:`\nu = \mathbf{1}/n` for the cost matrix :math:`C` (m x n),

    .. math:: T^\star = \arg\min_{T \ge 0,\ T\mathbf{1} = \mu,\ T^\top\mathbf{1} = \nu}
              \langle T, C \rangle - \epsilon H(T),
              \qquad T^\star_{ij} = e^{(f_i + g_j - C_{ij}) / \epsilon},

    by alternating the dual potentials, in the log domain so that a small :math:`\epsilon`
    (a sharp plan, close to an unregularised optimal one) neither underflows nor overflows:

    .. math:: f_i \leftarrow \epsilon \log\mu_i - \epsilon \log\textstyle\sum_j e^{(g_j - C_{ij})/\epsilon},
              \qquad g_j \leftarrow \epsilon \log\nu_j - \epsilon \log\textstyle\sum_i e^{(f_i - C_{ij})/\epsilon}.

    After each iteration the column sums are exact and the row sums converge to :math:`\mu`.
    Differentiable in ``cost``. The defaults are those of Zhang and Wang's feature scattering.
    """
    if not isinstance(cost, Tensor) or cost.dim() != 2 or 0 in cost.shape:
        got = tuple(cost.shape) if isinstance(cost, Tensor) else type(cost).__name__
        raise ValueError(f"cost must be a non-empty matrix (m, n), got {got}")
    epsilon = check_positive(epsilon, "epsilon", "the entropic regularisation weight")
    iterations = check_positive_int(iterations, "iterations")
    m, n = cost.shape
    f, g = cost.new_zeros(m), cost.new_zeros(n)
    for _ in range(iterations):
        f = -epsilon * (math.log(m) + torch.logsumexp((g[None, :] - cost) / epsilon, dim=1))
        g = -epsilon * (math.log(n) + torch.logsumexp((f[:, None] - cost) / epsilon, dim=0))
    return torch.exp((f[:, None] + g[None, :] - cost) / epsilon)


def _feature_matching_distance(clean: Tensor, perturbed: Tensor) -> Tensor:
    r"""The OT distance :math:`\sum_{ij} T_{ij} C_{ij}` with the cosine cost :math:`C_{ij} = 1 - \cos(f_i, f'_j)`."""
    cost = (1 - F.normalize(clean.flatten(1), dim=1, eps=1e-6) @ F.normalize(perturbed.flatten(1), dim=1, eps=1e-6).T)
    cost = cost.clamp_min(0)
    return (sinkhorn(cost) * cost).sum()


def feature_scattering_attack(
    model: nn.Module,
    x: Tensor,
    eps: float | LpBall,
    steps: int = 1,
    step_size: float | None = None,
    norm: str | float = "linf",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Feature scattering, Zhang and Wang (2019), :cite:`zhang2019defense` (Sec. 3, Algorithm 1).

    The clean batch and the perturbed batch are two empirical distributions of logits,
    :math:`\mu = \sum_i \tfrac1n \delta_{f(x_i)}` and :math:`\nu = \sum_j \tfrac1n \delta_{f(x'_j)}`
    (the logits are the features, as in the authors' code). The perturbations scatter the
    features by maximising the feature-matching (optimal-transport) distance between them,
    with the cosine cost, jointly over the batch and without labels:

    .. math:: \max_{x'_j \in S(x_j)}\ \mathcal{D}(\mu, \nu) = \min_{T \in \Pi(\mu, \nu)}
              \sum_{ij} T_{ij} \big(1 - \cos(f(x_i), f(x'_j))\big),

    the plan :math:`T` by entropic :func:`sinkhorn` (:math:`\epsilon = 0.01`, 100 iterations,
    differentiated through, as theirs). The distance couples the batch, so this is not
    :func:`~robustdl.attacks.pgd`, whose loss is per example, but the same loop,
    :func:`~robustdl.ascent.projected_ascent`: ``steps`` steepest-ascent steps projected
    onto the ball and the box, from a uniformly random point of the ball. The authors' CIFAR-10
    setting is one Linf step of size :math:`\epsilon` (the default ``step_size``) from that
    random start, at :math:`\epsilon = 8/255`.
    """
    check_model(model)
    check_images(x)
    ball = as_ball(eps, norm)
    steps = check_positive_int(steps, "steps")
    alpha = ball.eps if step_size is None else check_nonnegative(step_size, "step_size")
    x = x.detach()
    with eval_mode(model), torch.no_grad():
        clean = model(x)

        def distance(x_adv: Tensor, _rows: Tensor) -> tuple[Tensor, None]:
            return _feature_matching_distance(clean, model(x_adv)), None

        return projected_ascent(distance, x, ball, [alpha] * steps, start=ball.random(x, generator))


def _smoothed_cross_entropy(logits: Tensor, y: Tensor, smoothing: float) -> Tensor:
    r"""Cross-entropy against smoothed labels: :math:`1 - \delta` true, :math:`\delta / (C - 1)` others."""
    classes = logits.shape[1]
    smoothing = check_fraction(smoothing, "label_smoothing")
    if classes < 2 or smoothing >= (classes - 1) / classes:
        raise ValueError(f"label_smoothing must be below (C - 1) / C = {(classes - 1) / max(classes, 1):.3g} "
                         f"for C = {classes} classes (there the targets are uniform and carry no label; below it "
                         f"the true class keeps the largest weight), got {smoothing}")
    log_probs = F.log_softmax(logits, dim=1)
    target = torch.full_like(log_probs, smoothing / (classes - 1)).scatter(1, y[:, None], 1 - smoothing)
    return -(target * log_probs).sum(dim=1).mean()


def feature_scattering_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | LpBall,
    steps: int = 1,
    step_size: float | None = None,
    label_smoothing: float = 0.5,
    norm: str | float = "linf",
) -> Tensor:
    r"""Feature-scattering adversarial training, Zhang and Wang (2019), :cite:`zhang2019defense` (Algorithm 1).

    The outer problem trains on the batch scattered by :func:`feature_scattering_attack`:

    .. math:: \min_\theta\ \frac1n \sum_i L(x'_i, y_i; \theta), \qquad
              \{x'_i\} \approx \arg\max_{x'_i \in S(x_i)} \mathcal{D}(\mu, \nu),

    with :math:`L` the cross-entropy against labels smoothed by :math:`\delta` =
    ``label_smoothing``: :math:`1 - \delta` on the true class and :math:`\delta / (C - 1)` on
    each of the others. The authors' code smooths with :math:`\delta = 0.5` (the default);
    ``label_smoothing=0`` is the plain cross-entropy of the paper's equation. :math:`\delta` must
    be below :math:`(C - 1) / C`, where the targets become uniform: for two classes the default
    0.5 is refused, pass a smaller one.
    """
    check_labels(y, check_images(x))
    x_adv = feature_scattering_attack(unwrap(model), x, eps, steps, step_size, norm)
    return _smoothed_cross_entropy(model(x_adv), y, label_smoothing)
