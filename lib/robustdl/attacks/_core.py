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


def check_inputs(model: object, x: object, y: object) -> None:
    """Clear errors for the arguments every attack takes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module returning logits, got {type(model).__name__}")
    check_images(x)
    check_labels(y, x)  # type: ignore[arg-type]


def input_gradient(model: nn.Module, x: Tensor, y: Tensor, loss: Loss = cross_entropy) -> Tensor:
    """The gradient :math:`\\nabla_x \\sum_i J(\\theta, x_i, y_i)` of the per-example loss.

    Only the input's gradient is computed (``torch.autograd.grad``), so no ``.grad`` is left
    on the model's parameters.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"model must return a logits tensor, got {type(logits).__name__}; wrap a model that "
                "returns a dict or tuple in a module that returns the logits"
            )
        (grad,) = torch.autograd.grad(loss(logits, y).sum(), x)
    return grad
