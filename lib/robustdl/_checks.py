"""Argument checks shared by the library: clear errors that name the argument."""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Tolerance for values just outside [0, 1] produced by float arithmetic.
BOX_ATOL = 1e-6


def check_images(x: object, name: str = "x") -> Tensor:
    """Check that ``x`` is a floating tensor of images in [0, 1] with a batch dimension."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor with values in [0, 1], got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have a batch dimension, shape (N, ...), got shape {tuple(x.shape)}")
    if x.numel() and (x.min() < -BOX_ATOL or x.max() > 1 + BOX_ATOL or not torch.isfinite(x).all()):
        raise ValueError(
            f"{name} must lie in [0, 1] (models normalise inside), got values in "
            f"[{x.min().item():.4g}, {x.max().item():.4g}]"
        )
    return x


def check_labels(y: object, x: Tensor, name: str = "y") -> Tensor:
    """Check that ``y`` holds one integer class label per example of ``x``."""
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    if y.shape != x.shape[:1]:
        raise ValueError(f"{name} must have shape ({x.shape[0]},), one label per example, got {tuple(y.shape)}")
    return y


def check_nonnegative(value: object, name: str) -> float:
    """Check that ``value`` is a finite real number >= 0 and return it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def check_positive(value: object, name: str, why: str) -> float:
    """Check that ``value`` is a finite real number > 0; ``why`` says what a value <= 0 would break."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
        raise ValueError(f"{name} must be > 0 ({why}), got {value}")
    return check_nonnegative(value, name)


def check_positive_int(value: object, name: str) -> int:
    """Check that ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_fraction(value: object, name: str) -> float:
    """Check that ``value`` is a real number in [0, 1]."""
    value = check_nonnegative(value, name)
    if value > 1:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value
