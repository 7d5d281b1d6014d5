"""What every attack shares: the model in eval mode, and the loss gradient at the input."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustdl._checks import check_images, check_labels

#: A per-example loss ``loss(logits, labels) -> Tensor`` of shape (N,).
Loss = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy, the loss :math:`J(\\theta, x, y)` of FGSM and PGD."""
    return F.cross_entropy(logits, y, reduction="none")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its train/eval mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def check_model(model: object) -> None:
    """A clear error unless ``model`` is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module returning logits, got {type(model).__name__}")


def check_inputs(model: object, x: object, y: object) -> None:
    """Clear errors for the arguments every attack takes."""
    check_model(model)
    check_images(x)
    check_labels(y, x)  # type: ignore[arg-type]


def input_gradient(model: nn.Module, x: Tensor, y: Tensor, loss: Loss = cross_entropy) -> Tensor:
    """The gradient :math:`\\nabla_x \\sum_i J(\\theta, x_i, y_i)` of the per-example loss.

    Only the input's gradient is computed (``torch.autograd.grad``), so no ``.grad`` is left
    on the model's parameters.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(logits_of(model, x), y).sum(), x)
    return grad


def logits_of(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)``, checked to be a logits tensor."""
    logits = model(x)
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"model must return a logits tensor, got {type(logits).__name__}; wrap a model that "
            "returns a dict or tuple in a module that returns the logits"
        )
    return logits


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """The classification margin :math:`z_y - \\max_{j \\ne y} z_j` per example, shape (N,).

    Negative exactly when the example is misclassified (ties count as misclassified).
    """
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - others.amax(dim=1)


def is_adversarial(model: nn.Module, x_adv: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Whether each ``x_adv`` fools ``model``: any wrong label, or the ``target`` label if given."""
    with torch.no_grad():
        pred = model(x_adv).argmax(dim=1)
    return pred != y if target is None else pred == target


def adversarial_loss(model: nn.Module, x_adv: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """The per-example loss an attack maximises: CE of the true label, or minus CE of the target."""
    with torch.no_grad():
        logits = model(x_adv)
    return cross_entropy(logits, y) if target is None else -cross_entropy(logits, target)


#: One run of an attack on a batch: ``attack_once(x, y, target) -> x_adv``.
AttackOnce = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def best_of_restarts(
    attack_once: AttackOnce,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Tensor | None,
    restarts: int,
) -> Tensor:
    """Run ``attack_once`` up to ``restarts`` times and keep the best result per example.

    As AutoAttack's ``perturb`` does, each restart runs only on the examples not yet broken.
    An example keeps its first adversarial result; an example never broken keeps the result
    of highest :func:`adversarial_loss` over the restarts.
    """
    best = x.clone()
    best_loss = torch.full((len(x),), float("-inf"), device=x.device, dtype=x.dtype)
    broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        todo = (~broken).nonzero().flatten()
        if len(todo) == 0:
            break
        t = None if target is None else target[todo]
        candidate = attack_once(x[todo], y[todo], t)
        success = is_adversarial(model, candidate, y[todo], t)
        loss = adversarial_loss(model, candidate, y[todo], t)
        better = success | (loss > best_loss[todo])
        best[todo[better]] = candidate[better]
        best_loss[todo[better]] = loss[better]
        broken[todo[success]] = True
    return best
