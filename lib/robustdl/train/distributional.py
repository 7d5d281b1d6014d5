r"""Distributional robustness: objectives that perturb the distribution of the data, not single points.

Adversarial training (:mod:`robustdl.train.adversarial`) guards each input inside its own ball.
The objectives here follow the seed tutorial's four ways of looking at the data distribution:

* :func:`wrm_loss` -- WRM (Sinha, Namkoong and Duchi 2018): the worst distribution in a
  Wasserstein ball around the data, through the ball's Lagrangian penalty (:func:`wrm_attack`);
* :func:`vat_loss`, :class:`VAT` -- virtual adversarial training (Miyato et al. 2018): the local
  distributional smoothness :func:`lds` along the :func:`virtual_adversarial_direction`,
  supervised or semi-supervised;
* :func:`feature_scattering_loss` -- feature scattering (Zhang and Wang 2019): the batch is
  perturbed *jointly*, without labels, to maximise an optimal-transport distance between its
  clean and perturbed logits (:func:`feature_scattering_attack`, :func:`sinkhorn`);
* :class:`LatentDistributionAT` -- ATLD (Qian et al. 2021): a discriminator
  (:func:`latent_discriminator`) tells the latent distribution of clean inputs from that of
  perturbed ones, the perturbations deceive it, and the classifier plays against it;
* :func:`latent_features` -- a model's penultimate features, to picture those distributions.

As in :mod:`~robustdl.train.adversarial`, every inner maximisation runs on the module inside a
DistributedDataParallel wrapper (:func:`~robustdl.train.distributed.unwrap`) in eval mode and
returns detached points in the [0, 1] box; the training loss goes through the model itself, in
train mode, and by Danskin's theorem its gradient at the (detached) maximiser is the gradient
of the maximum. Taught in the chapter *Distributional robustness*.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustdl._checks import check_fraction, check_images, check_labels, check_nonnegative, check_positive_int
from robustdl._random import normal
from robustdl.attacks._core import check_inputs, check_model, cross_entropy, eval_mode
from robustdl.attacks.gradient import pgd
from robustdl.threat import LpBall
from robustdl.train.adversarial import _kl_from
from robustdl.train.distributed import unwrap

__all__ = [
    "VAT",
    "LatentDistributionAT",
    "feature_scattering_attack",
    "feature_scattering_loss",
    "latent_discriminator",
    "latent_features",
    "lds",
    "sinkhorn",
    "vat_attack",
    "vat_loss",
    "virtual_adversarial_direction",
    "wrm_attack",
    "wrm_loss",
]

#: The unit L2 sphere's steepest step: ``_L2.step(g, 1.0)`` is :math:`g / \|g\|_2` per example.
_L2 = LpBall("l2", 1.0)


def _check_positive(value: object, name: str, why: str) -> float:
    """A finite real number > 0; ``why`` says what a value <= 0 would break."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
        raise ValueError(f"{name} must be > 0 ({why}), got {value}")
    return check_nonnegative(value, name)


# --------------------------------------------------------------------------------------------
# WRM: the Lagrangian penalty of a Wasserstein ball
# --------------------------------------------------------------------------------------------


def wrm_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    gamma: float,
    steps: int = 15,
    step_size: float | None = None,
) -> Tensor:
    r"""WRM's adversarial points, Sinha, Namkoong and Duchi (2018), :cite:`sinha2018certifying` (Algorithm 1).

    The inner problem of their robust surrogate
    :math:`\phi_\gamma(\theta; x) = \sup_z\, \ell(\theta; z, y) - \gamma\, c(z, x)` with the
    transport cost of their experiments, :math:`c(z, x) = \|z - x\|_2^2`:

    .. math:: z^\star = \arg\max_{z \in [0, 1]^d}\ \ell(\theta; z, y) - \gamma \|z - x\|_2^2,

    by gradient ascent from :math:`z_0 = x` with their decaying steps
    :math:`\alpha_t = \alpha / \sqrt{t + 1}`, each iterate clipped into the box (the projection
    onto :math:`[0, 1]^d`; the authors' code does not clip). There is no ball: the price
    :math:`\gamma` per unit of transport decides how far each point travels, and
    :math:`z^\star \to x` as :math:`\gamma \to \infty`. The default :math:`\alpha = 1/(2\gamma)`
    makes the first step :math:`x + \nabla_z \ell(x) / (2\gamma)`, the maximiser of the
    linearised problem and the first step of the authors' code (whose ``steps`` do not count
    it). For :math:`\gamma` above the smoothness of :math:`\ell` in :math:`z` the problem is
    strongly concave, so gradient ascent finds its unique maximiser: the regime of their
    certificate, for which they use smooth (ELU) networks; at a ReLU network's kinks the ascent
    may oscillate.
    """
    check_inputs(model, x, y)
    gamma = _check_positive(gamma, "gamma", "the penalised problem is well posed only when transport costs "
                             "something; otherwise its worst case is the largest loss anywhere in the box")
    steps = check_positive_int(steps, "steps")
    alpha = 1 / (2 * gamma) if step_size is None else check_nonnegative(step_size, "step_size")
    x = x.detach()
    z = x.clone()
    with eval_mode(model):
        for t in range(steps):
            with torch.enable_grad():
                z = z.requires_grad_(True)
                penalised = cross_entropy(model(z), y) - gamma * (z - x).flatten(1).pow(2).sum(dim=1)
                (grad,) = torch.autograd.grad(penalised.sum(), z)
            z = (z.detach() + alpha / math.sqrt(t + 1) * grad).clamp(0, 1)
    return z


