"""Datasets: real MNIST/Fashion-MNIST/CIFAR-10 from $ROBUSTDL_DATA, digits, synthetic sets."""

from __future__ import annotations

import os

import pytest
import torch

from robustdl.data import (
    DataUnavailableError,
    class_names,
    data_root,
    gaussian_clusters,
    load_dataset,
    loader,
    two_moons,
)


def _have(path: str) -> bool:
    return (data_root() / path).exists()


def needs(path: str):
    """Skip where the offline data is absent, except in CI, which must have it."""
    return pytest.mark.skipif(not _have(path) and not os.environ.get("CI"), reason=f"no {path} under {data_root()}")


@needs("MNIST/raw/t10k-images-idx3-ubyte.gz")
def test_mnist_test_split():
    ds = load_dataset("mnist", "test")
    x, y = ds.tensors
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() == 0 and x.max() == 1
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # as listed in SOURCES.md


@needs("MNIST/raw/train-images-idx3-ubyte.gz")
def test_mnist_train_subset_and_loader():
    ds = load_dataset("mnist", "train", subset=100)
    assert len(ds) == 100 and ds.tensors[1][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    batches = list(loader("mnist", "train", batch_size=32, subset=100, seed=3))
    assert [len(b[1]) for b in batches] == [32, 32, 32, 4]
    again = list(loader("mnist", "train", batch_size=32, subset=100, seed=3))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))  # reproducible shuffle


@needs("FashionMNIST/raw/t10k-images-idx3-ubyte.gz")
def test_fashion_mnist():
    x, y = load_dataset("fashion_mnist", "test", subset=10).tensors
    assert x.shape == (10, 1, 28, 28) and y.tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert class_names("fashion_mnist")[9] == "Ankle boot"


@needs("cifar-10-batches-py/test_batch")
def test_cifar10_reader():
    x, y = load_dataset("cifar10", "test").tensors
    assert x.shape == (10000, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert torch.bincount(y).tolist() == [1000] * 10


def test_digits_are_always_available():
    x, y = load_dataset("digits", "train").tensors
    assert x.shape == (1500, 1, 8, 8) and x.max() == 1 and set(y.tolist()) == set(range(10))
    assert len(load_dataset("digits", "test")) == 297


def test_missing_data_offline_says_where_to_put_it(tmp_path):
    with pytest.raises(DataUnavailableError, match="MNIST/raw"):
        load_dataset("mnist", root=tmp_path, download=False)
    with pytest.raises(DataUnavailableError, match="cifar-10-batches-py"):
        load_dataset("cifar10", root=tmp_path, download=False)


def test_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ROBUSTDL_DATA", str(tmp_path))
    assert data_root() == tmp_path
    assert data_root("elsewhere").name == "elsewhere"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"name": "imagenet"}, "dataset name"), ({"name": "digits", "split": "val"}, "split"),
     ({"name": "digits", "subset": 0}, "subset"), ({"name": "digits", "subset": 2.5}, "subset")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_dataset(**kwargs)


def test_two_moons_in_unit_square_and_seeded():
    x, y = two_moons(200, seed=1).tensors
    assert x.shape == (200, 2) and 0 <= x.min() and x.max() <= 1 and set(y.tolist()) == {0, 1}
    assert torch.equal(x, two_moons(200, seed=1).tensors[0])
    assert not torch.equal(x, two_moons(200, seed=2).tensors[0])


def test_gaussian_clusters():
    x, y = gaussian_clusters(300, classes=4, seed=0).tensors
    assert x.shape == (300, 2) and set(y.tolist()) == {0, 1, 2, 3}
    centres = torch.stack([x[y == k].mean(0) for k in range(4)])
    assert torch.cdist(centres, centres).add(torch.eye(4)).min() > 0.3  # well separated
    with pytest.raises(ValueError, match="classes"):
        gaussian_clusters(10, classes=1)


def test_random_crop_flip_returns_crops_and_flips_of_each_image():
    from robustdl.data import random_crop_flip

    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    same = random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(1))
    flipped = [torch.equal(a, b.flip(-1)) for a, b in zip(same, x, strict=True)]
    kept = [torch.equal(a, b) for a, b in zip(same, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)
    out = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(2))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):  # every output is a window of the padded image, maybe flipped
        windows = [padded[i, :, r:r + 8, c:c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    with pytest.raises(ValueError, match="padding"):
        random_crop_flip(x, padding=-1)
    with pytest.raises(ValueError, match="batch of images"):
        random_crop_flip(x[0])
