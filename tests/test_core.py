"""What every attack shares: keeping the best of several runs (restarts, or an ensemble)."""

from __future__ import annotations

import torch

from robustdl.attacks._core import best_of
from robustdl.losses import goal_reached


def test_best_of_keeps_first_success_and_reruns_only_the_rest(linear_model, images):
    y = linear_model(images).argmax(dim=1)  # every example correctly classified at first
    calls = []

    def attack_once(x, yy, target):
        calls.append(len(x))
        if len(calls) == 1:  # the first restart breaks the first half only
            out = x.clone()
            out[: len(x) // 2] = 1 - out[: len(x) // 2]
            return out
        return x.clone()

    out = best_of([attack_once] * 3, linear_model, images, y)
    broken_first = goal_reached(linear_model(1 - images[:4]), y[:4])
    assert calls[0] == 8 and calls[1] == 8 - int(broken_first.sum())
    assert torch.equal(out[:4][broken_first], (1 - images[:4])[broken_first])


def test_best_of_with_nothing_left_to_break_stops_early(linear_model, images):
    y = (linear_model(images).argmax(dim=1) + 1) % 3  # every example already "adversarial"
    calls = []
    best_of([lambda x, yy, t: calls.append(1) or x.clone()] * 5, linear_model, images, y)
    assert len(calls) == 1


def test_best_of_without_a_loss_keeps_the_last_result_of_the_unbroken(linear_model, images):
    y = linear_model(images).argmax(dim=1)
    runs = [lambda x, yy, t: x.clone(), lambda x, yy, t: (x + 0.001).clamp(0, 1)]  # neither changes a prediction
    out = best_of(runs, linear_model, images, y, loss=None)
    assert torch.equal(out, (images + 0.001).clamp(0, 1))
