"""One training loop with pluggable objectives, and evaluation under an optional attack.

An *objective* is a function ``objective(model, x, y) -> Tensor`` returning the scalar loss
to minimise on a batch; :func:`standard_loss` is empirical risk minimisation. Adversarial
training (a later chapter) adds objectives, never loops: :func:`run_epoch` trains with any of
them, in the spirit of ``epoch_adversarial(loader, model, attack, opt=None)`` of the
Kolter--Madry tutorial :cite:`kolter2018tutorial`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from robustdl._progress import progress_bar
from robustdl.attacks._core import eval_mode

__all__ = ["Objective", "device", "evaluate", "fit", "run_epoch", "seed_everything", "standard_loss"]

#: A training objective: ``objective(model, x, y) -> scalar loss``.
Objective = Callable[[nn.Module, Tensor, Tensor], Tensor]
#: An attack as :func:`evaluate` uses it: ``attack(model, x, y) -> x_adv``.
Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def device() -> torch.device:
    """The best available device: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def standard_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    r"""Empirical risk: the mean cross-entropy :math:`\frac1N\sum_i J(\theta, x_i, y_i)`."""
    return F.cross_entropy(model(x), y)


def _model_device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def run_epoch(
    model: nn.Module,
    loader: DataLoader,
    objective: Objective = standard_loss,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    progress: bool | None = None,
    desc: str = "train",
) -> float:
    """One pass over ``loader`` minimising ``objective``; returns the mean loss.

    The model is in train mode during the pass. ``scheduler`` (if any) steps once per batch.
    """
    if optimizer is None:
        raise ValueError("optimizer must be given to train; use evaluate() to measure a model")
    dev = _model_device(model)
    model.train()
    total, count = 0.0, 0
    for x, y in progress_bar(loader, progress, desc=desc):
        x, y = x.to(dev), y.to(dev)
        loss = objective(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.item() * len(y)
        count += len(y)
    return total / max(count, 1)


def fit(
    model: nn.Module,
    loader: DataLoader,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    objective: Objective = standard_loss,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    test_loader: DataLoader | None = None,
    progress: bool | None = None,
) -> list[dict[str, float]]:
    """Train for ``epochs`` epochs; returns one record per epoch (train loss, test metrics)."""
    history = []
    for epoch in range(1, epochs + 1):
        record = {"epoch": epoch, "train_loss": run_epoch(
            model, loader, objective, optimizer, scheduler, progress, desc=f"epoch {epoch}/{epochs}")}
        if test_loader is not None:
            record |= {f"test_{k}": v for k, v in evaluate(model, test_loader, progress=progress).items()}
        history.append(record)
    model.eval()
    return history


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    attack: Attack | None = None,
    progress: bool | None = None,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``loader``, under ``attack`` if given.

    ``attack(model, x, y) -> x_adv`` is applied to each batch first, e.g.
    ``functools.partial(fgsm, eps=0.1)``. The model is evaluated in eval mode and its mode is
    restored afterwards.
    """
    dev = _model_device(model)
    correct, loss, count = 0, 0.0, 0
    with eval_mode(model):
        for x, y in progress_bar(loader, progress, desc="evaluate"):
            x, y = x.to(dev), y.to(dev)
            if attack is not None:
                x = attack(model, x, y)
            with torch.no_grad():
                logits = model(x)
            correct += (logits.argmax(dim=1) == y).sum().item()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            count += len(y)
    if count == 0:
        raise ValueError("loader must yield at least one example, got an empty loader")
    return {"accuracy": correct / count, "loss": loss / count}
