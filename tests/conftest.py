"""Shared fixtures: tiny deterministic models and data, no network."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from torch import nn

from robustdl.data import data_root, load_dataset

os.environ.setdefault("ROBUSTDL_PROGRESS", "0")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

#: MNIST is missing offline; CI must have it (a missing copy fails there instead of skipping).
NO_MNIST = not (data_root() / "MNIST/raw/t10k-images-idx3-ubyte.gz").exists() and not os.environ.get("CI")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mnist: needs MNIST offline (skipped without it, except in CI)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if NO_MNIST and item.get_closest_marker("mnist"):
            item.add_marker(pytest.mark.skip(reason="no offline MNIST"))


@pytest.fixture(scope="session")
def seeded() -> Callable[..., torch.Generator]:
    """``seeded(seed=0)``: a fresh CPU generator with that seed."""
    return lambda seed=0: torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def mnist() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``mnist(n=None, split="test")``: the first ``n`` images and labels of an MNIST split (all if None).

    Skips the test when MNIST is not offline, except in CI.
    """
    if NO_MNIST:
        pytest.skip("no offline MNIST")
    return lambda n=None, split="test": tuple(load_dataset("mnist", split, subset=n).tensors)


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
