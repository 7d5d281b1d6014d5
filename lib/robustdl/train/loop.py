"""One training loop with pluggable objectives, checkpoints, and evaluation under an attack.

An *objective* is a function ``objective(model, x, y) -> Tensor`` returning the scalar loss
to minimise on a batch; :func:`standard_loss` is empirical risk minimisation. Adversarial
training adds objectives (:mod:`robustdl.train.adversarial`, :mod:`robustdl.train.wrm`,
:mod:`robustdl.train.vat`, ...), never loops: :func:`run_epoch` trains with any of them,
in the spirit of ``epoch_adversarial(loader, model, attack, opt=None)`` of the Kolter--Madry
tutorial :cite:`kolter2018tutorial`.

The same loop runs unchanged under ``torchrun`` with
:class:`~torch.nn.parallel.DistributedDataParallel` (see :mod:`robustdl.train.distributed`):
losses and accuracies are summed over the ranks, and only rank 0 shows progress bars and
writes checkpoints.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from robustdl._checks import check_positive_int
from robustdl._model import eval_mode
from robustdl._progress import progress_bar
from robustdl.train.distributed import all_sum, is_main_process

__all__ = [
    "Attack",
    "Callback",
    "Objective",
    "device",
    "evaluate",
    "fit",
    "load_checkpoint",
    "run_epoch",
    "save_checkpoint",
    "seed_everything",
    "standard_loss",
]

#: A training objective: ``objective(model, x, y) -> scalar loss``.
Objective = Callable[[nn.Module, Tensor, Tensor], Tensor]
#: An attack as :func:`evaluate` uses it: ``attack(model, x, y) -> x_adv``.
Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]
#: Called by :func:`fit` after each epoch with the model and the epoch's record (which it may
#: extend); returns True to stop training.
Callback = Callable[[nn.Module, dict[str, float]], bool]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def device() -> torch.device:
    """The best available device: CUDA, then Apple's MPS, then the CPU.

    ``$ROBUSTDL_DEVICE`` (e.g. ``cpu``, ``cuda``, ``cuda:1``), when set, chooses instead; the chapter
    runner (:mod:`robustdl.runner`) sets it for the chapters it executes.
    """
    chosen = os.environ.get("ROBUSTDL_DEVICE", "").strip()
    if chosen:
        try:
            return torch.device(chosen)
        except RuntimeError as error:
            raise ValueError(f"$ROBUSTDL_DEVICE must name a torch device (cpu, cuda, ...), got {chosen!r}") from error
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def standard_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    r"""Empirical risk: the mean cross-entropy :math:`\frac1N\sum_i J(\theta, x_i, y_i)`."""
    return F.cross_entropy(model(x), y)


def _to_model(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """A batch on the model's device, floating inputs cast to its parameters' dtype (a float64
    model takes a float32 loader's batches; a CUDA model a CPU loader's)."""
    param = next(iter(model.parameters()), torch.empty(0))
    dtype = param.dtype if x.is_floating_point() and param.is_floating_point() else x.dtype
    return x.to(param.device, dtype), y.to(param.device)


def run_epoch(
    model: nn.Module,
    loader: DataLoader,
    objective: Objective = standard_loss,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    progress: bool | None = None,
    desc: str = "train",
    replays: int = 1,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> float:
    """One pass over ``loader`` minimising ``objective``; returns the mean loss (over all ranks).

    The model is in train mode during the pass. ``transform`` (if any) maps each batch of
    inputs first, e.g. :func:`~robustdl.data.random_crop_flip`. Each batch is used ``replays`` times in a row,
    one optimiser step each: the minibatch replay of free adversarial training
    :cite:`shafahi2019free` (:class:`~robustdl.train.adversarial.FreeAT`). ``scheduler`` (if
    any) steps once per optimiser step.
    """
    if optimizer is None:
        raise ValueError("optimizer must be given to train; use evaluate() to measure a model")
    replays = check_positive_int(replays, "replays")
    model.train()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for x, y in progress_bar(loader, progress if is_main_process() else False, desc=desc):
        x, y = _to_model(model, x, y)
        if transform is not None:
            x = transform(x)
        for _ in range(replays):
            loss = objective(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += loss.detach().double().cpu() * len(y)
            count += len(y)
    total, count = all_sum(total.item(), count)
    return total / max(count, 1)


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (rank 0 only under torchrun)."""
    if not is_main_process():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain values only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _stateful(things: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in things.items() if v is not None and hasattr(v, "state_dict")}


def _loader_generator(loader: DataLoader) -> torch.Generator | None:
    sampler = getattr(loader, "sampler", None)
    return getattr(sampler, "generator", None) or getattr(loader, "generator", None)


