"""Datasets as tensors of images in [0, 1], and loaders over them.

* MNIST, Fashion-MNIST (through torchvision) and CIFAR-10 (the ``cifar-10-batches-py``
  layout, read by a small reader that accepts plain or ``.xz`` pickles) live under
  ``$ROBUSTDL_DATA`` (default ``./data``); they are downloaded when missing and online.
* sklearn's 8x8 digits, always available offline.
* Two 2-D synthetic sets for pictures of decision regions: :func:`two_moons` and
  :func:`gaussian_clusters`, scaled into the unit square so every threat model applies.

Every dataset is a :class:`~torch.utils.data.TensorDataset` of ``(x, y)`` with ``x`` float in
[0, 1], shape (N, C, H, W) for images and (N, 2) for points, and ``y`` int64 labels.
"""

from __future__ import annotations

import functools
import lzma
import math
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from robustdl._random import integers, uniform

__all__ = [
    "CLASS_NAMES",
    "DATASETS",
    "class_names",
    "data_root",
    "gaussian_clusters",
    "load_dataset",
    "loader",
    "random_crop_flip",
    "two_moons",
]

DATASETS = ("mnist", "fashion_mnist", "cifar10", "digits")
SPLITS = ("train", "test")

CLASS_NAMES: dict[str, list[str]] = {
    "mnist": [str(i) for i in range(10)],
    "digits": [str(i) for i in range(10)],
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer",
                "dog", "frog", "horse", "ship", "truck"],
}

_EXPECTED_FILES = {
    "mnist": "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz",
    "fashion_mnist": "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz",
    "cifar10": "cifar-10-batches-py/{data_batch_1..5,test_batch} (plain or .xz pickles)",
}


class DataUnavailableError(FileNotFoundError):
    """A dataset is neither on disk nor downloadable (e.g. offline)."""


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data folder: ``root`` if given, else ``$ROBUSTDL_DATA``, else ``./data``."""
    return Path(root if root is not None else os.environ.get("ROBUSTDL_DATA", "data"))


def class_names(name: str) -> list[str]:
    """The class names of dataset ``name``, index = label."""
    _check_name(name)
    return CLASS_NAMES[name]


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"dataset name must be one of {list(DATASETS)}, got {name!r}")


def _unavailable(name: str, root: Path, reason: str) -> DataUnavailableError:
    return DataUnavailableError(
        f"dataset {name!r} is not under {root.resolve()} and could not be downloaded ({reason}). "
        f"Put its files at {root / _EXPECTED_FILES[name]}, or point ROBUSTDL_DATA at a folder "
        "that has them (the folder must be writable: torchvision extracts archives beside them)."
    )


def _torchvision_images(name: str, train: bool, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[name]
    try:
        ds = cls(str(root), train=train, download=download)
    except (RuntimeError, OSError) as err:
        raise _unavailable(name, root, str(err).splitlines()[0] if str(err) else type(err).__name__) from err
    return ds.data.unsqueeze(1), ds.targets


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch (plain or ``.xz``): uint8 images (N, 3, 32, 32), labels (N,)."""
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return images, np.asarray(batch[b"labels"], dtype=np.int64)


