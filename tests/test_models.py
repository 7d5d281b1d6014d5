"""Models: shapes, the Normalize layer, parameter counts of the published architectures."""

from __future__ import annotations

import pytest
import torch

from robustdl.models import DATASET_SHAPES, MODELS, Normalize, build_model


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist", "digits", "cifar10"])
@pytest.mark.parametrize("name", ["mlp", "smallcnn", "lenet", "convsmall"])
def test_output_shape(name, dataset):
    if (name, dataset) == ("lenet", "digits"):
        with pytest.raises(ValueError, match="at least 12x12"):
            build_model(name, dataset)
        return
    c, h, w, k, _, _ = DATASET_SHAPES[dataset]
    model = build_model(name, dataset).eval()
    assert model(torch.rand(3, c, h, w)).shape == (3, k)


def test_preact_resnet18_on_cifar10():
    model = build_model("preact_resnet18", "cifar10").eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    # PreAct-ResNet-18 with the final BN-ReLU of He et al. (2016), as in the code of Wong et al. (2020).
    assert sum(p.numel() for p in model.parameters()) == 11_172_170


def test_smallcnn_is_madrys_architecture():
    model = build_model("smallcnn", "mnist")
    # conv 5x5x32, conv 5x5x64, FC 3136->1024, FC 1024->10, with biases.
    assert sum(p.numel() for p in model.parameters()) == 832 + 51_264 + 3_212_288 + 10_250


def test_convsmall_is_wong_and_kolters_small_network():
    model = build_model("convsmall", "mnist")
    # conv 4x4x16 stride 2, conv 4x4x32 stride 2, FC 1568->100, FC 100->10, with biases.
    assert sum(p.numel() for p in model.parameters()) == 272 + 8_224 + 156_900 + 1_010
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    with pytest.raises(ValueError, match="divisible by 4"):
        build_model("convsmall", "mnist", image_size=30)


@pytest.mark.parametrize(("channels", "hidden"), [((8,), 32), ((8, 16, 32), 64), ((32, 64), 256)])
def test_convsmall_widens_and_deepens(channels, hidden):
    model = build_model("convsmall", "mnist", channels=channels, hidden=hidden)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == list(channels)
    side = 28 // 2 ** len(channels)
    assert model.net[-3].in_features == channels[-1] * side * side and model.net[-1].in_features == hidden
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="channels"):
        build_model("convsmall", "mnist", channels=())


def test_mlp_on_2d_points():
    model = build_model("mlp", "points", hidden=(16,), classes=3).eval()
    assert model(torch.rand(5, 2)).shape == (5, 3)


def test_normalize_standardises_each_channel():
    norm = Normalize((0.5, 0.25), (0.5, 0.25))
    x = torch.ones(1, 2, 3, 3)
    assert torch.allclose(norm(x), torch.stack([torch.ones(3, 3), 3 * torch.ones(3, 3)])[None])


def test_every_model_starts_with_normalize():
    for name in MODELS:
        dataset = "cifar10" if name == "preact_resnet18" else "mnist"
        assert any(isinstance(m, Normalize) for m in build_model(name, dataset).modules())


def test_bad_names_are_rejected():
    with pytest.raises(ValueError, match="model name"):
        build_model("resnet50")
    with pytest.raises(ValueError, match="dataset"):
        build_model("mlp", "imagenet")


def test_normalize_rejects_bad_std():
    with pytest.raises(ValueError, match="std"):
        Normalize((0.5,), (0.0,))
    with pytest.raises(ValueError, match="one value per channel"):
        Normalize((0.5, 0.5), (1.0,))
