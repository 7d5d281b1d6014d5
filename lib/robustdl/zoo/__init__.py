"""Pretrained models bundled with the package, each trained by the library's own recipe.

>>> from robustdl import zoo
>>> model = zoo.load("mnist_smallcnn")        # eval mode, on the CPU
>>> zoo.card("mnist_smallcnn")["test_accuracy"]

Every bundled model has a model card (``cards/NAME.json``: recipe, seed, data, epochs, wall
time, test accuracy, the SHA-256 of its weights) and is reproducible with
``python -m robustdl.zoo train NAME``. Weights are stored as float16 state dicts and loaded
with ``torch.load(..., weights_only=True)``: nothing is unpickled but tensors.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from robustdl._model import accuracy
from robustdl.attacks import pgd
from robustdl.data import load_dataset, loader, random_crop_flip
from robustdl.evaluation import autoattack_like
from robustdl.models import build_model
from robustdl.threat import LpBall
from robustdl.train import evaluate, fit, seed_everything
from robustdl.train.objectives import make_objective
from robustdl.verify import (
    certified_accuracy,
    certified_radius,
    certify,
    crown_ibp_margin,
    crown_margin,
    ibp_margin,
    smoothed_certified_accuracy,
)

__all__ = [
    "RECIPES", "Recipe", "available", "card", "dataset_of", "ensemble_metrics", "load", "measure", "robust_metrics",
    "smoothing_metrics", "threat_model", "train",
]

ZOO_DIR = Path(__file__).parent


@dataclass(frozen=True)
class Recipe:
    """How a bundled model is trained: architecture, data, optimiser and schedule."""

    model: str
    dataset: str
    epochs: int
    lr: float
    batch_size: int = 128
    seed: int = 0
    model_kwargs: dict[str, object] = field(default_factory=dict)
    description: str = ""
    objective: str = "standard"
    objective_kwargs: dict[str, object] = field(default_factory=dict)
    warmup: int = 0
    replays: int = 1
    robust_eps: float | None = None
    robust_norm: str = "linf"
    augment: bool = False
    ensemble_examples: int = 1000
    certify: tuple[str, ...] = ("ibp", "crown")
    smoothing_radii: tuple[float, ...] = ()


RECIPES: dict[str, Recipe] = {
    "mnist_smallcnn": Recipe(
        model="smallcnn", dataset="mnist", epochs=4, lr=1e-3,
        description="Standard (non-robust) training of the MNIST CNN of Madry et al. (2018): "
                    "Adam, one-cycle learning rate, cross-entropy.",
    ),
    "mnist_lenet": Recipe(
        model="lenet", dataset="mnist", epochs=6, lr=2e-3,
        description="Standard training of a LeNet-5-style CNN (LeCun et al. 1998): Adam, one-cycle "
                    "learning rate, cross-entropy. A second architecture for transfer experiments.",
    ),
    "mnist_convsmall": Recipe(
        model="convsmall", dataset="mnist", epochs=4, lr=2e-3,
        description="Standard (non-robust) training of the small CNN of Wong and Kolter (2018), the "
                    "baseline of the robust models below: Adam, one-cycle learning rate, cross-entropy.",
    ),
    "mnist_pgd_at": Recipe(
        model="convsmall", dataset="mnist", epochs=12, lr=2e-3, objective="pgd_at",
        objective_kwargs={"eps": 0.3, "steps": 10}, warmup=1000, robust_eps=0.3,
        description="PGD adversarial training (Madry et al. 2018) at Linf eps 0.3: PGD-10 (step 2.5 eps / 10) "
                    "from a random start, eps ramped up over the first 1000 steps; Adam, one-cycle.",
    ),
    "mnist_fast": Recipe(
        model="convsmall", dataset="mnist", epochs=12, lr=2e-3, objective="pgd_at",
        objective_kwargs={"eps": 0.3, "steps": 2}, warmup=1000, robust_eps=0.3,
        description="Fast adversarial training at Linf eps 0.3: the FGSM step from a random start of Wong et al. "
                    "(2020), step 1.25 eps, followed by a second such step (PGD-2): 3 passes per step against "
                    "PGD-10's 11. FGSM with a random start alone overfits catastrophically on this network at "
                    "eps 0.3 (see the chapter). eps ramped up over the first 1000 steps; Adam, one-cycle.",
    ),
    "mnist_nfgsm": Recipe(
        model="convsmall", dataset="mnist", epochs=12, lr=2e-3, objective="n_fgsm",
        objective_kwargs={"eps": 0.3, "noise": 1.0}, warmup=1000, robust_eps=0.3,
        description="N-FGSM (de Jorge et al. 2022) at Linf eps 0.3: one FGSM step of size eps from noise "
                    "uniform in [-eps, eps], not projected back: 2 passes per step against PGD-10's 11. eps ramped "
                    "up over the first 1000 steps; Adam, one-cycle. Not bundled: on this small network it overfits "
                    "catastrophically after about 8 epochs (training loss 0.013, clean 87%, PGD-20 15% on 200 test "
                    "images); with the paper's noise of 2 eps (up to 0.6 on MNIST's pixels) it loses clean accuracy "
                    "(75.5%) and all robustness.",
    ),
    "mnist_trades": Recipe(
        model="convsmall", dataset="mnist", epochs=15, lr=2e-3, objective="trades",
        objective_kwargs={"eps": 0.3, "steps": 10, "beta": 6.0}, warmup=1000, robust_eps=0.3,
        description="TRADES (Zhang et al. 2019) at Linf eps 0.3, beta 6, inner PGD-10 on the KL divergence, "
                    "eps ramped up over the first 1000 steps; Adam, one-cycle; 15 epochs (PGD-AT: 12).",
    ),
    "mnist_feature_scattering": Recipe(
        model="convsmall", dataset="mnist", epochs=5, lr=2e-3, objective="feature_scattering",
        objective_kwargs={"eps": 0.3}, warmup=1000, robust_eps=0.3,
        description="Feature-scattering adversarial training (Zhang and Wang 2019) at Linf eps 0.3: one step of "
                    "size eps from a random start on the batch's OT distance between clean and perturbed logits, "
                    "label smoothing 0.5, eps ramped up over the first 1000 steps; Adam, one-cycle.",
    ),
    "mnist_ibp": Recipe(
        model="convsmall", dataset="mnist", epochs=20, lr=2e-3, objective="ibp",
        objective_kwargs={"eps": 0.4, "kappa": 0.5, "full_eps": 0.4}, warmup=3000, robust_eps=0.3,
        description="Interval bound propagation training (Gowal et al. 2018) for certified robustness at Linf "
                    "eps 0.3: trained at eps 0.4, kappa * CE(clean) + (1 - kappa) * CE(worst-case logits), eps "
                    "ramped up from 0 and kappa down from 1 to 0.5 over the first 3000 steps; Adam, one-cycle.",
    ),
    "mnist_crown_ibp": Recipe(
        model="convsmall", dataset="mnist", epochs=20, lr=2e-3, objective="crown_ibp",
        objective_kwargs={"eps": 0.4, "kappa": 0.5, "beta": 0.0, "full_eps": 0.4}, warmup=3000, robust_eps=0.3,
        certify=("ibp", "crown_ibp", "crown"),
        description="CROWN-IBP training (Zhang et al. 2020) for certified robustness at Linf eps 0.3: trained at "
                    "eps 0.4, kappa * CE(clean) + (1 - kappa) * CE(worst-case logits of beta * CROWN-IBP + "
                    "(1 - beta) * IBP margins), eps ramped up from 0, kappa down from 1 to 0.5 and beta from 1 "
                    "to 0 over the first 3000 steps (IBP alone after them); Adam, one-cycle. mnist_ibp's recipe "
                    "otherwise.",
    ),
    "cifar10_convlarge": Recipe(
        model="convlarge", dataset="cifar10", epochs=10, lr=1e-3, augment=True,
        robust_eps=8 / 255, ensemble_examples=500, certify=(),
        description="Standard (non-robust) training of the large CNN of Wong et al. (2018) on CIFAR-10: random "
                    "crops and flips, Adam, one-cycle learning rate, cross-entropy.",
    ),
    "cifar10_fast_at": Recipe(
        model="convlarge", dataset="cifar10", epochs=10, lr=1e-3, augment=True, objective="fast_at",
        objective_kwargs={"eps": 8 / 255}, warmup=1560, robust_eps=8 / 255, ensemble_examples=500,
        certify=(),
        description="Fast adversarial training (Wong et al. 2020) of the large CNN of Wong et al. (2018) on "
                    "CIFAR-10 at Linf eps 8/255: one FGSM step of 1.25 eps from a random start, eps ramped up "
                    "over the first 4 epochs; random crops and flips, Adam, one-cycle learning rate.",
    ),
    "cifar10_ibp": Recipe(
        model="convsmall", dataset="cifar10", epochs=20, lr=1e-3, augment=True, objective="ibp",
        objective_kwargs={"eps": 2.2 / 255, "kappa": 0.5, "full_eps": 2.2 / 255}, warmup=3128,
        robust_eps=2 / 255, ensemble_examples=500,
        description="Interval bound propagation training (Gowal et al. 2018) of the small CNN of Wong and "
                    "Kolter (2018) on CIFAR-10 for certified robustness at Linf eps 2/255: trained at 1.1 x "
                    "2/255, eps ramped up from 0 and kappa down from 1 to 0.5 over the first 8 epochs; random "
                    "crops and flips, Adam, one-cycle learning rate.",
    ),
    "mnist_gauss_025": Recipe(
        model="convsmall", dataset="mnist", epochs=4, lr=2e-3, objective="gaussian_noise",
        objective_kwargs={"sigma": 0.25}, smoothing_radii=(0.25, 0.5, 0.75, 1.0),
        description="Gaussian data augmentation (Cohen et al. 2019) at sigma 0.25, the base classifier of "
                    "randomised smoothing: cross-entropy on x + N(0, sigma^2 I), not clipped; Adam, one-cycle.",
    ),
    "mnist_gauss_050": Recipe(
        model="convsmall", dataset="mnist", epochs=4, lr=2e-3, objective="gaussian_noise",
        objective_kwargs={"sigma": 0.5}, smoothing_radii=(0.5, 1.0, 1.5, 2.0),
        description="Gaussian data augmentation (Cohen et al. 2019) at sigma 0.5, the base classifier of "
                    "randomised smoothing: cross-entropy on x + N(0, sigma^2 I), not clipped; Adam, one-cycle.",
    ),
    "cifar10_gauss_025": Recipe(
        model="convsmall", dataset="cifar10", epochs=10, lr=1e-3, augment=True, objective="gaussian_noise",
        objective_kwargs={"sigma": 0.25}, smoothing_radii=(0.25, 0.5, 0.75, 1.0),
        description="Gaussian data augmentation (Cohen et al. 2019) at sigma 0.25 of the small CNN of Wong and "
                    "Kolter (2018) on CIFAR-10, the base classifier of randomised smoothing: cross-entropy on "
                    "x + N(0, sigma^2 I), not clipped; random crops and flips, Adam, one-cycle.",
    ),
    "mnist_mlp": Recipe(
        model="mlp", dataset="mnist", epochs=8, lr=1e-3, model_kwargs={"hidden": (256, 256)},
        description="Standard training of a 784-256-256-10 ReLU MLP: Adam, one-cycle learning "
                    "rate, cross-entropy.",
    ),
}


def available() -> list[str]:
    """Names of the models whose weights are bundled."""
    return sorted(name for name in RECIPES if _weights_path(name).exists())


def _check_name(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"zoo model name must be one of {sorted(RECIPES)}, got {name!r}")
    return RECIPES[name]


def _weights_path(name: str, folder: Path = ZOO_DIR) -> Path:
    return folder / "weights" / f"{name}.pt"


def _card_path(name: str, folder: Path = ZOO_DIR) -> Path:
    return folder / "cards" / f"{name}.json"


def card(name: str) -> dict[str, object]:
    """The model card of bundled model ``name``."""
    _check_name(name)
    return json.loads(_card_path(name).read_text())


def dataset_of(name: str) -> str:
    """The dataset that bundled model ``name`` was trained on, e.g. ``"cifar10"``: chapters take a
    model name as their parameter and load the matching data with it."""
    return _check_name(name).dataset


def threat_model(name: str) -> LpBall | None:
    """The threat model in which bundled model ``name`` is trained to be robust and its card measured.

    Its recipe's ``robust_norm`` and ``robust_eps`` (the card's too) as an
    :class:`~robustdl.threat.LpBall`; ``None`` for a standard model.
    """
    recipe = _check_name(name)
    return None if recipe.robust_eps is None else LpBall(recipe.robust_norm, recipe.robust_eps)


def load(name: str, device: torch.device | str | None = None) -> nn.Module:
    """The bundled model ``name`` in eval mode, on ``device`` (default: the CPU)."""
    recipe = _check_name(name)
    path = _weights_path(name)
    if not path.exists():
        raise FileNotFoundError(f"no weights bundled for {name!r} at {path}; train them with "
                                f"`python -m robustdl.zoo train {name}`")
    return _stored(recipe, path).to(device or "cpu")


#: Test images attacked by the ensemble on a model card (APGD costs ~1000 gradients each, Square 5000 queries).
ENSEMBLE_EXAMPLES = 1000
#: The ensemble's members, as a card records them: AutoAttack's standard version less FAB-T.
ENSEMBLE = "APGD-CE, APGD-DLR, APGD-T (9 targets), Square (5000 queries); 100 iterations each"


def robust_metrics(
    model: nn.Module,
    dataset: str,
    threat: LpBall | float,
    ensemble_examples: int = ENSEMBLE_EXAMPLES,
    certify: tuple[str, ...] = ("ibp", "crown"),
) -> dict[str, object]:
    """Robust test accuracy in the ball ``threat``: PGD-40 on the whole test set, the ensemble on a part.

    ``threat`` is an :class:`~robustdl.threat.LpBall` (a bare float: the Linf ball of that radius).
    PGD-40 takes 40 steps of 0.01 (scaled by ``eps / 0.3``) from a random start, Madry et al.'s
    MNIST evaluation; the ensemble is :func:`ensemble_metrics`; on the same images, the accuracy
    certified by the bounds named in ``certify`` (IBP, CROWN-IBP, CROWN:
    :func:`~robustdl.verify.certified_accuracy`), a lower bound where the attacks give upper ones.
    Everything runs on the model's device.
    """
    ball = threat if isinstance(threat, LpBall) else LpBall("linf", threat)
    test = loader(dataset, "test", batch_size=500)
    pgd40 = partial(pgd, eps=ball.eps, norm=ball.name, steps=40, step_size=0.01 * ball.eps / 0.3)
    x, y = _first_test_images(model, dataset, ensemble_examples)
    bounds = {"ibp": ibp_margin, "crown_ibp": crown_ibp_margin, "crown": crown_margin}
    return {
        "robust_norm": ball.name,
        "robust_eps": ball.eps,
        "robust_accuracy_pgd40": evaluate(model, test, attack=pgd40, progress=False)["accuracy"],
        **ensemble_metrics(model, dataset, ball, ensemble_examples),
        # Sound lower bounds on robust accuracy, on the same images (robustdl.verify).
        **{f"certified_accuracy_{name}": certified_accuracy(model, x, y, ball, bound=bounds[name]) for name in certify},
    }


def _first_test_images(model: nn.Module, dataset: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test images and labels of ``dataset``, on the model's device."""
    where = next(model.parameters()).device
    return tuple(t[:n].to(where) for t in loader(dataset, "test", batch_size=500).dataset.tensors)


