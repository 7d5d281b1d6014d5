r"""Virtual adversarial training: local distributional smoothness (Miyato et al. 2018).

* :func:`virtual_adversarial_direction` -- the direction that changes the prediction most, by
  power iteration on the KL divergence's Hessian;
* :func:`vat_attack` -- the virtual adversarial example, ``eps`` along that direction;
* :func:`lds` -- the local distributional smoothness, the KL divergence there;
* :func:`vat_loss`, :class:`VAT` -- the objective, supervised or semi-supervised.

As in :mod:`~robustdl.train.adversarial`, the inner maximisation runs on the module inside a
DistributedDataParallel wrapper (:func:`~robustdl.train.distributed.unwrap`) in eval mode and
returns detached points in the [0, 1] box; the training loss goes through the model itself, in
train mode, and by Danskin's theorem its gradient at the (detached) maximiser is the gradient
of the maximum. Taught in the chapter *Distributional robustness*.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustdl._checks import check_images, check_labels, check_nonnegative, check_positive, check_positive_int
from robustdl._model import check_model, eval_mode
from robustdl._random import normal
from robustdl.losses import kl_divergence
from robustdl.threat import LpBall
from robustdl.train.distributed import unwrap

__all__ = ["VAT", "lds", "vat_attack", "vat_loss", "virtual_adversarial_direction"]

#: The unit L2 sphere's steepest step: ``_L2.step(g, 1.0)`` is :math:`g / \|g\|_2` per example.
_L2 = LpBall("l2", 1.0)


def virtual_adversarial_direction(
    model: nn.Module,
    x: Tensor,
    xi: float = 1e-6,
    iterations: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The virtual adversarial direction, Miyato et al. (2018), :cite:`miyato2018virtual`.

    The divergence :math:`D(r) = \mathrm{KL}(p(\cdot \mid x; \hat\theta) \,\|\, p(\cdot \mid x + r; \theta))`
    is zero with zero gradient at :math:`r = 0`, so near 0 it is
    :math:`\tfrac12 r^\top H r` and the direction that changes the prediction most is the top
    eigenvector of its Hessian :math:`H`. Power iteration finds it without forming :math:`H`,
    from a random unit :math:`d` and a finite difference of the gradient,
    :math:`H d \approx \nabla_r D(r)|_{r = \xi d} / \xi`:

    .. math:: d \leftarrow \frac{\nabla_r D(r)|_{r = \xi d}}{\|\nabla_r D(r)|_{r = \xi d}\|_2}.

    Miyato et al. find one iteration (``iterations=1``) enough. The probe
    :math:`x + \xi d` is not clipped to the box: it is a finite difference, not an input, and
    clipping would bias it. In float32 the tiny default :math:`\xi` (theirs) leaves a noisy
    difference; float64 or a larger :math:`\xi` gives a cleaner one. Returns unit L2 directions of
    ``x``'s shape, detached (zero where the gradient vanishes).
    """
    check_model(model)
    check_images(x)
    xi = check_positive(xi, "xi", "the finite difference needs a nonzero probe")
    iterations = check_positive_int(iterations, "iterations")
    d = normal(x.shape, x, generator)
    with eval_mode(model):
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)
        for _ in range(iterations):
            with torch.enable_grad():
                r = (xi * _L2.step(d, 1.0)).requires_grad_(True)
                (d,) = torch.autograd.grad(kl_divergence(p_clean, model(x.detach() + r)).sum(), r)
    return _L2.step(d, 1.0)


