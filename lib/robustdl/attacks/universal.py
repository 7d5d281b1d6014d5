r"""Universal attacks: one perturbation, computed once, that fools a model on most images.

* :func:`deepfool` -- the minimal perturbation to the closest linearised decision boundary,
  the building block of :func:`uap`;
* :func:`uap` -- Universal Adversarial Perturbations (Algorithm 1 of Moosavi-Dezfooli et al. 2017);
* :func:`guap` -- Generalised UAP (Zhang et al. 2020): a universal flow field and a universal
  additive perturbation, learned jointly;
* :func:`fooling_rate` -- the fraction of images whose predicted label a perturbation changes.

A universal additive perturbation ``v`` has shape (1, C, H, W) and is applied as
``(x + v).clamp(0, 1)``; :class:`GeneralizedPerturbation` applies its flow and its ``delta``.

Taught in the chapter *Adversarial attacks* (universal attacks).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustdl._checks import check_fraction, check_images, check_nonnegative, check_positive_int
from robustdl._model import check_inputs, check_model, eval_mode, logits_of, predict
from robustdl._progress import progress_bar
from robustdl._random import permutation
from robustdl.attacks.spatial import flow_loss, flow_warp
from robustdl.threat import LpBall, as_ball, per_example

__all__ = ["GeneralizedPerturbation", "deepfool", "fooling_rate", "guap", "uap"]


#: Images per forward pass of the predictions (:func:`~robustdl.predict`) these attacks compare.
BATCH = 500


def fooling_rate(model: nn.Module, x: Tensor, x_adv: Tensor) -> float:
    r"""The fraction of images whose predicted label changes, :cite:`moosavi2017universal` (Sec. 2).

    .. math:: \frac{1}{N} \sum_{i=1}^{N} \mathbb{1}\{\hat k(x'_i) \ne \hat k(x_i)\}

    with :math:`\hat k` the model's prediction: the true labels play no part.
    """
    check_model(model)
    check_images(x)
    check_images(x_adv, "x_adv")
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv must have the shape of x {tuple(x.shape)}, got {tuple(x_adv.shape)}")
    with eval_mode(model):
        return (predict(model, x, BATCH) != predict(model, x_adv, BATCH)).float().mean().item()


def _class_gradients(model: nn.Module, x: Tensor, classes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """All logits at ``x``, the logits of ``classes`` (n, K) and their input gradients (n, K, ...).

    One forward pass and K backward passes, for the input only (nothing accumulates on the model).
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = logits_of(model, x)
        z = logits.gather(1, classes)
        k = classes.shape[1]
        grads = [torch.autograd.grad(z[:, i].sum(), x, retain_graph=i < k - 1)[0] for i in range(k)]
    return logits.detach(), z.detach(), torch.stack(grads, dim=1)


def _deepfool_step(z: Tensor, grads: Tensor, ball: LpBall) -> Tensor:
    r"""The step to the closest linearised boundary, :cite:`moosavi2016deepfool` (Algorithm 2, Sec. 3.3).

    Column 0 of ``z`` is the original class :math:`\hat k`. With :math:`f'_k = f_k - f_{\hat k}`
    and :math:`w'_k = \nabla f_k - \nabla f_{\hat k}`, the closest boundary is
    :math:`\hat l = \arg\min_k |f'_k| / \|w'_k\|_q` (:math:`q` the dual norm) and the step is
    :math:`r = \frac{|f'_{\hat l}|}{\|w'_{\hat l}\|_q}\, s(w'_{\hat l})`, with
    :math:`s(w) = \arg\max_{\|s\|_p \le 1} \langle w, s\rangle` the unit steepest step
    (:meth:`~robustdl.threat.LpBall.step`): :math:`w / \|w\|_2` for :math:`p = 2`, giving the
    paper's :math:`|f'| w' / \|w'\|_2^2`, and :math:`\mathrm{sign}(w)` for :math:`p = \infty`.
    """
    f = z[:, 1:] - z[:, :1]
    w = grads[:, 1:] - grads[:, :1]
    n, k = f.shape
    distance = f.abs() / ball.dual_norm(w.flatten(0, 1)).view(n, k).clamp_min(1e-12)
    closest = distance.argmin(dim=1)
    rows = torch.arange(n, device=z.device)
    w_closest = w[rows, closest]
    return per_example(distance[rows, closest], w_closest) * ball.step(w_closest, 1.0)


def deepfool(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    num_classes: int = 10,
    overshoot: float = 0.02,
    steps: int = 50,
    norm: str | float = "l2",
) -> Tensor:
    r"""DeepFool, Moosavi-Dezfooli et al. (2016), :cite:`moosavi2016deepfool` (Algorithm 2, Sec. 3.3).

    Linearise the classifier at :math:`x_i`, step to the closest linearised decision boundary
    (:math:`r_i`, the multiclass step of Algorithm 2 for :math:`p = 2`, of Sec. 3.3 for general
    :math:`p`; see :func:`_deepfool_step`), and repeat until the label changes; then overshoot
    the total by :math:`1 + \eta`:

    .. math:: x_{i+1} = \mathrm{clip}_{[0,1]}(x_i + r_i), \qquad
              x_{adv} = \mathrm{clip}_{[0,1]}\big(x + (1 + \eta)(x_n - x)\big).

    The paper has no box; clipping each iterate (as ART does) keeps every step useful, where
    accumulating unclipped steps (the authors' code) stalls on MNIST's saturated pixels and
    fails on about one digit in five. Only the ``num_classes`` classes of highest clean logit
    are candidates. The perturbation is unbounded: DeepFool estimates the *smallest* one, in
    the ``norm`` given.

    Args:
        model: a classifier returning logits, taking images in [0, 1].
        x: clean images in [0, 1], shape (N, ...).
        y: the labels to move away from, shape (N,); default the model's predictions. Examples
            the model already misclassifies (prediction not ``y``) are returned unchanged.
        num_classes: how many candidate classes (the label included) to linearise.
        overshoot: the overshoot :math:`\eta \ge 0`.
        steps: the most linearisation steps.
        norm: ``"l2"`` (the paper's main case), ``"linf"`` or ``"l1"``.

    Returns:
        New images, detached, in [0, 1]: adversarial unless ``steps`` ran out first.
    """
    if y is None:
        check_model(model)
        check_images(x)
    else:
        check_inputs(model, x, y)
    num_classes, steps = check_positive_int(num_classes, "num_classes"), check_positive_int(steps, "steps")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    overshoot = check_nonnegative(overshoot, "overshoot")
    ball = LpBall(norm, 0.0)  # its geometry only: DeepFool's perturbation has no radius
    with eval_mode(model):
        with torch.no_grad():
            logits = logits_of(model, x)
        label = logits.argmax(dim=1) if y is None else y
        top = min(num_classes, logits.shape[1])
        classes = logits.scatter(1, label[:, None], math.inf).topk(top, dim=1).indices  # label first
        active = logits.argmax(dim=1) == label
        x_adv = x.detach().clone()
        for _ in range(steps):
            todo = active.nonzero().flatten()
            if len(todo) == 0:
                break
            logits, z, grads = _class_gradients(model, x_adv[todo], classes[todo])
            still = logits.argmax(dim=1) == label[todo]
            active[todo[~still]] = False
            todo = todo[still]
            x_adv[todo] = (x_adv[todo] + _deepfool_step(z[still], grads[still], ball)).clamp(0, 1)
    return (x + (1 + overshoot) * (x_adv - x)).clamp(0, 1).detach()


def uap(
    model: nn.Module,
    images: Tensor,
    eps: float | LpBall,
    norm: str | float = "linf",
    max_passes: int = 10,
    target_fooling_rate: float = 0.8,
    deepfool_steps: int = 10,
    overshoot: float = 0.02,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
) -> Tensor:
    r"""A universal adversarial perturbation, Moosavi-Dezfooli et al. (2017), :cite:`moosavi2017universal`.

    Algorithm 1 of the paper: starting from :math:`v = 0`, pass over the images in a random
    order; whenever :math:`x_i + v` still has the clean prediction :math:`\hat k(x_i)`, add the
    minimal perturbation that sends it across the boundary and project back onto the ball,

    .. math:: \Delta v_i = \mathrm{DeepFool}(x_i + v) - (x_i + v), \qquad
              v \leftarrow \mathcal{P}_{p,\epsilon}(v + \Delta v_i),

    until the fooling rate on the images reaches :math:`1 - \delta` (``target_fooling_rate``)
    or ``max_passes`` passes are done. As in the paper, :func:`deepfool` looks for the minimal
    :math:`L_2` perturbation whatever the ``norm`` of the ball; :math:`x_i + v` is clipped to
    [0, 1]. The images are visited one at a time, as the algorithm is sequential.

    Args:
        model: a classifier returning logits, taking images in [0, 1].
        images: the images to fool, in [0, 1], shape (N, C, H, W); their labels play no part.
        eps: the radius :math:`\epsilon` of the ball :math:`\|v\|_p \le \epsilon`, or that ball (an
            :class:`~robustdl.threat.LpBall`; then ``norm`` is left out).
        norm: ``"linf"`` (default), ``"l2"`` or ``"l1"``.
        max_passes: the most passes over the images.
        target_fooling_rate: :math:`1 - \delta`, the fooling rate at which to stop.
        deepfool_steps: the most steps of each DeepFool run. A truncated run still moves
            towards the boundary and the next pass revisits the image: on MNIST 3 steps reach
            about the fooling rate of 10 in a third of the time.
        overshoot: DeepFool's overshoot.
        generator: random generator for the order of the images.
        progress: show a progress bar over passes (default: ``$ROBUSTDL_PROGRESS``).

    Returns:
        The perturbation :math:`v`, shape (1, C, H, W), detached, with :math:`\|v\|_p \le \epsilon`.
    """
    check_model(model)
    check_images(images, "images")
    ball = as_ball(eps, norm)
    max_passes = check_positive_int(max_passes, "max_passes")
    target_fooling_rate = check_fraction(target_fooling_rate, "target_fooling_rate")
    v = torch.zeros_like(images[:1])
    with eval_mode(model):
        clean = predict(model, images, BATCH)
        for _ in progress_bar(range(max_passes), progress, desc="UAP passes"):
            order = permutation(len(images), images.device, generator).tolist()
            for i in order:
                x_v = (images[i : i + 1] + v).clamp(0, 1)
                if predict(model, x_v, BATCH) == clean[i]:
                    step = deepfool(model, x_v, clean[i : i + 1], overshoot=overshoot, steps=deepfool_steps) - x_v
                    v = ball.project_perturbation(v + step)
            if (predict(model, (images + v).clamp(0, 1), BATCH) != clean).float().mean() >= target_fooling_rate:
                break
    return v


class GeneralizedPerturbation(NamedTuple):
    """A universal flow field and additive perturbation: ``x -> clip(warp(x, flow) + delta)``."""

    #: The universal flow field, shape (1, 2, H, W) (see :mod:`robustdl.attacks.spatial`).
    flow: Tensor
    #: The universal additive perturbation, shape (1, C, H, W).
    delta: Tensor

    def apply(self, x: Tensor) -> Tensor:
        r""":math:`x_{adv} = \mathrm{clip}_{[0,1]}(\mathcal{F}(x; f) + v)` for every image of ``x``."""
        return (flow_warp(x, self.flow) + self.delta).clamp(0, 1)


def guap(
    model: nn.Module,
    images: Tensor,
    eps: float | LpBall,
    tau: float,
    norm: str | float = "linf",
    epochs: int = 20,
    lr: float = 0.01,
    batch_size: int = 50,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
) -> GeneralizedPerturbation:
    r"""Generalised universal adversarial perturbation (GUAP), Zhang et al. (2020), :cite:`zhang2020generalizing`.

    One flow field :math:`f` and one additive perturbation :math:`v` for all images,

    .. math:: x_{adv} = \mathrm{clip}_{[0,1]}\big(\mathcal{F}(x; f) + v\big),
              \qquad \mathcal{L}_{flow}(f) \le \tau, \quad \|v\|_p \le \epsilon,

    with :math:`\mathcal{F}` the spatial transformation :func:`flow_warp` and
    :math:`\mathcal{L}_{flow}` the stAdv flow loss with a fixed frame (:func:`flow_loss` with
    ``fixed_frame=True``, as the authors' code pads the flow with zeros, so that a whole-image
    translation is not free). Following the authors' code, the objective maximised is
    :math:`\frac{1}{N}\sum_i \log\big(1 + \mathrm{CE}(x_{adv,i}, \hat k(x_i))\big)`, the cross-entropy
    against the clean prediction, logged so that no image already fooled dominates.

    Here :math:`f` and :math:`v` are optimised directly by Adam over mini-batches of ``images``
    (the paper produces them with a generator network from a fixed noise input). After every
    step, :math:`v` is projected onto the ball and :math:`f` scaled down onto the budget
    (:math:`\mathcal{L}_{flow}` with ``tiny=0`` is positively homogeneous, so
    :math:`f \leftarrow f \min(1, \tau / \mathcal{L}_{flow}(f))` is exact). ``tau=0`` gives an
    additive-only universal perturbation, ``eps=0`` a spatial-only one.

    Args:
        model: a classifier returning logits, taking images in [0, 1].
        images: the images to fool, in [0, 1], shape (N, C, H, W); their labels play no part.
        eps: the radius :math:`\epsilon` of the additive perturbation.
        tau: the flow budget :math:`\tau`, in units of the fixed-frame flow loss, a sum over
            pixels: on 28x28 images :math:`\tau = 500` allows neighbouring displacements to
            differ by about 0.15 pixel on average (flows of at most about 0.4 pixel on MNIST).
        norm: the norm of the additive perturbation: ``"linf"`` (default), ``"l2"`` or ``"l1"``.
        epochs: passes over ``images``.
        lr: Adam's learning rate (for both the flow, in pixels, and the perturbation).
        batch_size: images per step.
        generator: random generator for the order of the images.
        progress: show a progress bar over epochs (default: ``$ROBUSTDL_PROGRESS``).

    Returns:
        The :class:`GeneralizedPerturbation` ``(flow, delta)``, detached.
    """
    check_model(model)
    check_images(images, "images")
    if images.dim() != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    ball = as_ball(eps, norm)
    tau, lr = check_nonnegative(tau, "tau"), check_nonnegative(lr, "lr")
    epochs, batch_size = check_positive_int(epochs, "epochs"), check_positive_int(batch_size, "batch_size")
    flow = images.new_zeros(1, 2, *images.shape[2:]).requires_grad_(True)
    delta = torch.zeros_like(images[:1]).requires_grad_(True)
    optimiser = torch.optim.Adam([flow, delta], lr=lr)
    with eval_mode(model):
        clean = predict(model, images, BATCH)
        for _ in progress_bar(range(epochs), progress, desc="GUAP epochs"):
            for batch in permutation(len(images), images.device, generator).split(batch_size):
                with torch.enable_grad():
                    x_adv = GeneralizedPerturbation(flow, delta).apply(images[batch])
                    ce = F.cross_entropy(model(x_adv), clean[batch], reduction="none")
                    loss = -torch.log1p(ce).mean()
                    flow.grad, delta.grad = torch.autograd.grad(loss, [flow, delta])
                optimiser.step()
                with torch.no_grad():
                    delta.copy_(ball.project_perturbation(delta))
                    budget = flow_loss(flow, tiny=0.0, fixed_frame=True)
                    flow.mul_(torch.clamp(tau / budget.clamp_min(1e-12), max=1.0))
    return GeneralizedPerturbation(flow.detach(), delta.detach())

