"""Training: the one loop (:mod:`~robustdl.train.loop`), its objectives, and running it on several processes.

* :mod:`robustdl.train.loop` -- :func:`fit`, :func:`run_epoch`, :func:`evaluate`, checkpoints;
* :mod:`robustdl.train.adversarial` -- PGD-AT, fast FGSM, free, YOPO, TRADES;
* :mod:`robustdl.train.single_step` -- N-FGSM and GradAlign, single-step training without catastrophic overfitting;
* distributional robustness: :mod:`robustdl.train.wrm` (WRM), :mod:`robustdl.train.vat` (VAT),
  :mod:`robustdl.train.feature_scattering`, :mod:`robustdl.train.atld` (latent distributions);
* :mod:`robustdl.train.regularisers` -- spectral normalisation, Parseval, Lipschitz and weight-correlation penalties;
* :mod:`robustdl.train.certified` -- certified training through bounds: IBP and CROWN-IBP;
* :mod:`robustdl.train.noise` -- Gaussian data augmentation, the base classifier of randomised smoothing;
* :mod:`robustdl.train.scr` -- adversarial training with shift consistency regularisation (AT-SCR);
* :mod:`robustdl.train.distributed` -- the same loop under ``torchrun``.
"""

from robustdl.train.loop import (
    Attack,
    Callback,
    Objective,
    device,
    evaluate,
    fit,
    load_checkpoint,
    run_epoch,
    save_checkpoint,
    seed_everything,
    standard_loss,
)
from robustdl.train.objectives import OBJECTIVES, make_objective

__all__ = [
    "OBJECTIVES",
    "Attack",
    "Callback",
    "Objective",
    "device",
    "evaluate",
    "fit",
    "load_checkpoint",
    "make_objective",
    "run_epoch",
    "save_checkpoint",
    "seed_everything",
    "standard_loss",
]