def ensemble_metrics(model: nn.Module, dataset: str, ball: LpBall,
                     examples: int = ENSEMBLE_EXAMPLES) -> dict[str, object]:
    """The accuracy left by :func:`~robustdl.evaluation.autoattack_like` at its standard strength
    (APGD and Square, :data:`ENSEMBLE`) on the first ``examples`` test images, seeded."""
    x, y = _first_test_images(model, dataset, examples)
    x_adv = autoattack_like(model, x, y, ball, generator=torch.Generator(x.device).manual_seed(0))
    return {"robust_accuracy_ensemble": accuracy(model, x_adv, y), "robust_accuracy_ensemble_examples": len(x),
            "ensemble": ENSEMBLE}


def measure(name: str, folder: Path = ZOO_DIR, device: torch.device | str = "cpu") -> dict[str, object]:
    """Re-measure the ensemble accuracy on bundled model ``name``'s card from its stored weights; rewrite the card.

    For a card made with a weaker ensemble (before the Square Attack joined it): the weights, the
    recipe, the training record, PGD-40 and the certificates (which depend on the weights alone)
    are left as they are; the ensemble's accuracy is replaced by :func:`ensemble_metrics`'
    (``python -m robustdl.zoo measure NAME``).
    """
    recipe, threat = _check_name(name), threat_model(name)
    if threat is None:
        raise ValueError(f"zoo model {name!r} has no threat model (robust_eps) to measure robustness in")
    path = _card_path(name, folder)
    model_card = json.loads(path.read_text())
    model = _stored(recipe, _weights_path(name, folder)).to(device)
    ensemble = ensemble_metrics(model, recipe.dataset, threat, recipe.ensemble_examples)
    stale = ("robust_accuracy_apgd_ensemble", "robust_accuracy_apgd_ensemble_examples", *ensemble)
    fields = [k for k in model_card if k not in stale]
    at = fields.index("robust_accuracy_pgd40") + 1 if "robust_accuracy_pgd40" in fields else len(fields)
    model_card = {**{k: model_card[k] for k in fields[:at]}, **ensemble, **{k: model_card[k] for k in fields[at:]}}
    path.write_text(json.dumps(model_card, indent=2) + "\n")
    return model_card


