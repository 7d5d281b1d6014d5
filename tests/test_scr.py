"""AT-SCR: feature shifts, their class means, the shift-consistency penalty, the objective."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustdl.train import make_objective
from robustdl.train.adversarial import pgd_at_loss
from robustdl.train.scr import at_scr_loss, class_mean_shift, feature_shift, shift_consistency


def test_class_means_and_a_consistent_shift_has_no_penalty():
    y = torch.tensor([0, 0, 2, 2, 2])
    shift = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 3.0], [0.0, 3.0]])
    means = class_mean_shift(shift, y, 3)
    assert torch.equal(means, torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 3.0]]))
    assert shift_consistency(shift, y).item() == 0.0


def test_shift_consistency_by_hand():
    y = torch.tensor([1, 1, 0])
    shift = torch.tensor([[0.0, 2.0], [2.0, 0.0], [5.0, 5.0]])
    # Class 1's mean shift is (1, 1); each of its two examples is sqrt2 away; class 0 has one example.
    assert shift_consistency(shift, y).item() == pytest.approx((2 + 2 + 0) / 3)
    with pytest.raises(ValueError, match="one label per row"):
        shift_consistency(shift, y[:2])


def test_feature_shift_is_the_change_of_the_logits():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, x_adv = torch.rand(2, 1, 2, 2), torch.rand(2, 1, 2, 2)
    assert torch.allclose(feature_shift(model, x, x_adv), model(x_adv) - model(x))


def test_at_scr_without_the_penalty_is_pgd_training_and_the_penalty_adds_on():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.rand(12, 1, 4, 4), torch.randint(0, 3, (12,))
    torch.manual_seed(1)
    plain = pgd_at_loss(model, x, y, eps=0.1, steps=3)
    torch.manual_seed(1)
    assert at_scr_loss(model, x, y, eps=0.1, lam=0.0, steps=3).item() == pytest.approx(plain.item())
    torch.manual_seed(1)
    penalised = make_objective("at_scr", eps=0.1, lam=2.0, steps=3)(model, x, y)
    assert penalised.item() > plain.item()
    with pytest.raises(ValueError, match="lam"):
        at_scr_loss(model, x, y, lam=-1.0)
