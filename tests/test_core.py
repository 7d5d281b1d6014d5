"""What every attack shares: margins, success, and keeping the best of several restarts."""

from __future__ import annotations

import torch

from robustdl.attacks._core import best_of_restarts, is_adversarial, margin


def test_margin_is_negative_exactly_when_misclassified():
    logits = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [1.0, 1.0, 0.0]])
    y = torch.tensor([0, 0, 0])
    assert margin(logits, y).tolist() == [2.0, -1.0, 0.0]


def test_best_of_restarts_keeps_first_success_and_reruns_only_the_rest(linear_model, images):
    y = linear_model(images).argmax(dim=1)  # every example correctly classified at first
    calls = []

    def attack_once(x, yy, target):
        calls.append(len(x))
        if len(calls) == 1:  # the first restart breaks the first half only
            out = x.clone()
            out[: len(x) // 2] = 1 - out[: len(x) // 2]
            return out
        return x.clone()

    out = best_of_restarts(attack_once, linear_model, images, y, None, restarts=3)
    broken_first = is_adversarial(linear_model, 1 - images[:4], y[:4])
    assert calls[0] == 8 and calls[1] == 8 - int(broken_first.sum())
    assert torch.equal(out[:4][broken_first], (1 - images[:4])[broken_first])


def test_best_of_restarts_with_nothing_left_to_break_stops_early(linear_model, images):
    y = (linear_model(images).argmax(dim=1) + 1) % 3  # every example already "adversarial"
    calls = []
    best_of_restarts(lambda x, yy, t: calls.append(1) or x.clone(), linear_model, images, y, None, restarts=5)
    assert len(calls) == 1
