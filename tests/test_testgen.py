"""Coverage-guided test generation: coverage never drops, rises on a tiny network, inputs stay in the ball."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustdl.verify.coverage import activation_profile, boundary_coverage, neuron_coverage
from robustdl.verify.testgen import generate_tests, neuron_targets


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def seeds(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = 0.4 + 0.2 * torch.rand(n, 4, generator=gen, dtype=torch.float64)
    return x, tiny_net()(x).argmax(1)  # labels the network gets right


def test_neuron_targets_are_the_uncovered_neurons() -> None:
    assert neuron_targets(torch.tensor([True, False, True, False])).tolist() == [1, 3]
    corners = torch.tensor([[False, False, False], [True, False, True]])
    assert neuron_targets(corners).tolist() == [1]  # upper corners only


def test_generation_raises_neuron_coverage_and_never_lowers_it() -> None:
    net = tiny_net()
    x, y = seeds()
    report = generate_tests(net, x, y, eps=0.3, budget=24, steps=10, weight=0.0,
                            generator=torch.Generator().manual_seed(0))
    assert report.coverage_after.covered > report.coverage_before.covered
    assert not (report.coverage_before.mask & ~report.coverage_after.mask).any()
    # coverage_after is the coverage of the seeds and the kept tests together
    assert torch.equal(report.coverage_after.mask, neuron_coverage(net, torch.cat([x, report.inputs])).mask)
    # each kept test covers something no earlier test did
    covered = report.coverage_before.mask.clone()
    for t in report.inputs:
        new = neuron_coverage(net, t[None]).mask
        assert (new & ~covered).any()
        covered |= new


def test_generated_inputs_stay_in_the_ball_and_the_box() -> None:
    net = tiny_net()
    x, y = seeds()
    eps = 0.5  # seeds lie in [0.4, 0.6]: the box binds before the ball does
    report = generate_tests(net, x, y, eps=eps, budget=12, steps=5, weight=5.0,
                            generator=torch.Generator().manual_seed(0))
    assert len(report.inputs) > 0 and len(report.failures) > 0
    for found in (report.inputs, report.failures):
        assert ((found >= 0) & (found <= 1)).all()
        # each generated test lies within eps of some seed
        gap = (found[:, None, :] - x[None]).abs().amax(-1).amin(1)
        assert (gap <= eps + 1e-12).all()


def test_failures_are_misclassified() -> None:
    net = tiny_net()
    x, y = seeds()
    report = generate_tests(net, x, y, eps=0.6, budget=24, weight=5.0, generator=torch.Generator().manual_seed(0))
    assert len(report.failures) > 0
    assert (net(report.failures).argmax(1) != report.failure_labels).all()


def test_boundary_generation_reaches_upper_corners() -> None:
    net = tiny_net()
    x, y = seeds()
    profile = activation_profile(net, x)
    report = generate_tests(net, x, y, criterion="boundary", profile=profile, eps=0.3, budget=12,
                            weight=0.0, generator=torch.Generator().manual_seed(0))
    assert report.coverage_before.covered == 0  # the seeds define the profile: no corner is beyond it
    assert report.coverage_after.covered > 0
    assert torch.equal(report.coverage_after.mask, boundary_coverage(net, torch.cat([x, report.inputs]), profile).mask)


def test_bad_inputs_raise() -> None:
    net = tiny_net()
    x, y = seeds()
    with pytest.raises(ValueError, match="criterion"):
        generate_tests(net, x, y, criterion="mcdc")
    with pytest.raises(ValueError, match="profile"):
        generate_tests(net, x, y, criterion="boundary")
    with pytest.raises(ValueError, match="budget"):
        generate_tests(net, x, y, budget=0)
    with pytest.raises(ValueError, match="eps"):
        generate_tests(net, x, y, eps=-1.0)
    with pytest.raises(ValueError, match="y must have shape"):
        generate_tests(net, x, y[:2])
