"""robustdl: the library of the course *Adversarial Robustness of Deep Learning*.

The course follows the CIKM 2021 tutorial of Ruan, Yi and Huang :cite:`ruan2021adversarial`.
Images are float tensors in [0, 1] of shape (N, C, H, W); models normalise inside.
"""

from robustdl._model import accuracy, predict
from robustdl.threat import LpBall
from robustdl.train import device, evaluate, fit, seed_everything

__all__ = ["LpBall", "accuracy", "device", "evaluate", "fit", "predict", "seed_everything"]
__version__ = "0.1.0"
