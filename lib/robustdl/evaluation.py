r"""Robust accuracy: a model's accuracy under attack, over radii, and under an ensemble of attacks.

* :func:`robust_accuracy` -- the accuracy on attacked inputs, through :func:`robustdl.train.evaluate`;
* :func:`robustness_curve` -- robust accuracy at each radius :math:`\epsilon`;
* :func:`worst_case` -- per example, the first of several attacks that breaks it, each later
  attack run only on the examples still unbroken (the scheme of AutoAttack
  :cite:`croce2020reliable`);
* :func:`autoattack_like` -- :func:`worst_case` over APGD on the cross-entropy, APGD on the DLR
  loss, targeted APGD on the DLR loss towards the most likely other classes, and the
  gradient-free Square Attack.

A robust accuracy is an upper bound on the true one: the stronger the attack, the tighter.

Taught in the chapter *Adversarial attacks* (evaluating robustness).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial

import torch
from torch import Tensor, nn

from robustdl._checks import check_images, check_labels, check_positive_int
from robustdl._model import check_inputs, eval_mode
from robustdl.attacks._core import best_of
from robustdl.attacks.apgd import apgd
from robustdl.attacks.square_attack import square
from robustdl.threat import LpBall
from robustdl.train import Attack, evaluate

__all__ = ["autoattack_like", "robust_accuracy", "robustness_curve", "worst_case"]

#: Data to evaluate on: a loader (any iterable of ``(x, y)`` batches) or one pair of tensors.
Data = Iterable[tuple[Tensor, Tensor]] | tuple[Tensor, Tensor]


def _batches(data: Data, batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
    """``data`` as batches: a pair of tensors ``(x, y)`` is cut into batches of ``batch_size``."""
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = check_images(data[0]), check_labels(data[1], data[0])
        size = check_positive_int(batch_size, "batch_size")
        return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]
    return data


def robust_accuracy(
    model: nn.Module,
    data: Data,
    attack: Attack | None,
    batch_size: int = 256,
    progress: bool | None = None,
) -> float:
    """The accuracy of ``model`` on ``data`` after ``attack(model, x, y) -> x_adv`` (clean if ``None``).

    ``data`` is a loader of ``(x, y)`` batches or a pair of tensors ``(x, y)``, cut into batches
    of ``batch_size``. The attack is, e.g., ``functools.partial(pgd, eps=0.3)``.
    """
    return evaluate(model, _batches(data, batch_size), attack, progress)["accuracy"]


def robustness_curve(
    model: nn.Module,
    data: Data,
    attack_factory: Callable[[float], Attack],
    eps_values: Sequence[float],
    batch_size: int = 256,
    progress: bool | None = None,
) -> list[float]:
    r"""Robust accuracy at each radius: ``attack_factory(eps)`` makes the attack at ``eps``.

    At :math:`\epsilon = 0` the threat model holds the input alone: the clean accuracy, with no
    attack run. For example
    ``robustness_curve(model, (x, y), lambda eps: partial(pgd, eps=eps), [0, 0.1, 0.2])``.
    """
    return [robust_accuracy(model, data, attack_factory(eps) if eps > 0 else None, batch_size, progress)
            for eps in eps_values]


def worst_case(model: nn.Module, x: Tensor, y: Tensor, attacks: Sequence[Attack]) -> Tensor:
    """Per example, the result of the first attack in ``attacks`` that makes ``model`` misclassify it.

    Examples the model already misclassifies are left as they are; each attack runs only on
    the examples that no earlier attack has broken, as AutoAttack runs its ensemble
    :cite:`croce2020reliable` (:func:`~robustdl.attacks._core.best_of`, which also keeps PGD's
    best restart). An example no attack breaks keeps the last attack's result.

    Args:
        model: a classifier returning logits, taking images in [0, 1].
        x: clean images in [0, 1], shape (N, ...).
        y: true labels, shape (N,).
        attacks: functions ``attack(model, x, y) -> x_adv``, tried in order.

    Returns:
        New images, detached, each in the threat model of the attack that produced it.
    """
    check_inputs(model, x, y)
    if len(attacks) == 0:
        raise ValueError("attacks must hold at least one attack(model, x, y) -> x_adv, got none")
    runs = [lambda x, _y, _t: x.clone()]  # the clean inputs: what is misclassified already stays so
    runs += [lambda x, y, _t, attack=attack: attack(model, x, y) for attack in attacks]
    with eval_mode(model):
        return best_of(runs, model, x.detach(), y, loss=None)


def _most_likely_other(model: nn.Module, x: Tensor, y: Tensor, rank: int) -> Tensor:
    """The class of ``rank``-th largest logit among the classes other than ``y`` (rank 1: the runner-up)."""
    with torch.no_grad():
        logits = model(x).scatter(1, y[:, None], float("-inf"))
    return logits.topk(rank, dim=1).indices[:, rank - 1]


def _targeted_apgd(model: nn.Module, x: Tensor, y: Tensor, rank: int, **kwargs: object) -> Tensor:
    """APGD on the targeted DLR loss towards the ``rank``-th most likely other class."""
    return apgd(model, x, y, target=_most_likely_other(model, x, y, rank), loss="dlr", **kwargs)


def autoattack_like(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | LpBall,
    norm: str | float = "linf",
    steps: int = 100,
    targets: int = 9,
    generator: torch.Generator | None = None,
    square_queries: int = 5000,
) -> Tensor:
    """An ensemble in the manner of AutoAttack's standard version :cite:`croce2020reliable`.

    :func:`worst_case` over :func:`~robustdl.attacks.apgd.apgd` on the cross-entropy, APGD
    on the DLR loss, then APGD-T: APGD on the targeted DLR loss towards each of the ``targets``
    most likely other classes in turn (at most the number of classes less one), then the
    gradient-free :func:`~robustdl.attacks.square_attack.square` with ``square_queries``
    queries (AutoAttack's 5000). Square needs no gradient, so it breaks examples whose
    gradients are masked or obfuscated, where the APGD runs stall: AutoAttack reads a
    robust accuracy that only Square lowers as a sign of gradient masking. AutoAttack's fourth
    member, FAB-T, is left out (it finds minimal perturbations, and adds little at a fixed
    radius once APGD-T has run).

    Args:
        model: a classifier returning logits, taking images in [0, 1].
        x: clean images in [0, 1], shape (N, ...).
        y: true labels, shape (N,).
        eps: the radius of the threat model, or the threat model itself, an
            :class:`~robustdl.threat.LpBall` (:func:`~robustdl.threat.as_ball`; then ``norm`` is left out).
        norm: ``"linf"`` or ``"l2"``.
        steps: APGD's iterations per run.
        targets: the number of target classes of APGD-T (0 for none).
        generator: the random generator of the starting points.
        square_queries: the Square Attack's queries per example (0 leaves it out: a cheaper,
            weaker ensemble, which overstates robustness where gradients are masked).

    Returns:
        New adversarial images, detached, in the ball and in [0, 1].
    """
    check_inputs(model, x, y)
    if isinstance(targets, bool) or not isinstance(targets, int) or targets < 0:
        raise ValueError(f"targets must be an integer >= 0, got {targets!r}")
    if isinstance(square_queries, bool) or not isinstance(square_queries, int) or square_queries < 0:
        raise ValueError(f"square_queries must be an integer >= 0, got {square_queries!r}")
    common = {"eps": eps, "norm": norm, "steps": steps, "generator": generator}
    with torch.no_grad():
        classes = model(x[:1]).shape[1]
    ranks = range(1, min(targets, classes - 1) + 1)
    attacks = [partial(apgd, loss="ce", **common), partial(apgd, loss="dlr", **common)]
    attacks += [partial(_targeted_apgd, rank=rank, **common) for rank in ranks]
    if square_queries:
        attacks.append(partial(square, eps=eps, norm=norm, queries=square_queries, generator=generator))
    return worst_case(model, x, y, attacks)
