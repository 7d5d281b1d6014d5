"""stAdv: the warp is the seed's bilinear formula, the flow loss its sum, the attack fools MNIST."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robustdl import zoo
from robustdl.attacks.spatial import flow_loss, flow_warp, stadv, stadv_flow


def bilinear_by_the_formula(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """x_adv(i) = sum_q x(q) (1 - |u(i) - u(q)|)(1 - |v(i) - v(q)|) over the 4 neighbours q of (u(i), v(i)).

    Written pixel by pixel; the weight max(0, 1 - |.|) is zero outside the neighbours, and
    sampling points are clamped into the image (the border is repeated).
    """
    n, _, h, w = x.shape
    out = torch.zeros_like(x)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                u = min(max(i + flow[b, 0, i, j].item(), 0.0), h - 1.0)
                v = min(max(j + flow[b, 1, i, j].item(), 0.0), w - 1.0)
                for qi in range(h):
                    for qj in range(w):
                        weight = max(0.0, 1 - abs(u - qi)) * max(0.0, 1 - abs(v - qj))
                        out[b, :, i, j] += weight * x[b, :, qi, qj]
    return out


@pytest.fixture
def tiny_images() -> torch.Tensor:
    return torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_warp_is_the_bilinear_formula(tiny_images):
    flow = 2.5 * torch.randn(2, 2, 4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(flow_warp(tiny_images, flow), bilinear_by_the_formula(tiny_images, flow), atol=1e-12)


def test_zero_flow_is_the_identity(tiny_images):
    assert torch.allclose(flow_warp(tiny_images, torch.zeros(2, 2, 4, 5, dtype=torch.float64)), tiny_images)


def test_an_integer_flow_is_a_shift(tiny_images):
    flow = torch.zeros(2, 2, 4, 5, dtype=torch.float64)
    flow[:, 0], flow[:, 1] = 1.0, -2.0  # read one row below and two columns to the left
    out = flow_warp(tiny_images, flow)
    assert torch.allclose(out[..., :-1, 2:], tiny_images[..., 1:, :-2])
    assert torch.allclose(out[..., -1, 2:], tiny_images[..., -1, :-2])  # the last row repeats


def test_one_flow_for_all_images_is_broadcast(tiny_images):
    flow = torch.rand(1, 2, 4, 5, dtype=torch.float64)
    expected = torch.cat([flow_warp(tiny_images[i : i + 1], flow) for i in range(2)])
    assert torch.allclose(flow_warp(tiny_images, flow), expected)


def test_warp_is_differentiable_in_the_flow(tiny_images):
    flow = (0.3 + 0.4 * torch.rand(2, 2, 4, 5, dtype=torch.float64)).requires_grad_(True)  # off the integer grid
    assert torch.autograd.gradcheck(lambda f: flow_warp(tiny_images, f), (flow,))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 10.0))
def test_warp_interpolates_so_stays_in_the_image_range(seed, scale):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, 6, 7, generator=generator)
    out = flow_warp(x, scale * torch.randn(1, 2, 6, 7, generator=generator))
    assert out.min() >= x.min() - 1e-6 and out.max() <= x.max() + 1e-6


def test_warp_rejects_a_flow_of_the_wrong_shape(tiny_images):
    with pytest.raises(ValueError, match="flow must have shape"):
        flow_warp(tiny_images, torch.zeros(2, 2, 5, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="flow"):
        flow_warp(tiny_images, torch.zeros(2, 2, 4, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be"):
        flow_warp(tiny_images.numpy(), torch.zeros(2, 2, 4, 5, dtype=torch.float64))


def test_flow_loss_of_a_constant_flow_is_zero():
    flow = torch.ones(3, 2, 28, 28) * torch.tensor([0.7, -1.3]).view(1, 2, 1, 1)
    assert torch.equal(flow_loss(flow, tiny=0.0), torch.zeros(3))
    assert (flow_loss(flow) < 1e-2).all()  # only the 4 * 28 * 27 terms sqrt(tiny) = 1e-6


def test_flow_loss_of_a_known_field():
    # du = [[0, 1], [0, 0]], dv = [[0, 0], [0, 2]]. Horizontal pairs: |(1, 0)| = 1 and |(0, 2)| = 2;
    # vertical pairs: |(0, 0)| = 0 and |(1, 2)| = sqrt(5); each pair is counted from both sides.
    flow = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]]])
    assert flow_loss(flow, tiny=0.0).item() == pytest.approx(2 * (1 + 2 + 0 + math.sqrt(5)))


def test_a_fixed_frame_makes_a_translation_cost_its_border():
    h, w, shift = 5, 7, (0.3, 0.4)  # |shift| = 0.5
    flow = torch.ones(1, 2, h, w) * torch.tensor(shift).view(1, 2, 1, 1)
    assert flow_loss(flow, tiny=0.0, fixed_frame=True).item() == pytest.approx(2 * (2 * h + 2 * w) * 0.5)
    assert flow_loss(3 * flow, tiny=0.0, fixed_frame=True).item() == pytest.approx(3 * 24.0)  # a norm


@pytest.fixture(scope="module")
def mnist_20(mnist):
    return zoo.load("mnist_smallcnn"), *mnist(20)


@pytest.mark.mnist
def test_stadv_fools_the_mnist_cnn_with_a_smooth_small_flow(mnist_20):
    model, x, y = mnist_20
    flow = stadv_flow(model, x, y)
    x_adv = flow_warp(x, flow)
    fooled = model(x_adv).argmax(dim=1) != y
    assert fooled.float().mean() >= 0.9  # measured: 20/20
    # Measured: median flow loss 78 (a translation by one pixel would cost 0, a single pixel
    # moved by one pixel 8); the largest displacement 2 pixels.
    assert flow_loss(flow[fooled]).median() < 150 and flow.abs().max() < 4
    assert 0 <= x_adv.min() and x_adv.max() <= 1


@pytest.mark.mnist
def test_targeted_stadv_reaches_the_target(mnist_20):
    model, x, y = mnist_20
    target = (y + 1) % 10
    # Turning a 0 into a 1 takes more than nudging strokes: at the default tau = 0.05 the flow
    # loss wins on 7 of these 20 targets; tau = 0.01 reaches all 20 (median flow loss 240).
    x_adv = stadv(model, x, y, target=target, tau=0.01)
    assert (model(x_adv).argmax(dim=1) == target).float().mean() >= 0.9
    assert 0 <= x_adv.min() and x_adv.max() <= 1


@pytest.mark.mnist
def test_a_larger_tau_buys_a_smoother_flow(mnist_20):
    model, x, y = mnist_20
    loose, smooth = (flow_loss(stadv_flow(model, x[:10], y[:10], tau=tau, steps=100)) for tau in (0.01, 0.2))
    assert smooth.median() < loose.median()


def tiny_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 3))


def test_stadv_works_under_no_grad_and_is_the_warp_by_its_flow():
    """Under no_grad, deterministic (the contract: tests/test_attack_contract.py)."""
    model = tiny_cnn().train()
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    y = torch.arange(4) % 3
    with torch.no_grad():
        x_adv = stadv(model, x, y, steps=5)
        flow = stadv_flow(model, x, y, steps=5)
    assert x_adv.shape == x.shape and flow.shape == (4, 2, 6, 6)
    assert torch.equal(x_adv, flow_warp(x, flow).clamp(0, 1))  # deterministic: one optimisation


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tau": -0.1}, ValueError, "tau"),
        ({"steps": 0}, ValueError, "steps"),
        ({"lr": math.nan}, ValueError, "lr"),
        ({"kappa": math.inf}, ValueError, "kappa"),
        ({"x": torch.full((2, 1, 6, 6), 1.5)}, ValueError, r"\[0, 1\]"),
        ({"x": torch.rand(2, 36)}, ValueError, r"\(N, C, H, W\)"),
        ({"y": torch.zeros(3, dtype=torch.long)}, ValueError, "one label per example"),
        ({"target": torch.zeros(3, dtype=torch.long)}, ValueError, "one label per example"),
    ],
)
def test_stadv_rejects_bad_inputs(kwargs, error, match):
    args = {"x": torch.rand(2, 1, 6, 6), "y": torch.zeros(2, dtype=torch.long)} | kwargs
    with pytest.raises(error, match=match):
        stadv(tiny_cnn(), **args)
