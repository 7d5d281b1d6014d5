"""Reliability assessment (RAM) against cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robustdl.reliability import (
    CROSS,
    EMPTY,
    OperationalProfile,
    assess,
    cell_labels,
    cell_robust,
    cell_unastuteness,
    estimate,
    grid_cells,
    occupied_cells,
    operational_profile,
    r_separation,
)


def threshold_net(at: float = 0.6, sharpness: float = 1e3) -> nn.Module:
    """Predicts class 1 exactly where x1 > at (logits 0 and sharpness * (x1 - at))."""
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 0.0], [sharpness, 0.0]]))
        layer.bias.copy_(torch.tensor([0.0, -sharpness * at]))
    return nn.Sequential(layer).double()


def test_r_separation_of_a_hand_example() -> None:
    x = torch.tensor([[0.0, 0.0], [0.0, 0.1], [0.5, 0.0], [0.3, 0.4]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    # differently labelled pairs: |(0,0)-(0.5,0)| = 0.5, |(0,0.1)-(0.3,0.4)|_inf = 0.3, ... min Linf 0.3
    assert r_separation(x, y) == pytest.approx(0.15)
    # L2: min over pairs of sqrt(.09 + .09) = 0.4243, sqrt(.25 + .01) = 0.5099, ... -> 0.2121
    assert r_separation(x, y, p=2) == pytest.approx(math.sqrt(0.18) / 2)
    assert r_separation(x, y, chunk=1) == pytest.approx(0.15)  # chunking changes nothing
    assert r_separation(x, torch.zeros(4, dtype=torch.long)) == math.inf


def test_r_separation_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(200, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (200,), generator=gen)
    brute = min((x[i] - x[j]).abs().max().item() for i in range(200) for j in range(200) if y[i] != y[j])
    assert r_separation(x, y, chunk=37) == pytest.approx(brute / 2)


def test_grid_cells_count_centres_and_radius() -> None:
    cells = grid_cells(0.0, 1.0, 4, dtype=torch.float64)
    assert len(cells) == 16 and cells.radius == 0.125
    assert sorted({round(c, 6) for c in cells.centres[:, 0].tolist()}) == [0.125, 0.375, 0.625, 0.875]
    assert len(grid_cells(0.0, 1.0, 250)) == 250 * 250
    points = cells.sample(50, torch.Generator().manual_seed(0))
    assert points.shape == (16, 50, 2)
    assert ((points - cells.centres[:, None]).abs() <= cells.radius).all()


def test_occupied_cells_and_labels() -> None:
    z = torch.tensor([[0.05, 0.05], [0.06, 0.02], [0.15, 0.05], [0.16, 0.01], [0.35, 0.35]], dtype=torch.float64)
    y = torch.tensor([3, 3, 1, 2, 0])
    cells = occupied_cells(z, 0.05)  # grid of side 0.1: cells (0,0), (1,0), (3,3)
    assert len(cells) == 3
    labels = cell_labels(cells, z, y)
    by_key = {tuple(k.tolist()): int(label) for k, label in zip(cells.keys, labels, strict=True)}
    assert by_key == {(0, 0): 3, (1, 0): CROSS, (3, 3): 0}
    grid = grid_cells(0.0, 0.2, 2, dtype=torch.float64)  # side 0.1: (0,0) (0,1) (1,0) (1,1)
    assert cell_labels(grid, z, y).tolist() == [3, EMPTY, CROSS, EMPTY]


def test_pmi_equals_the_failure_mass_under_a_uniform_profile() -> None:
    # All cells are labelled 0; the model fails exactly where x1 > 0.6: lambda = 0.4 of the square.
    cells = grid_cells(0.0, 1.0, 4, dtype=torch.float64)
    labels = torch.zeros(16, dtype=torch.long)
    lam, lam_var = cell_unastuteness(threshold_net(), cells, labels, samples=4000,
                                     generator=torch.Generator().manual_seed(0))
    expected = ((cells.centres[:, 0] + cells.radius - 0.6).clamp(0, 0.25) / 0.25)  # 0, 0, 0.6, 1 by column
    assert torch.allclose(lam, expected, atol=0.03)
    uniform = torch.full((16,), 1 / 16, dtype=torch.float64)
    result = estimate(uniform, lam, lam_var=lam_var)
    assert result.mean == pytest.approx(0.4, abs=4 * math.sqrt(result.var))
    assert result.var == pytest.approx(4 * (1 / 16) ** 2 * 0.6 * 0.4 / 4000, rel=0.1)  # only the 0.6 cells vary
    assert result.acu == pytest.approx(lam.mean().item())
    assert result.upper == pytest.approx(result.mean + 1.959964 * math.sqrt(result.var), rel=1e-5)


def test_pmi_weights_cells_by_a_known_profile() -> None:
    cells = grid_cells(0.0, 1.0, 4, dtype=torch.float64)
    lam = (cells.centres[:, 0] > 0.6).double()  # the 8 right-hand cells fail
    op = torch.where(cells.centres[:, 0] > 0.6, 0.1, 0.025).double()  # 8 * 0.1 + 8 * 0.025 = 1
    result = estimate(op, lam)
    assert (result.mean, result.var, result.upper, result.acu) == pytest.approx((0.8, 0.0, 0.8, 0.5))
    op_var = torch.full((16,), 1e-4, dtype=torch.float64)
    assert estimate(op, lam, op_var).var == pytest.approx(8 * 1e-4)


def test_cross_and_empty_cells() -> None:
    cells = grid_cells(0.0, 1.0, 2, dtype=torch.float64)  # centres x1 = 0.25 or 0.75
    labels = torch.tensor([CROSS, EMPTY, EMPTY, 1])
    lam, var = cell_unastuteness(threshold_net(0.5), cells, labels, samples=50)
    # cross: 1; empty: the majority vote is right everywhere; the labelled x1 > 0.5 cell predicts 1.
    assert lam.tolist() == [1.0, 0.0, 0.0, 0.0] and var.tolist() == [0.0] * 4


def test_cell_robust_by_attack_and_verification() -> None:
    cells = grid_cells(0.0, 1.0, 4, dtype=torch.float64)
    labels = torch.zeros(16, dtype=torch.long)
    net = threshold_net(0.6)
    robust_cells = cells.centres[:, 0] < 0.5  # boundary inside columns 3, mislabelled column 4
    for method in ("attack", "verify"):
        assert torch.equal(cell_robust(net, cells, labels, method), robust_cells)
    labels[0] = CROSS
    assert not cell_robust(net, cells, labels, "verify")[0]
    # a 0/1 unastuteness is an upper bound on the sampled one
    lam, _ = cell_unastuteness(net, cells, torch.zeros(16, dtype=torch.long), samples=200)
    assert (lam <= 1 - robust_cells.double()).all()


def test_operational_profile_follows_the_data() -> None:
    gen = torch.Generator().manual_seed(0)
    z = 0.125 + 0.05 * torch.randn(400, 2, generator=gen, dtype=torch.float64)
    cells = grid_cells(0.0, 1.0, 4, dtype=torch.float64)
    profile = operational_profile(cells, z, bootstrap=5)
    assert profile.op.sum().item() == pytest.approx(1.0)
    assert profile.op.argmax().item() == 0  # the cell centred on the data's mean
    assert profile.op[0] > 0.3 and profile.op[-1] < 1e-6
    assert (profile.var >= 0).all() and profile.var.sum() > 0
    assert 0 < profile.bandwidth < 0.1
    fixed = operational_profile(cells, z, bandwidth=0.05)
    assert fixed.bandwidth == 0.05 and fixed.var.sum() == 0


def test_assess_reports_table_one() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(300, 2, generator=gen, dtype=torch.float64)
    y = (x[:, 0] > 0.5).long()  # the truth; the model errs on 0.5 < x1 <= 0.6
    cells = grid_cells(0.0, 1.0, 10, dtype=torch.float64)
    op = torch.full((100,), 0.01, dtype=torch.float64)
    uniform = OperationalProfile(op, torch.zeros_like(op), 0.0)
    report = assess(threshold_net(), cells, uniform, x[:200], y[:200], x[200:], y[200:], samples=400,
                    generator=torch.Generator().manual_seed(1))
    assert report.cells == 100 and report.radius == pytest.approx(0.05)
    assert report.train_error == pytest.approx(((x[:200, 0] > 0.5) & (x[:200, 0] <= 0.6)).double().mean().item())
    assert report.estimate.mean == pytest.approx(0.1, abs=0.02)  # the mass of 0.5 < x1 <= 0.6
    assert report.r_separation == r_separation(x[:200], y[:200]) and report.seconds_per_cell > 0
    assert set(report.row()) >= {"ACU", "E[lambda]", "Var[lambda]", "Ub97.5%"}


def test_bad_inputs_raise() -> None:
    cells = grid_cells(0.0, 1.0, 2)
    with pytest.raises(ValueError, match="per_dim"):
        grid_cells(0.0, 1.0, 0)
    with pytest.raises(ValueError, match="high must exceed"):
        grid_cells(1.0, 0.0, 2)
    with pytest.raises(ValueError, match="y must have shape"):
        r_separation(torch.rand(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be"):
        r_separation([[0.0]], torch.zeros(1, dtype=torch.long))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="radius"):
        occupied_cells(torch.rand(3, 2), 0.0)
    with pytest.raises(ValueError, match="z must have shape"):
        operational_profile(cells, torch.rand(5))
    with pytest.raises(ValueError, match="bootstrap"):
        operational_profile(cells, torch.rand(5, 2), bootstrap=-1)
    with pytest.raises(ValueError, match="labels must have one entry per cell"):
        cell_unastuteness(threshold_net().float(), cells, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="method"):
        cell_robust(threshold_net().float(), cells, torch.zeros(4, dtype=torch.long), method="guess")
    with pytest.raises(ValueError, match="confidence"):
        estimate(torch.ones(2) / 2, torch.zeros(2), confidence=1.5)
    with pytest.raises(ValueError, match="same length"):
        estimate(torch.ones(2) / 2, torch.zeros(3))