def vat_attack(
    model: nn.Module,
    x: Tensor,
    eps: float,
    xi: float = 1e-6,
    iterations: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The virtual adversarial example :math:`x + r_{\mathrm{vadv}}`, Miyato et al. (2018), :cite:`miyato2018virtual`.

    .. math:: r_{\mathrm{vadv}} = \arg\max_{\|r\|_2 \le \epsilon}
              \mathrm{KL}\big(p(\cdot \mid x; \hat\theta) \,\|\, p(\cdot \mid x + r; \theta)\big)
              \approx \epsilon\, d,

    with :math:`d` the :func:`virtual_adversarial_direction` (the quadratic approximation's
    maximiser). No label is used: "virtual" labels are the model's own predictions. The point
    is then clamped into the [0, 1] box (:meth:`~robustdl.threat.LpBall.project` of the L2 ball,
    which here is the clamp, since clamping only moves a point towards ``x``), so it lies in
    the ball and the box.
    """
    ball = LpBall("l2", eps)
    d = virtual_adversarial_direction(model, x, xi, iterations, generator)
    with torch.no_grad():
        return ball.project(x.detach() + ball.eps * d, x.detach())


def lds(
    model: nn.Module,
    x: Tensor,
    eps: float,
    xi: float = 1e-6,
    iterations: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Local distributional smoothness, Miyato et al. (2018), :cite:`miyato2018virtual`.

    .. math:: \mathrm{LDS}(x; \theta) = \mathrm{KL}\big(p(\cdot \mid x; \hat\theta) \,\|\,
              p(\cdot \mid x + r_{\mathrm{vadv}}; \theta)\big),

    averaged over the batch, with :math:`r_{\mathrm{vadv}}` from :func:`vat_attack`. The clean
    prediction :math:`p(\cdot \mid x; \hat\theta)` is a constant (no gradient flows through
    it), computed in eval mode as in the power iteration; the perturbed one goes through
    ``model`` and carries the gradient. ``x`` needs no labels.
    """
    module = unwrap(model)
    with torch.no_grad(), eval_mode(module):
        p_clean = F.softmax(module(x), dim=1)
    x_adv = vat_attack(module, x, eps, xi, iterations, generator)
    return kl_divergence(p_clean, model(x_adv)).mean()


def vat_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    alpha: float = 1.0,
    xi: float = 1e-6,
    iterations: int = 1,
) -> Tensor:
    r"""Supervised virtual adversarial training, Miyato et al. (2018), :cite:`miyato2018virtual`.

    Their full objective without unlabelled data, :math:`\mathcal{D}_{ul} = \emptyset`:

    .. math:: \mathbb{E}_{(x, y) \sim \mathcal{D}_l}\, L(x, y; \theta)
              + \alpha\, \mathbb{E}_{x \sim \mathcal{D}_l}\, \mathrm{LDS}(x; \theta),

    the cross-entropy plus :math:`\alpha` times :func:`lds` on the same batch. ``eps`` is an
    L2 radius. For the semi-supervised objective, with LDS also over unlabelled data, use
    :class:`VAT`.
    """
    check_labels(y, check_images(x))
    alpha = check_nonnegative(alpha, "alpha")
    return F.cross_entropy(model(x), y) + alpha * lds(model, x, eps, xi, iterations)


class VAT:
    r"""Virtual adversarial training, Miyato et al. (2018), :cite:`miyato2018virtual`, as an objective.

    The seed tutorial's objective over labelled data :math:`\mathcal{D}_l` and unlabelled
    data :math:`\mathcal{D}_{ul}`:

    .. math:: \min_\theta\ \mathbb{E}_{(x, y) \sim \mathcal{D}_l} L(x, y; \theta)
              + \alpha\, \mathbb{E}_{x_* \sim \mathcal{D}_l \cup \mathcal{D}_{ul}} \mathrm{LDS}(x_*; \theta).

    Each call takes the cross-entropy on the labelled batch and :func:`lds` over that batch
    together with the next batch of ``unlabelled`` (its labels, if it yields any, are ignored;
    it is cycled for ever and its batches are moved to the labelled batch's device and
    dtype). With ``semi_supervised=False`` it is :func:`vat_loss` and ``unlabelled`` is not
    used. ``eps`` is an L2 radius; perturbed inputs are clamped into the [0, 1] box.

    >>> vat = VAT(eps=2.0, unlabelled=unlabelled_loader)
    >>> fit(model, labelled_loader, epochs, optimizer, vat)
    """

    def __init__(
        self,
        eps: float,
        alpha: float = 1.0,
        xi: float = 1e-6,
        iterations: int = 1,
        unlabelled: Iterable[Any] | None = None,
        semi_supervised: bool = True,
    ) -> None:
        if semi_supervised and unlabelled is None:
            raise ValueError("unlabelled must be a DataLoader of unlabelled inputs when semi_supervised=True, "
                             "got None; pass semi_supervised=False for supervised VAT")
        self.ball = LpBall("l2", eps)
        self.alpha = check_nonnegative(alpha, "alpha")
        self.xi = check_positive(xi, "xi", "the finite difference needs a nonzero probe")
        self.iterations = check_positive_int(iterations, "iterations")
        self.unlabelled, self.semi_supervised = unlabelled, semi_supervised
        self._batches: Iterator[Any] = iter(())

    def _next_unlabelled(self, like: Tensor) -> Tensor:
        """The next unlabelled batch (restarting the loader when it runs out), like ``like``."""
        batch = next(self._batches, None)
        if batch is None:
            self._batches = iter(self.unlabelled)
            batch = next(self._batches, None)
            if batch is None:
                raise ValueError("unlabelled must yield at least one batch, got an empty loader")
        x_u = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x_u, Tensor) or x_u.shape[1:] != like.shape[1:]:
            shape = tuple(x_u.shape) if isinstance(x_u, Tensor) else type(x_u).__name__
            raise ValueError(f"unlabelled must yield inputs of shape (M, {', '.join(map(str, like.shape[1:]))}) "
                             f"like the labelled batch, got {shape}")
        return check_images(x_u.to(like), "unlabelled batch")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        check_labels(y, check_images(x))
        x_lds = torch.cat([x, self._next_unlabelled(x)]) if self.semi_supervised else x
        return F.cross_entropy(model(x), y) + self.alpha * lds(model, x_lds, self.ball.eps, self.xi, self.iterations)
