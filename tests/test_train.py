"""The training loop, evaluation, seeding and device choice, on tiny synthetic data."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.data import DataLoader

from robustdl.attacks import fgsm
from robustdl.data import gaussian_clusters
from robustdl.models import build_model
from robustdl.train import device, evaluate, fit, run_epoch, seed_everything, standard_loss


def clusters_loader(seed: int = 0, shuffle: bool = True) -> DataLoader:
    return DataLoader(gaussian_clusters(400, classes=3, seed=seed), batch_size=50, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))


def small_mlp() -> torch.nn.Module:
    return build_model("mlp", "points", hidden=(32,), classes=3)


def test_fit_learns_separable_clusters_and_the_loss_decreases():
    seed_everything(0)
    model = small_mlp()
    history = fit(model, clusters_loader(), 15, torch.optim.Adam(model.parameters(), lr=0.02),
                  test_loader=clusters_loader(seed=1, shuffle=False))
    losses = [h["train_loss"] for h in history]
    assert losses[-1] < 0.5 * losses[0]
    assert history[-1]["test_accuracy"] > 0.95
    assert not model.training  # fit leaves the model ready for evaluation


def test_the_objective_is_a_plug_in():
    """The loop calls the objective it is given on every batch, and minimises what it returns."""
    calls = []

    def objective(model, x, y):
        calls.append(len(y))
        return standard_loss(model, x, y)

    model = small_mlp()
    run_epoch(model, clusters_loader(), objective, torch.optim.SGD(model.parameters(), lr=0.1))
    assert sum(calls) == 400 and len(calls) == 8


def test_seed_everything_makes_training_reproducible():
    def train_once() -> torch.Tensor:
        seed_everything(3)
        model = small_mlp()
        fit(model, clusters_loader(), 2, torch.optim.SGD(model.parameters(), lr=0.1))
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(train_once(), train_once())


def test_evaluate_under_attack_and_mode_restored():
    seed_everything(0)
    model = small_mlp()
    fit(model, clusters_loader(), 10, torch.optim.Adam(model.parameters(), lr=0.02))
    model.train()
    clean = evaluate(model, clusters_loader(shuffle=False))
    attacked = evaluate(model, clusters_loader(shuffle=False), attack=functools.partial(fgsm, eps=0.3))
    assert set(clean) == {"accuracy", "loss"}
    assert attacked["accuracy"] < clean["accuracy"] and attacked["loss"] > clean["loss"]
    assert model.training


def test_run_epoch_needs_an_optimizer():
    with pytest.raises(ValueError, match="optimizer"):
        run_epoch(small_mlp(), clusters_loader())


def test_evaluate_rejects_an_empty_loader():
    empty = DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="empty"):
        evaluate(small_mlp(), empty)


def test_device_is_cpu_without_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert device() == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_prefers_cuda_and_training_runs_there():
    assert device().type == "cuda"
    model = small_mlp().to("cuda")
    fit(model, clusters_loader(), 1, torch.optim.SGD(model.parameters(), lr=0.1))
    assert evaluate(model, clusters_loader())["accuracy"] > 0.3
