"""Bundled models: they load safely, their cards are true, FGSM matches torchattacks on them."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from torch.utils.data import TensorDataset

from robustdl import accuracy, zoo
from robustdl.attacks import fgsm, pgd
from robustdl.data import data_root, load_dataset
from robustdl.evaluation import autoattack_like
from robustdl.train import evaluate
from robustdl.verify import (
    certified_accuracy,
    certified_radius,
    certify,
    clopper_pearson_lower,
    ibp_margin,
    smoothed_certified_accuracy,
)

needs_cifar = pytest.mark.skipif(
    not (data_root() / "cifar-10-batches-py").exists() and not os.environ.get("CI"), reason="no offline CIFAR-10")


@pytest.fixture(scope="module")
def mnist_test(mnist):
    return TensorDataset(*mnist())


def test_bundled_models_and_their_size():
    assert {"mnist_smallcnn", "mnist_mlp"} <= set(zoo.available())
    total = sum(zoo._weights_path(name).stat().st_size for name in zoo.available())
    assert total < 25 * 2**20  # all bundled weights under 25 MB (two CIFAR-10 ConvLarge: 4.7 MB each)


@pytest.mark.parametrize("name", zoo.available())
def test_card_matches_the_weights(name):
    card = zoo.card(name)
    assert card["name"] == name and card["command"] == f"python -m robustdl.zoo train {name}"
    assert hashlib.sha256(zoo._weights_path(name).read_bytes()).hexdigest() == card["weights_sha256"]
    assert {"recipe", "wall_time_s", "test_accuracy", "data"} <= set(card)


@pytest.mark.mnist
@pytest.mark.parametrize(("name", "minimum"), [("mnist_smallcnn", 0.99), ("mnist_lenet", 0.985), ("mnist_mlp", 0.98)])
def test_card_accuracy_is_reproduced_on_the_whole_test_split(name, minimum, mnist_test):
    model = zoo.load(name)
    loader = torch.utils.data.DataLoader(mnist_test, batch_size=1000)
    accuracy = evaluate(model, loader)["accuracy"]
    assert accuracy == pytest.approx(zoo.card(name)["test_accuracy"], abs=1e-4)
    assert accuracy >= minimum


#: Adversarially trained models and the least robust accuracy under the ensemble (AutoAttack's standard
#: strength, Square included) their cards may report: PGD-AT at Madry et al.'s mark (below), TRADES and
#: the two-step model at their measured marks. Feature scattering makes no robustness claim: its single-step
#: training gives none here.
ROBUST = {"mnist_pgd_at": 0.865, "mnist_trades": 0.87, "mnist_fast": 0.55, "mnist_feature_scattering": 0.0}


@pytest.mark.parametrize("name", [n for n in ROBUST if n in zoo.available()])
def test_robust_cards_report_pgd40_and_the_ensemble(name):
    card = zoo.card(name)
    assert card["robust_eps"] == 0.3 and card["recipe"]["objective"] != "standard"
    assert card["ensemble"] == zoo.ENSEMBLE and card["robust_accuracy_ensemble_examples"] == 1000
    # The ensemble is the stronger evaluation: never above PGD-40 by more than its sampling error.
    assert card["robust_accuracy_ensemble"] <= card["robust_accuracy_pgd40"] + 0.02
    assert card["robust_accuracy_ensemble"] >= ROBUST[name] and card["test_accuracy"] > 0.95


#: Madry et al.'s MNIST model under AutoAttack (Croce and Hein 2020): 98.53% clean, 88.50% robust at 0.3
#: (89.6% under the authors' own attacks). Ours is measured by an ensemble of the same strength on 1000 images,
#: whose standard error near 0.885 is 1.0 point.
MADRY_AUTOATTACK = 0.885


def test_pgd_training_meets_madrys_mark():
    card = zoo.card("mnist_pgd_at")
    assert card["test_accuracy"] >= 0.98
    assert card["robust_accuracy_ensemble"] >= MADRY_AUTOATTACK - 0.02  # two standard errors; measured: 0.883


@pytest.mark.mnist
@pytest.mark.parametrize("name", [n for n in ROBUST if n in zoo.available()])
def test_robust_cards_are_reproduced_on_a_sample(name, mnist_test):
    """PGD-40 on the first 300 test images agrees with the card's whole-test-set number (binomial error)."""
    model = zoo.load(name)
    x, y = (t[:300] for t in mnist_test.tensors)
    x_adv = pgd(model, x, y, eps=0.3, steps=40, step_size=0.01, generator=torch.Generator().manual_seed(0))
    card = zoo.card(name)
    robust = accuracy(model, x_adv, y)
    assert robust == pytest.approx(card["robust_accuracy_pgd40"], abs=0.06)  # > 3 standard errors at 300


