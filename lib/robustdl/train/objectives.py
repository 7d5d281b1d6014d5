"""Objectives by name, for recipes and papermill parameters: ``make_objective("pgd_at", eps=0.3)``."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from robustdl._checks import check_positive_int
from robustdl.train.adversarial import EpsilonRamp, FreeAT, fast_at_loss, pgd_at_loss, trades_loss
from robustdl.train.certified import crown_ibp_loss, ibp_loss
from robustdl.train.feature_scattering import feature_scattering_loss
from robustdl.train.loop import Objective, standard_loss
from robustdl.train.noise import gaussian_noise_loss
from robustdl.train.scr import at_scr_loss
from robustdl.train.single_step import gradalign_loss, n_fgsm_loss
from robustdl.train.vat import vat_loss
from robustdl.train.wrm import wrm_loss

__all__ = ["OBJECTIVES", "make_objective"]

#: Objectives that are plain functions ``f(model, x, y, **kwargs)``.
OBJECTIVES: dict[str, Callable[..., Any]] = {
    "standard": standard_loss,
    "pgd_at": pgd_at_loss,
    "fast_at": fast_at_loss,
    "n_fgsm": n_fgsm_loss,
    "gradalign": gradalign_loss,
    "trades": trades_loss,
    "wrm": wrm_loss,
    "vat": vat_loss,
    "feature_scattering": feature_scattering_loss,
    "ibp": ibp_loss,
    "crown_ibp": crown_ibp_loss,
    "at_scr": at_scr_loss,
    "gaussian_noise": gaussian_noise_loss,
}
#: Stateful objectives, built by their class.
_CLASSES: dict[str, Callable[..., Objective]] = {"free": FreeAT}


def make_objective(name: str, warmup: int = 0, **kwargs: Any) -> Objective:
    """The objective ``name`` with its keyword arguments, e.g. ``make_objective("trades", beta=6)``.

    With ``warmup > 0`` the radius ``eps`` ramps up from 0 over that many steps
    (:class:`~robustdl.train.adversarial.EpsilonRamp`).
    """
    if name not in OBJECTIVES and name not in _CLASSES:
        raise ValueError(f"objective name must be one of {sorted([*OBJECTIVES, *_CLASSES])}, got {name!r}")
    build = _CLASSES.get(name) or (lambda **kw: partial(OBJECTIVES[name], **kw) if kw else OBJECTIVES[name])
    if not warmup:
        return build(**kwargs)
    if name in _CLASSES:
        raise ValueError(f"warmup rebuilds the objective at every step, which would reset the state of {name!r}")
    if "eps" not in kwargs:
        raise ValueError(f"warmup ramps the radius eps, but objective {name!r} was given no eps")
    return EpsilonRamp(lambda eps: build(**{**kwargs, "eps": eps}), kwargs["eps"], check_positive_int(warmup, "warmup"))