def _cifar_images(
    train: bool, root: Path, download: bool, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's images and labels; with ``limit``, only the batches that hold its first ``limit`` images."""
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]

    def find(stem: str) -> Path | None:
        return next((p for p in (folder / stem, folder / f"{stem}.xz") if p.exists()), None)

    if any(find(n) is None for n in names):
        if not download:
            raise _unavailable("cifar10", root, "download=False")
        from torchvision import datasets

        try:
            datasets.CIFAR10(str(root), train=train, download=True)
        except (RuntimeError, OSError) as err:
            raise _unavailable("cifar10", root, type(err).__name__) from err
    parts = []
    for n in names:  # each training batch holds 10000 images, and an xz batch takes seconds to read
        parts.append(_read_cifar_batch(find(n)))  # type: ignore[arg-type]
        if limit is not None and sum(len(p[1]) for p in parts) >= limit:
            break
    images = np.concatenate([p[0] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(np.concatenate([p[1] for p in parts]))


def _digits_images(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 1797 8x8 digits: the first 1500 for training, the last 297 for testing."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16).unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    part = slice(0, 1500) if train else slice(1500, None)
    return images[part], labels[part]


@functools.lru_cache(maxsize=8)
def _load_tensors(name: str, split: str, root: Path, download: bool,
                  limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    train = split == "train"
    if name == "digits":
        return _digits_images(train)
    if name == "cifar10":
        images, labels = _cifar_images(train, root, download, limit)
    else:
        images, labels = _torchvision_images(name, train, root, download)
    return images.float().div(255), labels.long()


def load_dataset(
    name: str,
    split: str = "test",
    subset: int | None = None,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> TensorDataset:
    """Load ``split`` ("train" or "test") of dataset ``name`` as images in [0, 1].

    Args:
        name: one of :data:`DATASETS`.
        split: ``"train"`` or ``"test"``.
        subset: keep only the first ``subset`` examples (deterministic), or all if None.
        root: data folder (default :func:`data_root`).
        download: fetch missing files when online; if False, missing files raise at once.

    Raises:
        DataUnavailableError: the files are missing and cannot be downloaded; the message says
            where to put them.
    """
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1):
        raise ValueError(f"subset must be a positive integer or None, got {subset!r}")
    images, labels = _load_tensors(name, split, data_root(root).resolve(), download, subset)
    return TensorDataset(images[:subset], labels[:subset])


def loader(
    name: str,
    split: str = "test",
    batch_size: int = 128,
    subset: int | None = None,
    shuffle: bool | None = None,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
) -> DataLoader:
    """A :class:`~torch.utils.data.DataLoader` over :func:`load_dataset`.

    Training splits are shuffled by default, with a generator seeded by ``seed`` so that an
    epoch's order is reproducible.
    """
    dataset = load_dataset(name, split, subset=subset, root=root)
    shuffle = split == "train" if shuffle is None else shuffle
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def random_crop_flip(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """The standard CIFAR-10 augmentation of a batch: a random crop of the zero-padded image, and a
    horizontal flip with probability 1/2, drawn per image (He et al. 2016; used by Madry et al. and
    Wong et al.). Pass it to :func:`~robustdl.train.fit` as ``transform``. ``generator`` may lie on
    any device: a seeded CPU generator draws the same crops for ``x`` on the CPU or a GPU.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be a batch of images (N, C, H, W), got shape {tuple(x.shape)}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dy, dx = (integers(0, 2 * padding + 1, (n,), x.device, generator).tolist() for _ in range(2))
    flips = (uniform((n,), x, generator, dtype=torch.float32) < 0.5).tolist()
    crops = [padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)]
    return torch.stack([c.flip(-1) if f else c for c, f in zip(crops, flips, strict=True)])


def _to_unit_square(points: np.ndarray) -> torch.Tensor:
    """Scale 2-D points affinely (one scale for both axes) into [0.05, 0.95]^2."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    scale = 0.9 / float((hi - lo).max())
    centred = (points - (lo + hi) / 2) * scale + 0.5
    return torch.from_numpy(centred).float()


def two_moons(n: int = 500, noise: float = 0.1, seed: int = 0) -> TensorDataset:
    """sklearn's two interleaving half-circles, scaled into the unit square; labels 0/1."""
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=n, noise=noise, random_state=seed)
    return TensorDataset(_to_unit_square(x), torch.from_numpy(y).long())


def gaussian_clusters(n: int = 500, classes: int = 3, std: float = 0.08, seed: int = 0) -> TensorDataset:
    """``classes`` isotropic Gaussian clusters with centres on a circle in the unit square."""
    if classes < 2:
        raise ValueError(f"classes must be >= 2, got {classes}")
    rng = np.random.default_rng(seed)
    angles = 2 * math.pi * np.arange(classes) / classes
    centres = 0.5 + 0.3 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    y = rng.integers(0, classes, size=n)
    x = np.clip(centres[y] + std * rng.standard_normal((n, 2)), 0, 1)
    return TensorDataset(torch.from_numpy(x).float(), torch.from_numpy(y).long())