@pytest.mark.mnist
@pytest.mark.parametrize("name", ["mnist_pgd_at", "mnist_trades"])
def test_the_ensemble_mark_is_reproduced_on_a_sample(name, mnist_test):
    """The full-strength ensemble on the first 100 of the card's 1000 images: within sampling error of the card.

    The card's 1000 images start with these 100, so the two agree to within 3 standard errors of a
    proportion near 0.9 at n = 100 (0.09) whatever the other 900 hold.
    """
    model = zoo.load(name)
    x, y = (t[:100] for t in mnist_test.tensors)
    robust = accuracy(model, autoattack_like(model, x, y, 0.3, generator=torch.Generator().manual_seed(0)), y)
    assert robust == pytest.approx(zoo.card(name)["robust_accuracy_ensemble"], abs=0.09)
    assert robust <= accuracy(model, x, y)


@pytest.mark.mnist
@pytest.mark.skipif("mnist_ibp" not in zoo.available(), reason="mnist_ibp is not bundled")
def test_ibp_card_is_certified_and_its_certificate_reproduced(mnist_test):
    """IBP training certifies at 0.3 (Gowal et al. 2018); on the card's 1000 images no certified accuracy
    exceeds the attacked one, and the IBP certificate is recomputed from the weights."""
    card = zoo.card("mnist_ibp")
    assert card["recipe"]["objective"] == "ibp" and card["robust_eps"] == 0.3
    for bound in ("ibp", "crown"):
        assert card[f"certified_accuracy_{bound}"] <= card["robust_accuracy_ensemble"]
    assert card["certified_accuracy_ibp"] >= 0.85 and card["test_accuracy"] >= 0.94  # measured: 0.856, 0.944
    x, y = (t[:1000] for t in mnist_test.tensors)
    certified = certified_accuracy(zoo.load("mnist_ibp"), x, y, 0.3, bound=ibp_margin, batch_size=500)
    assert certified == pytest.approx(card["certified_accuracy_ibp"], abs=2e-3)


SMOOTHED = [name for name, recipe in zoo.RECIPES.items() if recipe.smoothing_radii and name in zoo.available()]


@pytest.mark.parametrize("name", SMOOTHED)
def test_smoothing_cards_state_their_certificates(name):
    """Cohen et al.'s certificates on the card: n0, n, alpha stated, no radius beyond what n samples can
    certify, and at the smallest radius smoothing certifies more than CROWN does on the same network."""
    card = zoo.card(name)
    s, smoothed, crown = card["smoothing"], card["smoothed_certified_accuracy_l2"], card["crown_certified_accuracy_l2"]
    assert card["recipe"]["objective"] == "gaussian_noise" and s["sigma"] == card["recipe"]["objective_kwargs"]["sigma"]
    assert {"examples", "n0", "n", "alpha", "abstained"} <= set(s)
    radii = [float(r) for r in smoothed]
    assert radii == list(card["recipe"]["smoothing_radii"]) and list(crown) == list(smoothed)
    values = list(smoothed.values())
    assert values == sorted(values, reverse=True)
    assert all(a == 0 for r, a in zip(radii, values, strict=True) if r > s["max_certifiable_radius"])
    assert smoothed[str(radii[0])] > crown[str(radii[0])]
    assert smoothed[str(radii[0])] <= card["test_accuracy"] + 0.05


@pytest.mark.parametrize("name", [n for n in SMOOTHED if zoo.dataset_of(n) == "mnist"])
def test_smoothing_card_is_reproduced_on_a_sample(name, mnist):
    """CERTIFY on the first 20 of the card's images with n = 2000 (its radius cap is above the card's smallest
    radius) certifies about as many at that radius as the card (binomial error of 20 images)."""
    card = zoo.card(name)
    sigma, radius = card["smoothing"]["sigma"], card["recipe"]["smoothing_radii"][0]
    x, y = mnist(20)
    cert = certify(zoo.load(name), x, sigma, n0=100, n=2000, generator=torch.Generator().manual_seed(0))
    assert certified_radius(clopper_pearson_lower(2000, 2000, 0.001), sigma) > radius
    assert smoothed_certified_accuracy(cert, y, radius) >= card["smoothed_certified_accuracy_l2"][str(radius)] - 0.15


def test_load_is_weights_only_and_in_eval_mode(monkeypatch):
    calls = []
    original = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = zoo.load("mnist_mlp")
    assert calls == [True] and not model.training


def test_unknown_name_is_rejected():
    with pytest.raises(ValueError, match="zoo model name"):
        zoo.load("imagenet_resnet50")


