r"""Adversarial training: objectives for the one training loop that solve the min-max problem.

Madry et al. (2018) train against the worst case in the threat model :math:`S(x)`,

.. math:: \min_\theta\ \mathbb{E}_{(x, y) \sim \mathcal{D}}\Big[\max_{x' \in S(x)} L(x', y; \theta)\Big],

the seed tutorial's minimax problem. Every objective here approximates the inner maximum with
an attack of :mod:`robustdl.attacks` and returns the outer loss at the adversarial point; the
loop's ``loss.backward()`` then takes the gradient of the maximum by Danskin's theorem,
:math:`\nabla_\theta \max_{x'} L(x', y; \theta) = \nabla_\theta L(x^\star, y; \theta)` at the
maximiser :math:`x^\star`, so :math:`x^\star` is detached before the outer loss.

* :func:`pgd_at_loss` -- PGD adversarial training (Madry et al. 2018);
* :func:`fast_at_loss` -- FGSM training from a random start, "fast is better than free"
  (Wong et al. 2020), or plain FGSM training without the random start;
* :class:`FreeAT` -- free adversarial training with minibatch replay (Shafahi et al. 2019);
* :class:`YOPO` -- "you only propagate once" (Zhang et al. 2019): the adversary moves with the
  first layer's gradient only;
* :func:`trades_loss` -- TRADES (Zhang et al. 2019): cross-entropy plus
  :math:`\beta` times the worst-case KL divergence;
* :class:`EpsilonRamp` -- a radius that grows linearly from 0 over the first steps, the warm-up
  that lets small networks leave the constant predictor at large radii (Gowal et al. 2018);
* :class:`CatastrophicOverfittingGuard` -- Wong et al.'s early stop when PGD accuracy on a
  training batch collapses.

Objectives craft their adversarial examples with the model in eval mode (as TRADES does) and
compute the training loss in train mode. Taught in the chapter *Adversarial training*.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustdl._checks import check_images, check_labels, check_nonnegative, check_positive_int
from robustdl._model import accuracy, eval_mode
from robustdl.ascent import ascent_step, projected_ascent
from robustdl.attacks.gradient import pgd
from robustdl.losses import kl_divergence
from robustdl.threat import LpBall, as_ball
from robustdl.train.distributed import unwrap
from robustdl.train.loop import Objective

__all__ = [
    "YOPO",
    "CatastrophicOverfittingGuard",
    "EpsilonRamp",
    "FreeAT",
    "fast_at_loss",
    "pgd_at_loss",
    "trades_loss",
]


def pgd_at_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | LpBall = 0.3,
    norm: str | float = "linf",
    steps: int = 10,
    step_size: float | None = None,
) -> Tensor:
    r"""PGD adversarial training, Madry et al. (2018), :cite:`madry2018towards` (eq. 2.1).

    The inner maximum by :func:`~robustdl.attacks.pgd` from a random start, every example
    running all ``steps`` steps (no early stop: the inner problem maximises the loss, not just
    a misclassification); then, by Danskin's theorem, the loss at the maximiser
    :math:`x^\star`:

    .. math:: \frac1N \sum_i L(x^\star_i, y_i; \theta), \qquad
              x^\star_i \approx \arg\max_{x' \in S(x_i)} L(x', y_i; \theta).

    Madry et al. train MNIST with 40 steps of 0.01 at :math:`\epsilon = 0.3`, CIFAR-10 with 7
    steps of 2/255 at 8/255; ``step_size`` defaults to :math:`2.5\,\epsilon / T`.
    """
    x_star = pgd(unwrap(model), x, y, eps, norm, steps, step_size, early_stop=False)
    return F.cross_entropy(model(x_star), y)


def fast_at_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | LpBall = 0.3,
    step_size: float | None = None,
    random_start: bool = True,
    norm: str | float = "linf",
) -> Tensor:
    r"""FGSM adversarial training from a random start, Wong et al. (2020), :cite:`wong2020fast`.

    One FGSM step of size :math:`\alpha` from a uniformly random point of the ball, projected
    back (their Algorithm 3); then the loss there:

    .. math:: \delta_0 \sim U(-\epsilon, \epsilon)^d, \quad
              x^\star = \Pi_{S(x)}\big(x + \delta_0 + \alpha\,\mathrm{sign}(\nabla_x L(x + \delta_0, y; \theta))\big).

    The default :math:`\alpha = 1.25\,\epsilon` is theirs. With ``random_start=False`` and
    :math:`\alpha = \epsilon` this is plain FGSM training (Goodfellow et al. 2015), prone to
    *catastrophic overfitting*: robustness to FGSM, none to PGD
    (:class:`CatastrophicOverfittingGuard`). One step of :func:`~robustdl.attacks.pgd` is
    exactly this update, so PGD does the work.
    """
    ball = as_ball(eps, norm)
    alpha = 1.25 * ball.eps if step_size is None else check_nonnegative(step_size, "step_size")
    x_star = pgd(unwrap(model), x, y, eps, norm, steps=1, step_size=alpha, random_start=random_start,
                 early_stop=False)
    return F.cross_entropy(model(x_star), y)


class FreeAT:
    r"""Free adversarial training, Shafahi et al. (2019), :cite:`shafahi2019free` (Algorithm 1).

    Each minibatch is replayed :math:`m` times in a row (``fit(..., replays=m)``); every replay
    is one forward-backward pass that gives the parameter gradient *and*, for free, the input
    gradient :math:`g`, with which the perturbation, carried over from one replay and one
    minibatch to the next, ascends:

    .. math:: \delta \leftarrow \Pi_{\|\delta\|_p \le \epsilon}\big(\delta + \mathrm{step}_p(g, \epsilon)\big),

    (for Linf, :math:`\delta + \epsilon\,\mathrm{sign}(g)` clipped to :math:`[-\epsilon, \epsilon]`),
    projected with the [0, 1] box (:func:`~robustdl.ascent.ascent_step`, PGD's step). A
    tensor hook on :math:`\delta` performs the ascent during the loop's own ``loss.backward()``.
    To match the work of :math:`E` epochs of standard training, train :math:`E / m` epochs.

    >>> free = FreeAT(eps=0.3)
    >>> fit(model, loader, epochs // free.replays, optimizer, free, replays=free.replays)
    """

    def __init__(self, eps: float | LpBall = 0.3, replays: int = 8, norm: str | float = "linf") -> None:
        self.ball = as_ball(eps, norm)
        self.replays = check_positive_int(replays, "replays")
        self.delta: Tensor | None = None

    def _start(self, x: Tensor) -> Tensor:
        """The carried perturbation for this batch (zeros where there is none yet).

        A carried perturbation (e.g. loaded from a CPU checkpoint) moves to ``x``'s device and dtype.
        """
        fresh = torch.zeros_like(x)
        if self.delta is not None and self.delta.shape[1:] == x.shape[1:]:
            self.delta = self.delta.to(x)
            n = min(len(x), len(self.delta))
            fresh[:n] = self.delta[:n]
        return fresh

    def _ascend(self, x: Tensor, delta: Tensor, grad: Tensor) -> None:
        with torch.no_grad():
            x_new = ascent_step(x + delta, x, grad, self.ball, self.ball.eps)
            if self.delta is None or self.delta.shape[1:] != x.shape[1:] or len(self.delta) < len(x):
                self.delta = torch.zeros_like(x)
            self.delta[: len(x)] = x_new - x

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        check_images(x)
        check_labels(y, x)
        delta = self._start(x).requires_grad_(True)
        delta.register_hook(lambda grad: self._ascend(x, delta.detach(), grad))
        return F.cross_entropy(model((x + delta).clamp(0, 1)), y)

    def state_dict(self) -> dict[str, Any]:
        return {"delta": torch.empty(0) if self.delta is None else self.delta.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.delta = state["delta"] if state["delta"].numel() else None


class YOPO:
    r"""You Only Propagate Once, Zhang et al. (2019), :cite:`zhang2019yopo` (YOPO-m-n).

    Split the network as :math:`f = g \circ f_0` with :math:`f_0` its first layer. By
    Pontryagin's maximum principle the adversary depends on the rest of the network only
    through the co-state :math:`p = \nabla_z L(g(z), y)` at :math:`z = f_0(x + \eta)`. For each
    of :math:`m` (``outer``) full forward-backward passes, which give :math:`p` and accumulate the
    parameter gradient, the perturbation takes :math:`n` (``inner``) cheap ascent steps through
    the first layer alone, projected ascent (:func:`~robustdl.ascent.projected_ascent`)
    on the Hamiltonian :math:`p \cdot f_0(x + \eta)`; the first layer's weights also collect the
    Hamiltonian's gradient at the moved point. The returned value is the sum whose gradient is
    that update (as the authors' code accumulates it):

    .. math:: \sum_{j=1}^{m} \Big[ L(f(x + \eta_j), y) + p_j \cdot f_0(x + \eta_{j+1}) \Big].

    ``first_layer`` names the module that is :math:`f_0`, e.g. ``"net.1"``, the first
    convolution of the bundled CNNs (``net.0`` is the normalisation, which runs with it); the
    model must call it once per forward pass. Train about :math:`1/m` of the epochs of PGD
    training. The step :math:`\sigma` defaults to :math:`2\epsilon / n`.
    """

    def __init__(self, first_layer: str, eps: float | LpBall = 0.3, outer: int = 5, inner: int = 3,
                 step_size: float | None = None, norm: str | float = "linf") -> None:
        self.first_layer = first_layer
        self.ball = as_ball(eps, norm)
        self.outer = check_positive_int(outer, "outer")
        self.inner = check_positive_int(inner, "inner")
        self.step_size = 2 * self.ball.eps / inner if step_size is None else check_nonnegative(step_size, "step_size")

    def _layer(self, model: nn.Module) -> nn.Module:
        modules = dict(unwrap(model).named_modules())
        if self.first_layer not in modules:
            raise ValueError(f"first_layer must name a module of the model, got {self.first_layer!r}; "
                             f"its modules include {sorted(k for k in modules if k)[:6]}")
        return modules[self.first_layer]

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        check_labels(y, check_images(x))
        layer, module = self._layer(model), unwrap(model)
        x_adv, total = self.ball.random(x), x.new_zeros(())
        for _ in range(self.outer):
            z, logits = _with_output_of(layer, model, x_adv)
            loss = F.cross_entropy(logits, y)
            (p,) = torch.autograd.grad(loss, z, retain_graph=True)
            x_adv = self._inner(module, layer, x, x_adv, p)
            total = total + loss + (p * _first_layer_output(module, layer, x_adv)).sum()
        return total

    def _inner(self, model: nn.Module, layer: nn.Module, x: Tensor, x_adv: Tensor, p: Tensor) -> Tensor:
        """``inner`` projected ascent steps on the Hamiltonian :math:`p \\cdot f_0(x')` through the first layer."""
        def hamiltonian(x_adv: Tensor, _rows: Tensor) -> tuple[Tensor, None]:
            return (p * _first_layer_output(model, layer, x_adv)).sum(), None

        return projected_ascent(hamiltonian, x, self.ball, [self.step_size] * self.inner, start=x_adv)


class _Reached(Exception):
    """Raised by a forward hook to stop a forward pass once the first layer has run."""


def _with_output_of(layer: nn.Module, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(layer's output, model(x))`` from one forward pass."""
    seen: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return seen[0], logits


def _first_layer_output(model: nn.Module, layer: nn.Module, x: Tensor) -> Tensor:
    """:math:`f_0(x)`: the forward pass of ``model`` up to ``layer``'s output, and no further."""
    seen: list[Tensor] = []

    def stop(_m: nn.Module, _i: object, out: Tensor) -> None:
        seen.append(out)
        raise _Reached

    handle = layer.register_forward_hook(stop)
    try:
        model(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    return seen[0]


def trades_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    beta: float = 6.0,
    eps: float | LpBall = 0.3,
    steps: int = 10,
    step_size: float | None = None,
    norm: str | float = "linf",
) -> Tensor:
    r"""TRADES, Zhang et al. (2019), :cite:`zhang2019theoretically` (eq. 5, Algorithm 1).

    The natural loss plus :math:`\beta` times the worst-case divergence of the prediction
    inside the ball, which pushes the decision boundary away from the data:

    .. math:: \mathbb{E}\Big[L(f(x), y) + \beta \max_{x' \in S(x)} \mathrm{KL}\big(f(x)\,\|\,f(x')\big)\Big].

    The inner maximum is :func:`~robustdl.attacks.pgd` on the per-example KL divergence from the
    (fixed) clean prediction, passed to PGD as its per-example data ``y``, from a uniformly
    random point of the ball (the authors start at :math:`x + 0.001\,\mathcal{N}(0, I)`; either
    way the start avoids the KL's zero gradient at :math:`x' = x`). ``beta = 0`` is standard
    training; Zhang et al. use :math:`\beta = 6` on CIFAR-10 and MNIST.
    """
    beta = check_nonnegative(beta, "beta")
    with torch.no_grad(), eval_mode(model):
        p_clean = F.softmax(unwrap(model)(x), dim=1)
    x_star = pgd(unwrap(model), x, p_clean, eps, norm, steps, step_size,
                 loss=lambda logits, p: kl_divergence(p, logits), early_stop=False)
    logits = model(x)
    kl = F.kl_div(F.log_softmax(model(x_star), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
    return F.cross_entropy(logits, y) + beta * kl


class EpsilonRamp:
    r"""An objective whose radius grows linearly from 0 to ``eps`` over ``warmup`` training steps.

    At :math:`\epsilon = 0.3` on MNIST a small network trained adversarially from scratch sits at
    the constant predictor (loss :math:`\log 10`) for thousands of steps; a radius ramped up
    from 0 avoids it, as in the interval-bound training of Gowal et al. (2018)
    :cite:`gowal2018effectiveness`. ``objective(eps)`` builds the objective of radius ``eps``,
    e.g. ``EpsilonRamp(lambda e: partial(pgd_at_loss, eps=e), eps=0.3, warmup=2000)``; after the
    warm-up it is that objective at ``eps`` exactly. The step count is checkpointed.
    """

    def __init__(self, objective: Callable[[float], Objective], eps: float, warmup: int) -> None:
        self.objective, self.eps = objective, check_nonnegative(eps, "eps")
        self.warmup = check_positive_int(warmup, "warmup")
        self.step = 0

    def current_eps(self) -> float:
        r"""The radius of the next step: :math:`\epsilon \min(1, t / T_{warm})`."""
        return self.eps * min(1.0, self.step / self.warmup)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        loss = self.objective(self.current_eps())(model, x, y)
        self.step += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


class CatastrophicOverfittingGuard:
    r"""Stop training when PGD accuracy on a training batch collapses, Wong et al. (2020), :cite:`wong2020fast`.

    FGSM training can overfit catastrophically: within a few iterations the model becomes
    robust to FGSM and loses all robustness to PGD. After each epoch this :data:`Callback`
    measures PGD accuracy on a fixed training batch; if it falls more than ``drop`` below the
    best seen, it restores the weights of that best epoch and stops ``fit`` (their Sec. 5.3).
    """

    def __init__(self, x: Tensor, y: Tensor, eps: float, steps: int = 10, drop: float = 0.2,
                 norm: str | float = "linf") -> None:
        check_labels(y, check_images(x))
        self.x, self.y, self.eps, self.steps, self.norm = x, y, eps, check_positive_int(steps, "steps"), norm
        self.drop = check_nonnegative(drop, "drop")
        self.best, self.best_state, self.triggered_at = -1.0, None, None

    def __call__(self, model: nn.Module, record: dict[str, float]) -> bool:
        module = unwrap(model)
        dev = next(module.parameters()).device
        x, y = self.x.to(dev), self.y.to(dev)
        x_adv = pgd(module, x, y, self.eps, self.norm, self.steps)
        robust = accuracy(module, x_adv, y)
        record["guard_pgd_accuracy"] = robust
        if robust < self.best - self.drop:
            module.load_state_dict(self.best_state)
            self.triggered_at = record.get("epoch")
            record["catastrophic_overfitting"] = 1.0
            return True
        if robust >= self.best:
            self.best, self.best_state = robust, copy.deepcopy(module.state_dict())
        return False
