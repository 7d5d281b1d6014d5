"""The vocabulary of an attack's goal: margins, the goal's margin, reaching it, its loss, the KL divergence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustdl.losses import cross_entropy, goal_loss, goal_margin, goal_reached, kl_divergence, margin

LOGITS = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [1.0, 1.0, 0.0]])
Y = torch.tensor([0, 0, 0])


def test_margin_is_negative_exactly_when_misclassified():
    assert margin(LOGITS, Y).tolist() == [2.0, -1.0, 0.0]


def test_goal_margin_is_the_margin_of_the_label_or_minus_that_of_the_target():
    target = torch.tensor([1, 1, 1])
    assert torch.equal(goal_margin(LOGITS, Y), margin(LOGITS, Y))
    assert goal_margin(LOGITS, Y, target).tolist() == [2.0, -1.0, 0.0]  # max_{j != t} z_j - z_t
    assert torch.equal(goal_margin(LOGITS, torch.tensor([2, 2, 2]), target), goal_margin(LOGITS, Y, target))


def test_goal_reached_follows_the_argmax_and_its_ties():
    assert goal_reached(LOGITS, Y).tolist() == [False, True, False]  # the tie goes to class 0, the label
    assert goal_reached(LOGITS, torch.tensor([1, 1, 1])).tolist() == [True, False, True]  # the tie: class 0
    assert goal_reached(LOGITS, Y, target=torch.tensor([1, 1, 1])).tolist() == [False, True, False]


def test_goal_loss_climbs_the_label_or_descends_the_target():
    target = torch.tensor([2, 1, 0])
    assert torch.equal(goal_loss(LOGITS, Y), F.cross_entropy(LOGITS, Y, reduction="none"))
    assert torch.equal(goal_loss(LOGITS, Y, target), -cross_entropy(LOGITS, target))
    assert torch.equal(goal_loss(LOGITS, Y, target, loss=margin), -margin(LOGITS, target))


def test_kl_divergence_matches_torch_and_vanishes_at_the_same_prediction():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64)
    logits = LOGITS.double()
    expected = F.kl_div(F.log_softmax(logits, dim=1), p, reduction="none").sum(dim=1)
    torch.testing.assert_close(kl_divergence(p, logits), expected)
    assert kl_divergence(logits.softmax(dim=1), logits).abs().max() < 1e-12


def test_kl_divergence_names_a_shape_mismatch():
    with pytest.raises(ValueError, match="p must have the logits' shape"):
        kl_divergence(torch.ones(2, 3) / 3, LOGITS)
