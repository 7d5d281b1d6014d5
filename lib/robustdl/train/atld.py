r"""ATLD: adversarial training with latent distributions (Qian et al. 2021).

* :func:`latent_discriminator` -- a small discriminator on the logits;
* :class:`LatentDistributionAT` -- the game: perturbations deceive the discriminator, which
  tells clean latent features from perturbed ones, and the classifier plays against it;
* :func:`latent_features` -- a model's penultimate features, to picture those distributions.

As in :mod:`~robustdl.train.adversarial`, the inner maximisation runs on the module inside a
DistributedDataParallel wrapper (:func:`~robustdl.train.distributed.unwrap`) in eval mode and
returns detached points in the [0, 1] box; the training loss goes through the model itself, in
train mode, and by Danskin's theorem its gradient at the (detached) maximiser is the gradient
of the maximum. Taught in the chapter *Distributional robustness*.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustdl._checks import check_images, check_labels, check_nonnegative, check_positive_int
from robustdl._model import check_model, eval_mode
from robustdl.attacks.gradient import pgd
from robustdl.threat import LpBall, as_ball
from robustdl.train.distributed import unwrap

__all__ = ["LatentDistributionAT", "latent_discriminator", "latent_features"]


def latent_discriminator(classes: int, hidden: Sequence[int] = (128, 128)) -> nn.Module:
    r"""A small discriminator :math:`D_W` for :class:`LatentDistributionAT`: an MLP on the C logits.

    Its C + 1 outputs are the logit of :math:`D^0_W` (the probability that the latent features
    come from a perturbed input) and the class logits :math:`D^{1:C}_W`. Leaky ReLUs, as GAN
    discriminators use. (The authors' discriminator is a wide residual network on the logits
    seen as a C x 1 x 1 image; on logits an MLP does the same job.)
    """
    classes = check_positive_int(classes, "classes")
    widths = [classes, *(check_positive_int(h, "hidden") for h in hidden)]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
    layers.append(nn.Linear(widths[-1], classes + 1))
    return nn.Sequential(*layers)


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """No gradient reaches ``module``'s parameters from what is computed in the block."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