def wrm_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    gamma: float,
    steps: int = 15,
    step_size: float | None = None,
) -> Tensor:
    r"""WRM, Sinha, Namkoong and Duchi (2018), :cite:`sinha2018certifying` (eq. 2, Algorithm 1).

    The worst case over distributions :math:`P` near the data :math:`P_0` in the Wasserstein
    distance :math:`W_c`, relaxed by a Lagrangian penalty (the seed tutorial's equation):

    .. math:: \min_\theta \sup_P\ \mathbb{E}_P[\ell(\theta; Z)] - \gamma W_c(P, P_0)
              = \min_\theta\ \mathbb{E}_{P_0}\big[\sup_z\ \ell(\theta; z, y) - \gamma \|z - x\|_2^2\big],

    the duality of their Proposition 1 turning the supremum over distributions into one over
    points. The inner supremum is :func:`wrm_attack`; the loss is then the cross-entropy at
    the detached maximisers :math:`z^\star` (Danskin: the penalty does not depend on
    :math:`\theta`, so it is left out). :math:`\gamma \le 0` is refused: without a positive
    price on transport the supremum is the largest loss anywhere in the box, not a
    neighbourhood of the data. A very large :math:`\gamma` is standard training.
    """
    z = wrm_attack(unwrap(model), x, y, gamma, steps, step_size)
    return F.cross_entropy(model(z), y)


# --------------------------------------------------------------------------------------------
# Virtual adversarial training: local distributional smoothness
# --------------------------------------------------------------------------------------------


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
    xi = _check_positive(xi, "xi", "the finite difference needs a nonzero probe")
    iterations = check_positive_int(iterations, "iterations")
    index = torch.arange(len(x), device=x.device)
    d = normal(x.shape, x, generator)
    with eval_mode(model):
        with torch.no_grad():
            divergence = _kl_from(F.softmax(model(x), dim=1))
        for _ in range(iterations):
            with torch.enable_grad():
                r = (xi * _L2.step(d, 1.0)).requires_grad_(True)
                (d,) = torch.autograd.grad(divergence(model(x.detach() + r), index).sum(), r)
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
    return _kl_from(p_clean)(model(x_adv), torch.arange(len(x), device=x.device)).mean()


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
        self.xi = _check_positive(xi, "xi", "the finite difference needs a nonzero probe")
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


# --------------------------------------------------------------------------------------------
# Feature scattering: optimal transport between the clean and perturbed batch
# --------------------------------------------------------------------------------------------


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
    epsilon = _check_positive(epsilon, "epsilon", "the entropic regularisation weight")
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
    eps: float,
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
    :func:`~robustdl.attacks.pgd`: ``steps`` steepest-ascent steps
    (:meth:`~robustdl.threat.LpBall.step`, projected onto the ball and the box) from a uniformly
    random point of the ball. The authors' CIFAR-10 setting is one Linf step of size
    :math:`\epsilon` (the default ``step_size``) from that random start, at
    :math:`\epsilon = 8/255`.
    """
    check_model(model)
    check_images(x)
    ball = LpBall(norm, eps)
    steps = check_positive_int(steps, "steps")
    alpha = ball.eps if step_size is None else check_nonnegative(step_size, "step_size")
    x = x.detach()
    x_adv = ball.random(x, generator)
    with eval_mode(model):
        with torch.no_grad():
            clean = model(x)
        for _ in range(steps):
            with torch.enable_grad():
                x_adv = x_adv.requires_grad_(True)
                (grad,) = torch.autograd.grad(_feature_matching_distance(clean, model(x_adv)), x_adv)
            x_adv = ball.project(x_adv.detach() + ball.step(grad, alpha), x)
    return x_adv


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
    eps: float,
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


# --------------------------------------------------------------------------------------------
# ATLD: adversarial training with latent distributions
# --------------------------------------------------------------------------------------------


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
        eps: float,
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
        self.ball = LpBall(norm, eps)
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