def test_train_recipe_writes_weights_and_card(tmp_path, monkeypatch):
    """The recipe machinery end to end, on sklearn digits with a one-epoch MLP recipe."""
    monkeypatch.setitem(zoo.RECIPES, "digits_mlp", zoo.Recipe(
        model="mlp", dataset="digits", epochs=3, lr=1e-2, batch_size=64, model_kwargs={"hidden": (32,)}))
    card = zoo.train("digits_mlp", folder=tmp_path, progress=False)
    assert (tmp_path / "weights" / "digits_mlp.pt").exists() and (tmp_path / "cards" / "digits_mlp.json").exists()
    assert card["test_accuracy"] > 0.8 and card["weights_dtype"] == "float16"
    again = zoo.train("digits_mlp", folder=tmp_path / "again", progress=False)
    assert again["weights_sha256"] == card["weights_sha256"]  # reproducible from its seed


@pytest.mark.mnist
def test_fgsm_drives_the_standard_model_down(mnist_test):
    model = zoo.load("mnist_smallcnn")
    x, y = mnist_test.tensors[0][:500], mnist_test.tensors[1][:500]
    loader = [(x, y)]
    clean = evaluate(model, loader)["accuracy"]
    attacked = [evaluate(model, loader, attack=lambda m, a, b, e=eps: fgsm(m, a, b, e))["accuracy"]
                for eps in (0.1, 0.2, 0.3)]
    assert clean > 0.98
    assert attacked[0] < clean and attacked[1] < 0.5 and attacked[2] < 0.15  # measured: 0.83, 0.29, 0.07


@pytest.mark.mnist
@pytest.mark.parametrize("name", ["mnist_smallcnn", "mnist_mlp"])
def test_fgsm_matches_torchattacks(name, mnist_test):
    """torchattacks.FGSM computes x + eps * sign(grad) clipped to [0, 1]: the same images."""
    torchattacks = pytest.importorskip("torchattacks")
    model = zoo.load(name)
    x, y = mnist_test.tensors[0][:300], mnist_test.tensors[1][:300]
    ours = fgsm(model, x, y, eps=0.15)
    theirs = torchattacks.FGSM(model, eps=0.15)(x, y)
    assert (ours - theirs).abs().max() < 1e-6


#: The CIFAR-10 models and the marks their cards must reach (issue 13): a standard model of at least
#: 75% clean accuracy, a fast-AT model robust at 8/255, an IBP model certified at 2/255. Wong et al.
#: (2018) certify their small network at 2/255 on about 47% of the test set (52.75% robust error).
CIFAR10 = {
    "cifar10_convlarge": {"eps": 8 / 255, "clean": 0.75},
    "cifar10_fast_at": {"eps": 8 / 255, "clean": 0.55, "ensemble": 0.25},
    "cifar10_ibp": {"eps": 2 / 255, "clean": 0.45, "certified_accuracy_ibp": 0.30},
}


@pytest.mark.parametrize("name", [n for n in CIFAR10 if n in zoo.available()])
def test_cifar10_cards_meet_their_marks(name):
    card, mark = zoo.card(name), CIFAR10[name]
    assert zoo.dataset_of(name) == "cifar10" and card["robust_eps"] == pytest.approx(mark["eps"])
    assert card["test_accuracy"] >= mark["clean"]
    # The ensemble is the stronger attack: never above PGD-40 by more than its sampling error.
    assert card["robust_accuracy_ensemble"] <= card["robust_accuracy_pgd40"] + 0.03
    assert card["robust_accuracy_ensemble"] >= mark.get("ensemble", 0.0)
    if "certified_accuracy_ibp" in mark:  # a certificate is a lower bound on what any attack leaves
        assert mark["certified_accuracy_ibp"] <= card["certified_accuracy_ibp"] <= card["robust_accuracy_ensemble"]


@needs_cifar
@pytest.mark.parametrize("name", [n for n in CIFAR10 if n in zoo.available()])
def test_cifar10_cards_are_reproduced_on_a_sample(name):
    """Clean accuracy and PGD-40 on the first 300 CIFAR-10 test images agree with the card (binomial error)."""
    model, card = zoo.load(name), zoo.card(name)
    x, y = (t[:300] for t in load_dataset("cifar10", "test").tensors)
    eps = card["robust_eps"]
    x_adv = pgd(model, x, y, eps=eps, steps=40, step_size=eps / 30, generator=torch.Generator().manual_seed(0))
    clean, robust = accuracy(model, x, y), accuracy(model, x_adv, y)
    assert clean == pytest.approx(card["test_accuracy"], abs=0.085)  # > 3 standard errors at 300
    assert robust == pytest.approx(card["robust_accuracy_pgd40"], abs=0.085)


@pytest.mark.parametrize("name", zoo.available())
def test_every_card_names_its_threat_model(name):
    """A robust model's card says in which ball it was measured: norm and radius, as an LpBall."""
    card, threat = zoo.card(name), zoo.threat_model(name)
    if threat is None:
        assert "robust_eps" not in card and "robust_norm" not in card
    else:
        assert (card["robust_norm"], card["robust_eps"]) == (threat.name, threat.eps)
        assert card["recipe"]["robust_norm"] == threat.name
