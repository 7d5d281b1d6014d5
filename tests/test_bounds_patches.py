"""CROWN's rows kept as local windows (patches) give the bounds of dense rows, on every kind of convolution.

:func:`robustdl.verify.bounds._patch_rows` is an exact reformulation of :func:`_dense_rows` for the
neurons of a convolution above convolutions, ReLUs and ``Normalize``: the two must agree to
rounding, whatever the stride, padding, dilation, groups or bias, and over Linf and L2 balls.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_bounds import outputs_at, samples
from torch import nn

from robustdl.models import Normalize
from robustdl.threat import LpBall
from robustdl.verify import operators, preactivation_bounds
from robustdl.verify.bounds import _dense_rows, _local, _patch_rows, _propagate
from robustdl.verify.operators import BoundConv2d

CONV_CHAINS = {
    "strided": lambda: [nn.Conv2d(2, 4, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 4, stride=2, padding=1)],
    "dilated, no bias": lambda: [nn.Conv2d(2, 4, 3, padding=2, dilation=2, bias=False), nn.ReLU(),
                                 nn.Conv2d(4, 3, (3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1))],
    "grouped, normalised": lambda: [nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.ReLU(),
                                    Normalize([0.1, -0.2, 0.3, 0.0], [0.5, 2.0, 1.0, 0.7]),
                                    nn.Conv2d(4, 4, 3, stride=2, groups=2)],
    "three convolutions": lambda: [nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, stride=2, padding=1),
                                   nn.ReLU(), nn.Conv2d(3, 2, 2, padding=1)],
}


def conv_chain(name: str, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(Normalize([0.4, 0.5], [0.3, 0.2]), *CONV_CHAINS[name]()).double()


@pytest.mark.parametrize("ball", [LpBall(math.inf, 0.1), LpBall(2, 0.5)], ids=["linf", "l2"])
@pytest.mark.parametrize("name", CONV_CHAINS)
def test_patches_give_the_bounds_of_dense_rows(name, ball):
    model = conv_chain(name, seed=len(name))
    x = torch.rand(3, 2, 9, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ops = operators(model)
    assert _local(ops) and isinstance(ops[-1], BoundConv2d)
    with torch.no_grad():
        inputs, (lower, _) = _propagate(ops, ball, x, crown=True)
        shape = lower.shape[1:]
        union = torch.arange(shape.numel())
        order = torch.stack([torch.randperm(len(union), generator=torch.Generator().manual_seed(i))[:40]
                             for i in range(len(x))])  # each example its own neurons, in any order
        for sign in (1.0, -1.0):
            dense = _dense_rows(ops, inputs, union, order, sign, ball, x, shape)
            patches = _patch_rows(ops, inputs, union[order], sign, ball, x, shape)
            torch.testing.assert_close(patches, dense, rtol=1e-10, atol=1e-10)


def test_patched_preactivation_bounds_contain_every_sampled_value():
    model = nn.Sequential(*conv_chain("strided", seed=3), nn.ReLU(), nn.Flatten())
    x = torch.rand(2, 2, 9, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        lower, upper = preactivation_bounds(model, x, 0.1)[1]
    pre = outputs_at(model[:-2], samples(x, 0.1, count=500)).view(len(x), 500, *lower.shape[1:])
    assert (pre >= lower.unsqueeze(1) - 1e-9).all() and (pre <= upper.unsqueeze(1) + 1e-9).all()


def test_dense_layers_keep_dense_rows():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    assert not _local(operators(model))
    assert not _local(operators(model)[:1] + operators(nn.Sequential(nn.ReLU())))
