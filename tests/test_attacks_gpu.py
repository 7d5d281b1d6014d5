"""Every attack on CUDA: the result stays on the input's device and dtype, in the ball and the box.

Skipped without CUDA; run with ``pytest -m gpu`` on a GPU machine.
"""

from __future__ import annotations

import functools

import pytest
import torch

from robustdl.attacks import apgd, cw_l2, cw_linf, deepfool, fgsm, lbfgs, pgd, stadv
from robustdl.models import build_model
from robustdl.threat import LpBall

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ATTACKS = {
    "fgsm": (functools.partial(fgsm, eps=0.1), LpBall("linf", 0.1)),
    "pgd-linf": (functools.partial(pgd, eps=0.1, steps=5, restarts=2), LpBall("linf", 0.1)),
    "pgd-l2": (functools.partial(pgd, eps=1.0, norm="l2", steps=5), LpBall("l2", 1.0)),
    "pgd-l1": (functools.partial(pgd, eps=5.0, norm="l1", steps=5), LpBall("l1", 5.0)),
    "apgd-dlr": (functools.partial(apgd, eps=0.1, steps=10, loss="dlr"), LpBall("linf", 0.1)),
    "cw_l2": (functools.partial(cw_l2, steps=10, binary_search_steps=2), None),
    "cw_linf": (functools.partial(cw_linf, steps=10), None),
    "lbfgs": (lambda model, x, y: lbfgs(model, x, y, target=(y + 1) % 10, search_steps=2, max_iter=10), None),
    "deepfool": (functools.partial(deepfool, steps=5), None),
    "stadv": (functools.partial(stadv, steps=10), None),
}


@pytest.mark.parametrize("name", ATTACKS)
def test_attack_runs_on_cuda(name):
    attack, ball = ATTACKS[name]
    model = build_model("smallcnn", "mnist").cuda().eval()
    x = torch.rand(8, 1, 28, 28, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    y = torch.arange(8, device="cuda") % 10
    x_adv = attack(model, x, y)
    assert x_adv.device == x.device and x_adv.dtype == x.dtype and x_adv.shape == x.shape
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if ball is not None:
        assert ball.contains(x_adv, x).all()