def _stored(recipe: Recipe, weights: Path) -> nn.Module:
    """The model of ``recipe`` with the float16 ``weights`` stored at that path, in eval mode, on the CPU."""
    model = build_model(recipe.model, recipe.dataset, **recipe.model_kwargs)
    model.load_state_dict({k: v.float() for k, v in torch.load(weights, map_location="cpu", weights_only=True).items()})
    return model.eval()


#: How a card measures randomised smoothing: CERTIFY's n0, n and alpha on the first ``examples`` test images.
SMOOTHING = {"examples": 100, "n0": 100, "n": 10_000, "alpha": 0.001}


def smoothing_metrics(model: nn.Module, dataset: str, sigma: float, radii: tuple[float, ...],
                      examples: int = 100, n0: int = 100, n: int = 10_000, alpha: float = 0.001) -> dict[str, object]:
    """Certified L2 accuracy of the model smoothed at ``sigma`` and, for comparison, CROWN's, at each of ``radii``.

    Randomised smoothing's CERTIFY (:func:`~robustdl.verify.certify`, seeded generator 0) with
    ``n0``, ``n``, ``alpha`` on the first ``examples`` test images, and CROWN on the base model in
    the L2 ball of each radius on the same images (a deterministic guarantee, for a different
    classifier). Runs on the model's device.
    """
    where = next(model.parameters()).device
    x, y = (t.to(where) for t in load_dataset(dataset, "test", subset=examples).tensors)
    cert = certify(model, x, sigma, n0=n0, n=n, alpha=alpha, generator=torch.Generator().manual_seed(0))
    return {
        "smoothing": {"sigma": sigma, "examples": len(x), "n0": n0, "n": n, "alpha": alpha,
                      "abstained": (cert.prediction < 0).sum().item() / len(x),
                      "max_certifiable_radius": round(float(certified_radius(alpha ** (1 / n), sigma)), 4)},
        "smoothed_certified_accuracy_l2": {str(r): smoothed_certified_accuracy(cert, y, r) for r in radii},
        "crown_certified_accuracy_l2": {str(r): certified_accuracy(model, x, y, LpBall("l2", r)) for r in radii},
    }


