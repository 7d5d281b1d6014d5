"""What attacks, training and verification share about a model: eval mode, logits, predictions.

A model is any ``nn.Module`` that takes images in [0, 1] and returns logits (DESIGN.md,
"Conventions"). :func:`predict` and :func:`accuracy` are public (``robustdl.predict``,
``robustdl.accuracy``); the rest are the checks every room of the library uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from robustdl._checks import check_images, check_labels, check_positive_int

__all__ = ["accuracy", "predict"]


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


def logits_of(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)``, checked to be a logits tensor."""
    logits = model(x)
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"model must return a logits tensor, got {type(logits).__name__}; wrap a model that "
            "returns a dict or tuple in a module that returns the logits"
        )
    return logits


def batched_logits(model: nn.Module, x: Tensor, batch_size: int | None = None) -> Tensor:
    """The logits :math:`z(x)` of every example, shape (N, C): in eval mode, without gradients.

    ``x`` goes through the model in one pass, or in chunks of ``batch_size``, each moved to the
    model's device (floating inputs to its parameters' dtype), so a CUDA model takes CPU
    tensors; the logits are on the model's device. The model's train/eval mode is restored.
    """
    check_model(model)
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError(f"x must be a tensor with a batch dimension, got {type(x).__name__}")
    chunks = [x] if batch_size is None else x.split(check_positive_int(batch_size, "batch_size"))
    param = next(iter(model.parameters()), None)
    with eval_mode(model), torch.no_grad():
        return torch.cat([logits_of(model, _like(chunk, param)) for chunk in chunks])


def _like(x: Tensor, param: Tensor | None) -> Tensor:
    """``x`` on ``param``'s device, floating inputs in its dtype (unchanged without a parameter)."""
    if param is None:
        return x
    dtype = param.dtype if x.is_floating_point() and param.is_floating_point() else x.dtype
    return x.to(param.device, dtype)


def predict(model: nn.Module, x: Tensor, batch_size: int | None = None) -> Tensor:
    r"""The predicted labels :math:`\hat y_i = \arg\max_j z_j(x_i)`, shape (N,), on the model's device.

    Computed by :func:`batched_logits`: in eval mode (restored after), without gradients, in
    one pass or in chunks of ``batch_size`` (for large ``x``). Ties go to the first largest
    logit, as ``torch.argmax``'s.
    """
    return batched_logits(model, x, batch_size).argmax(dim=1)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int | None = None) -> float:
    r"""The fraction of examples classified as labelled, :math:`\frac1N \sum_i \mathbb 1\{\hat y_i = y_i\}`.

    ``x`` (N, ...) and labels ``y`` (N,) on any device; predictions by :func:`predict`. The
    count is divided exactly (as :func:`~robustdl.train.evaluate` does), not averaged in the
    model's dtype.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_labels(y, x)
    if len(y) == 0:
        raise ValueError("x must hold at least one example, got none")
    pred = predict(model, x, batch_size)
    return (pred == y.to(pred.device)).sum().item() / len(y)
