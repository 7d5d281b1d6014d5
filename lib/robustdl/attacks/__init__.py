"""Adversarial attacks: functions ``attack(model, x, y, ...) -> x_adv`` that read like their papers.

Every attack returns a new detached tensor, never mutates its inputs, leaves no gradients on
the model, restores the model's train/eval mode, and respects its threat model
(:class:`robustdl.threat.LpBall`) and the [0, 1] box. Targeted attacks take ``target=``.
"""

from robustdl.attacks.gradient import fgsm

__all__ = ["fgsm"]
