"""Shared fixtures: tiny deterministic models and data, no network."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("ROBUSTDL_PROGRESS", "0")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def linear_model() -> nn.Module:
    """A 3-class linear model on 2x2 single-channel images with known weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, -1.0, 0.5, 0.0], [-1.0, 1.0, 0.0, 0.5], [0.0, 0.0, -1.0, 1.0]]))
        model[1].bias.zero_()
    return model.eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(8, 1, 2, 2, generator=torch.Generator().manual_seed(1))