def _training_state(
    parts: dict[str, Any], epoch: int, history: list[dict[str, float]], loader: DataLoader
) -> dict[str, Any]:
    generator = _loader_generator(loader)
    return {
        "epoch": epoch,
        "history": history,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "loader_rng": None if generator is None else generator.get_state(),
        **{name: part.state_dict() for name, part in _stateful(parts).items()},
    }


def _restore(state: dict[str, Any], parts: dict[str, Any], loader: DataLoader) -> tuple[int, list[dict[str, float]]]:
    for name, part in _stateful(parts).items():
        if name not in state:
            raise ValueError(f"checkpoint has no state for {name!r}; it was written by a different run")
        part.load_state_dict(state[name])
    torch.set_rng_state(state["torch_rng"])
    cuda_rng = state.get("cuda_rng")  # random starts on a GPU draw from its generator
    if cuda_rng is not None and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_rng)
    generator = _loader_generator(loader)
    if generator is not None and state["loader_rng"] is not None:
        generator.set_state(state["loader_rng"])
    return state["epoch"], state["history"]


def fit(
    model: nn.Module,
    loader: DataLoader,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    objective: Objective = standard_loss,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    test_loader: DataLoader | None = None,
    progress: bool | None = None,
    replays: int = 1,
    callbacks: Sequence[Callback] = (),
    checkpoint: str | os.PathLike[str] | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> list[dict[str, float]]:
    """Train for ``epochs`` epochs; returns one record per epoch (train loss, its training time in
    seconds, test metrics).

    Args:
        model: the network, plain or wrapped in DistributedDataParallel.
        loader: the training data; a :class:`~torch.utils.data.DistributedSampler` in it gets
            ``set_epoch`` before each epoch.
        epochs: the number of passes over ``loader``.
        optimizer: the optimiser of the model's parameters.
        objective: ``objective(model, x, y) -> loss``; a stateful objective (one with
            ``state_dict``, e.g. :class:`~robustdl.train.adversarial.FreeAT`) is checkpointed
            with the model.
        scheduler: stepped once per optimiser step.
        test_loader: if given, clean test accuracy and loss are recorded after each epoch.
        progress: show progress bars (default: on unless ``$ROBUSTDL_PROGRESS=0``).
        replays: minibatch replays (:func:`run_epoch`).
        callbacks: called after each epoch (:data:`Callback`); one returning True stops training,
            e.g. :class:`~robustdl.train.adversarial.CatastrophicOverfittingGuard`.
        transform: applied to each training batch of inputs (:func:`run_epoch`), e.g. data
            augmentation.
        checkpoint: a file written after every epoch (model, optimiser, scheduler, objective, the
            random states and the history). If it exists when ``fit`` starts, training resumes
            after its epoch and reproduces the uninterrupted run.
    """
    epochs = check_positive_int(epochs, "epochs")
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "objective": objective}
    start, history = 0, []
    if checkpoint is not None and Path(checkpoint).exists():
        start, history = _restore(load_checkpoint(checkpoint), parts, loader)
    for epoch in range(start + 1, epochs + 1):
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)
        start_time = time.perf_counter()
        record: dict[str, float] = {"epoch": epoch, "train_loss": run_epoch(
            model, loader, objective, optimizer, scheduler, progress, f"epoch {epoch}/{epochs}", replays, transform)}
        record["seconds"] = time.perf_counter() - start_time
        if test_loader is not None:
            record |= {f"test_{k}": v for k, v in evaluate(model, test_loader, progress=progress).items()}
        stop = any([callback(model, record) for callback in callbacks])
        history.append(record)
        if checkpoint is not None:
            save_checkpoint(checkpoint, _training_state(parts, epoch, history, loader))
        if stop:
            break
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
    restored afterwards. Each batch moves to the model's device (and floating inputs to its
    dtype) first, so a CUDA model takes a CPU loader. Under torchrun the counts are summed over
    the ranks.
    """
    correct, loss, count = 0, 0.0, 0
    with eval_mode(model):
        for x, y in progress_bar(loader, progress if is_main_process() else False, desc="evaluate"):
            x, y = _to_model(model, x, y)
            if attack is not None:
                x = attack(model, x, y)
            with torch.no_grad():
                logits = model(x)
            correct += (logits.argmax(dim=1) == y).sum().item()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            count += len(y)
    correct, loss, count = all_sum(correct, loss, count)
    if count == 0:
        raise ValueError("loader must yield at least one example, got an empty loader")
    return {"accuracy": correct / count, "loss": loss / count}