def train(
    name: str,
    folder: Path = ZOO_DIR,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    checkpoint: Path | None = None,
) -> dict[str, object]:
    """Train bundled model ``name`` by its recipe; write its weights and card under ``folder``.

    The accuracies on the card are measured on the stored (float16) weights. With
    ``checkpoint``, training writes a checkpoint after every epoch and resumes from it.
    """
    recipe = _check_name(name)
    seed_everything(recipe.seed)
    model = build_model(recipe.model, recipe.dataset, **recipe.model_kwargs).to(device)
    train_loader = loader(recipe.dataset, "train", batch_size=recipe.batch_size, seed=recipe.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=recipe.epochs * recipe.replays * len(train_loader))
    objective = make_objective(recipe.objective, recipe.warmup, **recipe.objective_kwargs)
    history = fit(model, train_loader, recipe.epochs, optimizer, objective, scheduler=scheduler,
                  progress=progress, replays=recipe.replays, checkpoint=checkpoint,
                  transform=random_crop_flip if recipe.augment else None)
    wall_time = sum(h["seconds"] for h in history)  # every epoch's, across resumes from the checkpoint

    weights = _weights_path(name, folder)
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().half() for k, v in model.state_dict().items()}, weights)
    stored = _stored(recipe, weights).to(device)
    metrics = evaluate(stored, loader(recipe.dataset, "test", batch_size=500), progress=progress)
    threat = threat_model(name)
    robustness = {} if threat is None else robust_metrics(
        stored, recipe.dataset, threat, recipe.ensemble_examples, recipe.certify)
    if recipe.smoothing_radii:
        robustness |= smoothing_metrics(stored, recipe.dataset, float(recipe.objective_kwargs["sigma"]),  # type: ignore[arg-type]
                                        recipe.smoothing_radii, **SMOOTHING)
    model_card = {
        "name": name,
        "recipe": asdict(recipe),
        "data": f"{recipe.dataset}: the whole train split ({len(train_loader.dataset)} images), "
                f"{'random crops and flips' if recipe.augment else 'no augmentation'}; tested on the whole test split",
        "train_loss_per_epoch": [round(h["train_loss"], 4) for h in history],
        "wall_time_s": round(wall_time, 1),
        "device": f"{device} ({platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} threads)",
        "test_accuracy": metrics["accuracy"],
        "test_loss": round(metrics["loss"], 4),
        **robustness,
        "parameters": sum(p.numel() for p in stored.parameters()),
        "weights_dtype": "float16",
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "torch_version": torch.__version__,
        "command": f"python -m robustdl.zoo train {name}",
    }
    card_path = _card_path(name, folder)
    card_path.parent.mkdir(parents=True, exist_ok=True)
    card_path.write_text(json.dumps(model_card, indent=2) + "\n")
    return model_card
