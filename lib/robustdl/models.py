"""Small networks for the course, each carrying its input normalisation.

Every model takes images in [0, 1] and normalises inside (a :class:`Normalize` first layer),
so attacks and threat models work in pixel space and never need a dataset's mean and std.

* :class:`MLP` -- a fully connected ReLU network;
* :class:`SmallCNN` -- the MNIST network of Madry et al. (2018): two 5x5 convolutions
  (32 and 64 channels) with 2x2 max-pooling, a 1024-unit hidden layer;
* :class:`LeNet` -- the LeNet-5-style network of LeCun et al. (1998);
* :class:`ConvSmall` -- the small CNN of Wong and Kolter (2018): two strided 4x4 convolutions
  (16 and 32 channels), a 100-unit hidden layer; no pooling, so the verifiers bound it layer
  by layer. The robust MNIST models of the zoo use it;
* :class:`ConvLarge` -- the large CNN of Wong et al. (2018): four convolutions (32, 32, 64, 64
  channels; the second and fourth of stride 2) and two 512-unit hidden layers; like ConvSmall it
  has only convolutions, ReLUs and linear layers, so the verifiers bound it. The CIFAR-10 models
  of the zoo use it;
* :class:`PreActResNet18` -- the pre-activation ResNet-18 of He et al. (2016), the CIFAR-10
  workhorse of adversarial training.

:func:`build_model` makes any of them for a dataset by name.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "DATASET_SHAPES",
    "MLP",
    "MODELS",
    "ConvLarge",
    "ConvSmall",
    "LeNet",
    "Normalize",
    "PreActResNet18",
    "SmallCNN",
    "build_model",
]

#: (channels, height, width, classes, mean, std) of each dataset the library knows.
DATASET_SHAPES: dict[str, tuple[int, int, int, int, tuple[float, ...], tuple[float, ...]]] = {
    "mnist": (1, 28, 28, 10, (0.1307,), (0.3081,)),
    "fashion_mnist": (1, 28, 28, 10, (0.2860,), (0.3530,)),
    "cifar10": (3, 32, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "digits": (1, 8, 8, 10, (0.3053,), (0.3760,)),
    "points": (1, 1, 2, 2, (0.5,), (0.25,)),  # the 2-D synthetic sets of robustdl.data
}


class Normalize(nn.Module):
    """Per-channel standardisation ``(x - mean) / std`` as the model's first layer."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have one value per channel, got {len(mean)} and {len(std)}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:  # points (N, features), e.g. the 2-D synthetic sets: one channel
            return (x - self.mean.view(1, -1)) / self.std.view(1, -1)
        return (x - self.mean) / self.std


