"""Running the one training loop on several processes with PyTorch's own launcher.

Launch a script with ``torchrun --nproc_per_node=K script.py``; in it::

    from robustdl.train import distributed, fit
    distributed.setup()                                  # reads torchrun's environment
    model = distributed.wrap(model)                      # DistributedDataParallel
    train_loader = distributed.loader(dataset, batch_size=128)   # a DistributedSampler
    fit(model, train_loader, epochs, optimizer, objective, checkpoint="run.pt")
    distributed.cleanup()

:func:`~robustdl.train.loop.fit` needs no change: it calls the sampler's ``set_epoch``, sums
losses and counts over the ranks (:func:`all_sum`), and only rank 0 shows progress bars and
writes checkpoints (:func:`is_main_process`). Objectives craft their adversarial examples on
the unwrapped module (:func:`unwrap`), so the inner maximisation never triggers DDP's gradient
synchronisation; the training loss goes through the wrapper and its gradient is averaged.
Without torchrun every function here is the identity of a single process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["all_sum", "cleanup", "is_distributed", "is_main_process", "loader", "rank", "setup", "unwrap", "wrap"]


def is_distributed() -> bool:
    """Whether a process group is running (under torchrun after :func:`setup`)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """Whether this process logs and writes files: rank 0."""
    return rank() == 0


def setup(backend: str | None = None) -> None:
    """Join the process group torchrun describes in the environment (``RANK``, ``WORLD_SIZE``...).

    ``backend`` defaults to NCCL on CUDA and gloo on the CPU; on CUDA each process takes the
    GPU of its ``LOCAL_RANK``.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("setup() needs torchrun's environment (RANK, WORLD_SIZE); launch the "
                           "script with `torchrun --nproc_per_node=K script.py`")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)


def cleanup() -> None:
    """Leave the process group, if any."""
    if is_distributed():
        dist.destroy_process_group()


def wrap(model: nn.Module) -> nn.Module:
    """``model`` in DistributedDataParallel when a process group runs, else ``model`` itself."""
    if not is_distributed():
        return model
    device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def loader(dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0) -> DataLoader:
    """A loader over this rank's share of ``dataset``: ``batch_size`` examples per rank and step.

    With K ranks one optimiser step sees ``K * batch_size`` examples, as a single process with
    batches of that size would. Without a process group it is a plain seeded loader.
    """
    if not is_distributed():
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_size=batch_size, sampler=DistributedSampler(dataset, shuffle=shuffle, seed=seed))


def all_sum(*values: float) -> tuple[float, ...]:
    """Each value summed over the ranks (unchanged without a process group)."""
    if not is_distributed():
        return values
    on = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces CUDA tensors only
    t = torch.tensor(values, dtype=torch.float64, device=on)
    dist.all_reduce(t)
    return tuple(t.tolist())
