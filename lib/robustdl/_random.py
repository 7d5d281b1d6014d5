"""Random numbers for tensors on any device, reproducible from one seeded generator.

A :class:`torch.Generator` draws only on its own device: ``torch.rand(..., generator=g,
device="cuda")`` fails for a CPU generator. Every random draw of the library goes through this
module, which

* draws on the generator's device (on the input's device, from PyTorch's global generator for
  that device, when no generator is given),
* draws floating-point numbers in :data:`DRAW_DTYPE` whatever the input's dtype,
* then moves and casts them to the input's device and dtype.

So a seeded CPU generator gives the same numbers whether the input lies on the CPU or a GPU and
whether it is float32 or float64 (float64 inputs get float32 draws, exactly representable;
for a random start or a Monte Carlo sample 24 bits are plenty). On the CPU in float32 the
numbers are those of a plain ``torch.rand(..., generator=g)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DRAW_DTYPE", "integers", "normal", "permutation", "uniform"]

#: The dtype every floating-point draw is made in, before the cast to the input's dtype.
DRAW_DTYPE = torch.float32

Shape = tuple[int, ...]


def _device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    """Where to draw: on the generator's device, or on ``fallback`` without a generator."""
    return fallback if generator is None else generator.device


def uniform(shape: Shape, like: Tensor, generator: torch.Generator | None = None,
            dtype: torch.dtype | None = None) -> Tensor:
    """Numbers uniform on [0, 1), of ``shape``, on ``like``'s device, of ``dtype`` (default ``like``'s).

    Rounding a float32 draw to a shorter float (half, bfloat16) could reach 1; such values are
    clamped to the largest number below 1, so the interval stays half-open.
    """
    dtype = like.dtype if dtype is None else dtype
    u = torch.rand(shape, generator=generator, device=_device(generator, like.device), dtype=DRAW_DTYPE)
    u = u.to(device=like.device, dtype=dtype)
    if torch.finfo(dtype).eps > torch.finfo(DRAW_DTYPE).eps:
        u = u.clamp_max(1 - torch.finfo(dtype).eps / 2)
    return u


def normal(shape: Shape, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal numbers of ``shape`` on ``like``'s device and of its dtype."""
    z = torch.randn(shape, generator=generator, device=_device(generator, like.device), dtype=DRAW_DTYPE)
    return z.to(device=like.device, dtype=like.dtype)


def integers(low: int, high: int, shape: Shape, device: torch.device,
             generator: torch.Generator | None = None) -> Tensor:
    """Integers uniform in [``low``, ``high``), int64, of ``shape``, on ``device``."""
    k = torch.randint(low, high, shape, generator=generator, device=_device(generator, device))
    return k.to(device)


def permutation(n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random permutation of ``0 .. n-1``, int64, on ``device``."""
    return torch.randperm(n, generator=generator, device=_device(generator, device)).to(device)