class MLP(nn.Module):
    """A fully connected ReLU network ``in -> hidden... -> classes`` on flattened inputs."""

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (256, 256),
        classes: int = 10,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
    ) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        layers: list[nn.Module] = [Normalize(mean, std), nn.Flatten()]
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """The MNIST CNN of Madry et al. (2018), :cite:`madry2018towards`.

    conv 5x5 (32) - ReLU - maxpool 2 - conv 5x5 (64) - ReLU - maxpool 2 - FC 1024 - ReLU - FC.
    """

    def __init__(
        self,
        in_channels: int = 1,
        classes: int = 10,
        image_size: int = 28,
        mean: Sequence[float] = (0.1307,),
        std: Sequence[float] = (0.3081,),
    ) -> None:
        super().__init__()
        side = image_size // 4
        self.net = nn.Sequential(
            Normalize(mean, std),
            nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * side * side, 1024), nn.ReLU(),
            nn.Linear(1024, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class LeNet(nn.Module):
    """A LeNet-5-style CNN, :cite:`lecun1998gradient`, with ReLU and max-pooling.

    conv 5x5 (6) - pool - conv 5x5 (16) - pool - FC 120 - FC 84 - FC.
    """

    def __init__(
        self,
        in_channels: int = 1,
        classes: int = 10,
        image_size: int = 28,
        mean: Sequence[float] = (0.1307,),
        std: Sequence[float] = (0.3081,),
    ) -> None:
        super().__init__()
        if image_size < 12:
            raise ValueError(f"LeNet needs images of at least 12x12 pixels, got image_size={image_size}")
        side = (image_size // 2 - 4) // 2  # conv1 keeps the size (padding 2), conv2 takes 4
        self.net = nn.Sequential(
            Normalize(mean, std),
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * side * side, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvSmall(nn.Module):
    """The small CNN of Wong and Kolter (2018), :cite:`wong2018provable`, also used by Wong et al. (2020).

    conv 4x4 stride 2 (16) - ReLU - conv 4x4 stride 2 (32) - ReLU - FC 100 - ReLU - FC.
    Linear, convolution and ReLU layers only, so bound propagation covers it exactly.
    ``channels`` and ``hidden`` widen or deepen it (one stride-2 convolution per entry of
    ``channels``), as the measures grid of Part III does.
    """

    def __init__(
        self,
        in_channels: int = 1,
        classes: int = 10,
        image_size: int = 28,
        mean: Sequence[float] = (0.1307,),
        std: Sequence[float] = (0.3081,),
        channels: Sequence[int] = (16, 32),
        hidden: int = 100,
    ) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"ConvSmall needs an image side divisible by 4, got image_size={image_size}")
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty sequence of positive ints, got {tuple(channels)}")
        layers: list[nn.Module] = [Normalize(mean, std)]
        side = image_size
        for a, b in itertools.pairwise([in_channels, *channels]):
            layers += [nn.Conv2d(a, b, 4, stride=2, padding=1), nn.ReLU()]
            side //= 2
        if side < 1:
            raise ValueError(f"{len(channels)} stride-2 convolutions leave nothing of a {image_size}-pixel image")
        layers += [nn.Flatten(), nn.Linear(channels[-1] * side * side, hidden), nn.ReLU(), nn.Linear(hidden, classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvLarge(nn.Module):
    """The large CNN of Wong et al. (2018), :cite:`wong2018scaling`.

    conv 3x3 (32) - ReLU - conv 4x4 stride 2 (32) - ReLU - conv 3x3 (64) - ReLU -
    conv 4x4 stride 2 (64) - ReLU - FC 512 - ReLU - FC 512 - ReLU - FC. No pooling or batch
    normalisation, so bound propagation covers it layer by layer.
    """

    def __init__(
        self,
        in_channels: int = 3,
        classes: int = 10,
        image_size: int = 32,
        mean: Sequence[float] = (0.4914, 0.4822, 0.4465),
        std: Sequence[float] = (0.2470, 0.2435, 0.2616),
    ) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"ConvLarge needs an image side divisible by 4, got image_size={image_size}")
        side = image_size // 4
        self.net = nn.Sequential(
            Normalize(mean, std),
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 4, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * side * side, 512), nn.ReLU(),
            nn.Linear(512, 512), nn.ReLU(),
            nn.Linear(512, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class PreActBlock(nn.Module):
    """A pre-activation residual block: BN-ReLU-conv-BN-ReLU-conv plus the shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 of He et al. (2016), :cite:`he2016identity`, for 32x32 images."""

    def __init__(
        self,
        in_channels: int = 3,
        classes: int = 10,
        mean: Sequence[float] = (0.4914, 0.4822, 0.4465),
        std: Sequence[float] = (0.2470, 0.2435, 0.2616),
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        blocks: list[nn.Module] = []
        in_planes = 64
        for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)]
            in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(self.conv1(self.normalize(x)))
        out = torch.relu(self.bn(out))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


MODELS = {"mlp": MLP, "smallcnn": SmallCNN, "lenet": LeNet, "convsmall": ConvSmall, "convlarge": ConvLarge,
          "preact_resnet18": PreActResNet18}


def build_model(name: str, dataset: str = "mnist", **kwargs: object) -> nn.Module:
    """Build the model ``name`` (a key of :data:`MODELS`) sized and normalised for ``dataset``.

    Extra keyword arguments go to the model's constructor (e.g. ``hidden=(100,)`` for the MLP).
    """
    if name not in MODELS:
        raise ValueError(f"model name must be one of {sorted(MODELS)}, got {name!r}")
    if dataset not in DATASET_SHAPES:
        raise ValueError(f"dataset must be one of {sorted(DATASET_SHAPES)}, got {dataset!r}")
    channels, height, width, classes, mean, std = DATASET_SHAPES[dataset]
    if name == "mlp":
        args = {"in_features": channels * height * width}
    elif name == "preact_resnet18":
        args = {"in_channels": channels}
    else:
        args = {"in_channels": channels, "image_size": height}
    return MODELS[name](**{"classes": classes, "mean": mean, "std": std, **args, **kwargs})
