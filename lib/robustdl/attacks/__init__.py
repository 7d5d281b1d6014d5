"""Adversarial attacks: functions ``attack(model, x, y, ...) -> x_adv`` that read like their papers.

Every attack returns a new detached tensor, never mutates its inputs, leaves no gradients on
the model, restores the model's train/eval mode, and respects its threat model
(:class:`robustdl.threat.LpBall`) and the [0, 1] box. Targeted attacks take ``target=``.
"""

from robustdl.attacks.apgd import apgd
from robustdl.attacks.cw import cw_l0, cw_l2, cw_linf
from robustdl.attacks.gradient import fgsm, pgd
from robustdl.attacks.lbfgs import lbfgs
from robustdl.attacks.oracle import QueryBudgetError, QueryOracle
from robustdl.attacks.spatial import flow_loss, flow_warp, stadv, stadv_flow
from robustdl.attacks.square_attack import square
from robustdl.attacks.universal import GeneralizedPerturbation, deepfool, fooling_rate, guap, uap
from robustdl.attacks.zoo_attack import zoo_adam
from robustdl.losses import dlr_loss

__all__ = [
    "GeneralizedPerturbation",
    "QueryBudgetError",
    "QueryOracle",
    "apgd",
    "cw_l0",
    "cw_l2",
    "cw_linf",
    "deepfool",
    "dlr_loss",
    "fgsm",
    "flow_loss",
    "flow_warp",
    "fooling_rate",
    "guap",
    "lbfgs",
    "pgd",
    "square",
    "stadv",
    "stadv_flow",
    "uap",
    "zoo_adam",
]
