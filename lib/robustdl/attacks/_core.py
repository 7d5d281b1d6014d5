"""What only attacks share: the loss gradient at the input, the value an attack maximises, the best of
several runs, and the per-example search over a penalty constant."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import Tensor, nn

from robustdl._checks import check_labels, check_positive_int
from robustdl._model import check_inputs, logits_of
from robustdl.losses import Loss, cross_entropy, dlr_loss, goal_loss, goal_reached
from robustdl.threat import LpBall

#: An attack's objective ``objective(logits, y, target) -> (N,)``: the value it maximises.
Objective = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
#: The Euclidean norm of :mod:`robustdl.threat` (only ``norm`` is used, so the radius is 0).
_L2 = LpBall("l2", 0.0)


def input_gradient(model: nn.Module, x: Tensor, y: Tensor, loss: Loss = cross_entropy) -> Tensor:
    """The gradient :math:`\\nabla_x \\sum_i J(\\theta, x_i, y_i)` of the per-example loss.

    Only the input's gradient is computed (``torch.autograd.grad``), so no ``.grad`` is left
    on the model's parameters.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(logits_of(model, x), y).sum(), x)
    return grad


def _objective(loss: str | Loss) -> Objective:
    """The value an attack maximises: ``loss`` of the label, or minus ``loss`` of the target."""
    if loss == "dlr":
        return dlr_loss
    if loss == "ce":
        loss = cross_entropy
    if not callable(loss):
        raise ValueError(f"loss must be 'ce', 'dlr' or a function (logits, labels) -> (N,), got {loss!r}")

    return partial(goal_loss, loss=loss)


def _check_goal(model: object, x: object, y: object, target: object) -> None:
    check_inputs(model, x, y)
    if target is not None:
        check_labels(target, x, "target")  # type: ignore[arg-type]


#: One run of an attack on a batch: ``attack_once(x, y, target) -> x_adv``.
AttackOnce = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def best_of(
    runs: Iterable[AttackOnce],
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Tensor | None = None,
    loss: Loss | None = cross_entropy,
) -> Tensor:
    """Per example, the first result of ``runs`` that reaches the goal; each run attacks only the rest.

    The scheme of AutoAttack :cite:`croce2020reliable` for its restarts and its ensemble: run
    after run, only the examples no earlier run has broken are attacked, and an example keeps its
    first result that reaches the goal (:func:`~robustdl.losses.goal_reached`). An example no run
    breaks keeps the result of highest :func:`~robustdl.losses.goal_loss` of ``loss``, or with
    ``loss=None`` the last run's result. Each result costs one forward pass, without gradients.
    """
    best = x.clone()
    best_loss = torch.full((len(x),), float("-inf"), device=x.device, dtype=x.dtype)
    broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for run in runs:
        todo = (~broken).nonzero().flatten()
        if len(todo) == 0:
            break
        t = None if target is None else target[todo]
        candidate = run(x[todo], y[todo], t)
        with torch.no_grad():
            logits = logits_of(model, candidate)
        success = goal_reached(logits, y[todo], t)
        if loss is None:
            better = torch.ones_like(success)
        else:
            value = goal_loss(logits, y[todo], t, loss)
            better = success | (value > best_loss[todo])
            best_loss[todo[better]] = value[better]
        best[todo[better]] = candidate[better]
        broken[todo[success]] = True
    return best


def _restarted(run: AttackOnce, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, restarts: int) -> Tensor:
    """``run`` once, or :func:`~robustdl.attacks._core.best_of` ``restarts`` runs.

    A single run needs none of the forward passes by which ``best_of`` compares runs.
    """
    restarts = check_positive_int(restarts, "restarts")
    return run(x, y, target) if restarts == 1 else best_of([run] * restarts, model, x, y, target)


def _search_step(c: Tensor, lower: Tensor, upper: Tensor, grow: Tensor, factor: float) -> tuple[Tensor, ...]:
    """One step of the per-example search over ``c``.

    Where ``grow``, ``c`` is a lower bound of the constant sought, elsewhere an upper bound;
    the next ``c`` bisects the bracket once it is finite, and is ``c * factor`` before.
    """
    lower = torch.where(grow, torch.maximum(lower, c), lower)
    upper = torch.where(grow, upper, torch.minimum(upper, c))
    return torch.where(upper.isfinite(), (lower + upper) / 2, c * factor), lower, upper