class LatentDistributionAT:
    r"""Adversarial training with latent distributions (ATLD), Qian et al. (2021), :cite:`qian2021improving`.

    A discriminator :math:`D_W` on the latent features :math:`f_\theta(x)` (here the logits,
    as in the authors' code) has C + 1 outputs: :math:`D^0_W`, the probability that a feature
    comes from a perturbed input, and class scores :math:`D^{1:C}_W`. The seed tutorial's game:

    .. math:: \min_\theta\ \sum_i \underbrace{L(x^{adv}_i, y_i; \theta)}_{L_f}
              + \sup_W \underbrace{\big[\log D^0_W(f_\theta(x^{adv}_i)) + \log(1 - D^0_W(f_\theta(x_i)))\big]}_{L^0_d}
              + \min_W \underbrace{\big[l(D^{1:C}_W(f_\theta(x_i)), y_i)
              + l(D^{1:C}_W(f_\theta(x^{adv}_i)), y_i)\big]}_{L^{1:C}_d},

    .. math:: x^{adv}_i = \arg\max_{x'_i \in B(x_i, \epsilon)} \log D^0_W(f_\theta(x'_i)).

    Each call (one batch) plays one round:

    1. *Latent manifold adversarial examples* (:meth:`attack`): :func:`~robustdl.attacks.pgd`
       on the per-example :math:`\log D^0_W(f_\theta(x'))`, with the discriminator fixed. They
       do not target the classifier's loss; they move the latent features where the
       discriminator sees them as most unlike the clean ones (the second term of
       :math:`L^0_d` does not depend on :math:`x'`).
    2. The discriminator ascends :math:`L^0_d` and descends :math:`L^{1:C}_d`:
       ``discriminator_steps`` steps of ``discriminator_optimizer`` on
       :math:`-L^0_d + L^{1:C}_d` (a binary cross-entropy with perturbed = 1 and clean = 0,
       plus the two classification losses), features detached.
    3. The returned classifier loss :math:`L_f + L^0_d + L^{1:C}_d` (batch means) goes through
       ``model``, with the discriminator frozen: the classifier fits the perturbed inputs and
       makes the two latent distributions indistinguishable and class-consistent.

    Deviations, documented: the seed writes :math:`1 - \log D^0_W(f_\theta(x_i))`; this is the
    GAN cross-entropy :math:`\log(1 - D^0_W(\cdot))` that the authors' code optimises. Their
    code trains the classifier on a label-smoothed :math:`L_f` plus a gradient-scaled mean
    squared distance between clean and perturbed logits instead of the discriminator terms;
    here the classifier minimises the equation's terms. Defaults follow their CIFAR-10
    setting: one step of size :math:`\epsilon` from a random start, two discriminator steps.

    The state (discriminator and its optimiser) is checkpointed by
    :func:`~robustdl.train.loop.fit`. Keep the discriminator on the model's device; under
    torchrun each rank updates its own copy unless it is wrapped
    (:func:`~robustdl.train.distributed.wrap`).

    >>> discriminator = latent_discriminator(classes=10)
    >>> atld = LatentDistributionAT(discriminator, torch.optim.SGD(discriminator.parameters(), lr=1e-3,
    ...                             momentum=0.9), eps=8 / 255)
    >>> fit(model, loader, epochs, optimizer, atld, checkpoint="atld.pt")
    """

    def __init__(
        self,
        discriminator: nn.Module,
        discriminator_optimizer: torch.optim.Optimizer,
        eps: float | LpBall,
        steps: int = 1,
        step_size: float | None = None,
        norm: str | float = "linf",
        discriminator_steps: int = 2,
    ) -> None:
        if not isinstance(discriminator, nn.Module):
            raise TypeError(f"discriminator must be a torch.nn.Module (see latent_discriminator), "
                            f"got {type(discriminator).__name__}")
        if not isinstance(discriminator_optimizer, torch.optim.Optimizer):
            raise TypeError(f"discriminator_optimizer must be a torch.optim.Optimizer of the discriminator's "
                            f"parameters, got {type(discriminator_optimizer).__name__}")
        self.discriminator, self.discriminator_optimizer = discriminator, discriminator_optimizer
        self.ball = as_ball(eps, norm)
        self.steps = check_positive_int(steps, "steps")
        self.step_size = self.ball.eps if step_size is None else check_nonnegative(step_size, "step_size")
        self.discriminator_steps = check_positive_int(discriminator_steps, "discriminator_steps")

    def _heads(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """The logit of :math:`D^0_W` (N,) and the class scores :math:`D^{1:C}_W` (N, C)."""
        out = self.discriminator(features)
        if not isinstance(out, Tensor) or out.shape != (len(features), features.shape[1] + 1):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"discriminator must map the C = {features.shape[1]} logits to C + 1 outputs "
                             f"(D^0 and D^1..D^C), shape ({len(features)}, {features.shape[1] + 1}), got {got}")
        return out[:, 0], out[:, 1:]

    def _game(self, f_clean: Tensor, f_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`L^0_d` and :math:`L^{1:C}_d` (batch means) at the latent features."""
        d0_clean, classes_clean = self._heads(f_clean)
        d0_adv, classes_adv = self._heads(f_adv)
        l_d0 = F.logsigmoid(d0_adv).mean() + F.logsigmoid(-d0_clean).mean()
        return l_d0, F.cross_entropy(classes_clean, y) + F.cross_entropy(classes_adv, y)

    def attack(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        r"""Latent manifold adversarial examples: :math:`\arg\max_{x' \in B(x, \epsilon)} \log D^0_W(f_\theta(x'))`.

        :func:`~robustdl.attacks.pgd` on the unwrapped ``model`` with the per-example loss
        :math:`\log D^0_W` of its logits, from a random start, all ``steps`` steps; ``y`` only
        satisfies PGD's checks. Detached, in the ball and the box.
        """
        def log_d0(logits: Tensor, _labels: Tensor) -> Tensor:
            return F.logsigmoid(self._heads(logits)[0])

        with eval_mode(self.discriminator):
            return pgd(unwrap(model), x, y, self.ball.eps, self.ball.p, self.steps, self.step_size, loss=log_d0,
                       early_stop=False)

    def _update_discriminator(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> None:
        r"""``discriminator_steps`` optimiser steps on :math:`-L^0_d + L^{1:C}_d`, features fixed."""
        with torch.no_grad(), eval_mode(model):
            f_clean, f_adv = model(x), model(x_adv)
        for _ in range(self.discriminator_steps):
            l_d0, l_classes = self._game(f_clean, f_adv, y)
            self.discriminator_optimizer.zero_grad(set_to_none=True)
            (l_classes - l_d0).backward()
            self.discriminator_optimizer.step()

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        check_labels(y, check_images(x))
        x_adv = self.attack(model, x, y)
        self._update_discriminator(unwrap(model), x, x_adv, y)
        logits_clean, logits_adv = model(x), model(x_adv)
        with eval_mode(self.discriminator), _frozen(self.discriminator):
            l_d0, l_classes = self._game(logits_clean, logits_adv, y)
        return F.cross_entropy(logits_adv, y) + l_d0 + l_classes

    def state_dict(self) -> dict[str, Any]:
        return {"discriminator": self.discriminator.state_dict(),
                "discriminator_optimizer": self.discriminator_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])


def latent_features(model: nn.Module, x: Tensor) -> Tensor:
    """The penultimate features: the input of the model's last ``nn.Linear``, shape (N, features).

    Caught with a forward pre-hook during one forward pass in eval mode, without gradients, for
    pictures (t-SNE, PCA) of the latent distributions of clean and perturbed inputs
    (:class:`LatentDistributionAT`). "Last" is the last ``nn.Linear`` registered in the model
    (:meth:`~torch.nn.Module.modules` order), which for sequential models is the output layer.
    """
    check_model(model)
    check_images(x)
    module = unwrap(model)
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"model must contain an nn.Linear output layer, got a {type(module).__name__} with none")
    seen: list[Tensor] = []
    handle = linears[-1].register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
    try:
        with torch.no_grad(), eval_mode(module):
            module(x)
    finally:
        handle.remove()
    return seen[-1].detach()
