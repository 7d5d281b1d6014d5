"""Coverage criteria on a hand-set 2-2-2 ReLU network whose every activation is known by hand."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from robustdl.verify.coverage import (
    ActivationProfile,
    activation_profile,
    activations,
    boundary_coverage,
    kmultisection_coverage,
    neuron_coverage,
    sign_sign_coverage,
)


def hand_net() -> nn.Module:
    """h1 = relu(x) = x on [0, 1]^2; h2 = relu(x1 + x2 - 1, x1 - x2); logits = h2."""
    first, second = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        first.weight.copy_(torch.eye(2))
        first.bias.zero_()
        second.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        second.bias.copy_(torch.tensor([-1.0, 0.0]))
    return nn.Sequential(first, nn.ReLU(), second, nn.ReLU(), nn.Linear(2, 2)).double()


# Layer 1 = x, layer 2 = (relu(x1 + x2 - 1), relu(x1 - x2)):
A = [0.0, 0.0]  # L1 (0, 0)    L2 (0, 0)
B = [1.0, 0.0]  # L1 (1, 0)    L2 (0, 1)
C = [1.0, 1.0]  # L1 (1, 1)    L2 (1, 0)
D = [0.5, 0.0]  # L1 (0.5, 0)  L2 (0, 0.5)


def points(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_activations_read_every_relu_by_hand() -> None:
    act = activations(hand_net(), points(B, C))
    assert torch.equal(act.post[0], points(B, C))
    assert torch.equal(act.post[1], points([0, 1], [1, 0]))
    assert torch.equal(act.pre[1], points([0, 1], [1, 0]))  # pre-activations x1 + x2 - 1 and x1 - x2


def test_activations_of_a_convolution_are_channel_means() -> None:
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        conv.bias.zero_()
    x = torch.tensor([[0.0, 1.0], [0.5, 0.5]]).view(1, 1, 2, 2)
    post = activations(nn.Sequential(conv, nn.ReLU()), x).post[0]
    assert torch.allclose(post, torch.tensor([[0.5, 0.0]]))


def test_neuron_coverage_unscaled_by_hand() -> None:
    net = hand_net()
    assert neuron_coverage(net, points(A), scaled=False).covered == 0
    cov = neuron_coverage(net, points(B), scaled=False)
    assert (cov.covered, cov.total) == (2, 4)
    assert cov.mask.tolist() == [True, False, False, True]
    assert neuron_coverage(net, points(B, C), scaled=False).ratio == 1.0
    assert neuron_coverage(net, points(D), threshold=0.5, scaled=False).covered == 0  # 0.5 is not > 0.5
    assert neuron_coverage(net, points(D), threshold=0.4, scaled=False).mask.tolist() == [True, False, False, True]


def test_neuron_coverage_scales_each_layer_like_deepxplore() -> None:
    # C's first layer (1, 1) scales to (0, 0): both neurons active, neither covered.
    cov = neuron_coverage(hand_net(), points(B, C))
    assert cov.mask.tolist() == [True, False, True, True]
    assert cov.ratio == 0.75


def test_kmultisection_coverage_by_hand() -> None:
    net = hand_net()
    profile = activation_profile(net, points(A, C))  # ranges [0,1], [0,1], [0,1], [0,0]
    assert profile.low.tolist() == [0, 0, 0, 0] and profile.high.tolist() == [1, 1, 1, 0]
    cov = kmultisection_coverage(net, points(D), profile, k=2)
    # n11 = 0.5 -> section 2; n12 = 0 -> section 1; n21 = 0 -> section 1; n22 = 0.5 > high: none.
    assert cov.mask.tolist() == [[False, True], [True, False], [True, False], [False, False]]
    assert (cov.covered, cov.total) == (3, 8)
    assert kmultisection_coverage(net, points(A, B, C), profile, k=1).covered == 4  # n22 = 0 in [0, 0]


def test_boundary_coverage_by_hand() -> None:
    net = hand_net()
    profile = activation_profile(net, points([0.5, 0.5]))  # L1 [0.5, 0.5] twice, L2 [0, 0] twice
    cov = boundary_coverage(net, points(A), profile)
    assert cov.mask.tolist() == [[True, True, False, False], [False, False, False, False]]
    cov = boundary_coverage(net, points(B), profile)
    assert cov.mask.tolist() == [[False, True, False, False], [True, False, False, True]]
    assert (cov.covered, cov.total) == (3, 8)


def test_sign_sign_coverage_by_hand() -> None:
    net = hand_net()
    # (A, B): layer 1 flips neuron 1 alone, layer 2 flips neuron 2 -> pair (1, 2).
    (cov,) = sign_sign_coverage(net, points(A, B))
    assert cov.mask.tolist() == [[False, True], [False, False]]
    # (B, C): layer 1 flips neuron 2 alone, layer 2 flips both -> pairs (2, 1) and (2, 2).
    (cov,) = sign_sign_coverage(net, points(B, C))
    assert cov.mask.tolist() == [[False, False], [True, True]]
    # (A, C): layer 2 flips, but two neurons of layer 1 flip together: nothing is covered.
    (cov,) = sign_sign_coverage(net, points(A, C))
    assert cov.covered == 0 and cov.total == 4
    (cov,) = sign_sign_coverage(net, points(A, B, C))
    assert cov.covered == 3
    assert torch.equal(sign_sign_coverage(net, points(A, B, C), chunk=1)[0].mask, cov.mask)


def test_sign_sign_needs_the_target_neuron_to_flip() -> None:
    # B and D: same signs in both layers (layer 1 (+, 0), layer 2 (0, +)): no change, no pair.
    (cov,) = sign_sign_coverage(hand_net(), points(B, D))
    assert cov.covered == 0


def random_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).double()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), n=st.integers(2, 12), extra=st.integers(1, 6))
def test_every_criterion_is_monotone_in_the_tests(seed: int, n: int, extra: int) -> None:
    net = random_net(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n + extra, 3, generator=gen, dtype=torch.float64)
    profile = activation_profile(net, torch.rand(20, 3, generator=gen, dtype=torch.float64))
    for measure in (
        lambda t: neuron_coverage(net, t, 0.3),
        lambda t: kmultisection_coverage(net, t, profile, 4),
        lambda t: boundary_coverage(net, t, profile),
        lambda t: sign_sign_coverage(net, t)[0],
    ):
        few, more = measure(x[:n]).mask, measure(x).mask
        assert not (few & ~more).any()


def test_bad_inputs_raise() -> None:
    net = hand_net()
    x = points(A, B)
    profile = activation_profile(net, x)
    with pytest.raises(ValueError, match="threshold"):
        neuron_coverage(net, x, threshold=-0.1)
    with pytest.raises(ValueError, match="k must be"):
        kmultisection_coverage(net, x, profile, k=0)
    with pytest.raises(ValueError, match="neurons"):
        boundary_coverage(net, x, ActivationProfile(torch.zeros(3), torch.ones(3)))
    with pytest.raises(TypeError, match="profile"):
        boundary_coverage(net, x, (0, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"no nn\.ReLU"):
        neuron_coverage(nn.Linear(2, 2), x)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        neuron_coverage(net, x + 2)
    with pytest.raises(ValueError, match="x_train"):
        activation_profile(net, x[:0])
    relu = nn.ReLU()
    with pytest.raises(ValueError, match="once per forward"):
        neuron_coverage(nn.Sequential(nn.Linear(2, 2), relu, nn.Linear(2, 2), relu).double(), x)
