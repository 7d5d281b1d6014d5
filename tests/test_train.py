"""The training loop, evaluation, seeding and device choice, on tiny synthetic data."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from robustdl.attacks import fgsm
from robustdl.data import gaussian_clusters
from robustdl.models import build_model
from robustdl.train import (
    device,
    distributed,
    evaluate,
    fit,
    load_checkpoint,
    run_epoch,
    seed_everything,
    standard_loss,
)
from robustdl.train.adversarial import EpsilonRamp, pgd_at_loss


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
    assert all(h["seconds"] > 0 for h in history)  # each epoch's training time, summed on model cards
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


def ramped_pgd_at() -> EpsilonRamp:
    return EpsilonRamp(lambda eps: functools.partial(pgd_at_loss, eps=eps, steps=3), eps=0.1, warmup=10)


def train_with_checkpoint(epochs: int, path, total_epochs: int = 4) -> torch.Tensor:
    """A run whose every random part (init, order, random starts, ramp) must survive a resume."""
    seed_everything(5)
    model = small_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loader = clusters_loader()
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.01, total_steps=total_epochs * len(loader))
    fit(model, loader, epochs, optimizer, ramped_pgd_at(), scheduler=scheduler, checkpoint=path)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_resuming_from_a_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    uninterrupted = train_with_checkpoint(4, tmp_path / "a.pt")
    train_with_checkpoint(2, tmp_path / "b.pt")  # interrupted after two epochs
    resumed = train_with_checkpoint(4, tmp_path / "b.pt")  # fresh objects, resumes at epoch 3
    assert torch.equal(resumed, uninterrupted)
    assert load_checkpoint(tmp_path / "b.pt")["epoch"] == 4


def test_a_finished_checkpoint_trains_no_further(tmp_path):
    first = train_with_checkpoint(2, tmp_path / "c.pt", total_epochs=2)
    again = train_with_checkpoint(2, tmp_path / "c.pt", total_epochs=2)
    assert torch.equal(first, again)


def test_a_callback_can_stop_training():
    seed_everything(0)
    model = small_mlp()
    history = fit(model, clusters_loader(), 10, torch.optim.SGD(model.parameters(), lr=0.1),
                  callbacks=[lambda m, record: record["epoch"] == 3])
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_replays_repeat_each_batch():
    calls = []

    def objective(model, x, y):
        calls.append(x[0, 0].item())
        return standard_loss(model, x, y)

    model = small_mlp()
    run_epoch(model, clusters_loader(shuffle=False), objective, torch.optim.SGD(model.parameters(), lr=0.1), replays=3)
    assert len(calls) == 24 and calls[0] == calls[1] == calls[2] != calls[3]


def test_fit_rejects_bad_epochs_and_replays():
    model = small_mlp()
    with pytest.raises(ValueError, match="epochs"):
        fit(model, clusters_loader(), 0, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="replays"):
        fit(model, clusters_loader(), 1, torch.optim.SGD(model.parameters(), lr=0.1), replays=0)


def test_torchrun_with_two_processes_matches_one_process(tmp_path):
    """The same loop under torchrun (gloo, 2 ranks x 8 examples) takes the steps of one process with 16."""
    script = Path(__file__).with_name("ddp_fit.py")
    spec = importlib.util.spec_from_file_location("ddp_fit", script)
    ddp_fit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ddp_fit)
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    ddp_fit.run(single, batch_size=16)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROBUSTDL_PROGRESS": "0"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(script), str(multi)], check=True, env=env, timeout=300, capture_output=True)
    weights = {k: torch.load(d / "weights.pt", weights_only=True) for k, d in (("single", single), ("multi", multi))}
    for name, value in weights["single"].items():
        torch.testing.assert_close(weights["multi"][name], value, rtol=1e-5, atol=1e-6)
    histories = [json.loads((d / "history.json").read_text()) for d in (single, multi)]
    for one, two in zip(*histories, strict=True):
        assert one.keys() == two.keys()
        for key in one.keys() - {"seconds"}:
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6)
    assert sorted(p.name for p in multi.iterdir()) == ["checkpoint.pt", "history.json", "weights.pt"]


def test_distributed_helpers_without_a_process_group():
    model = small_mlp()
    assert distributed.wrap(model) is model and distributed.unwrap(model) is model
    assert distributed.rank() == 0 and distributed.is_main_process()
    assert distributed.all_sum(1.0, 2) == (1.0, 2)
    with pytest.raises(RuntimeError, match="torchrun"):
        if "RANK" in os.environ:
            pytest.skip("running under torchrun")
        distributed.setup()


def test_transform_maps_each_training_batch_before_the_objective():
    seen = []

    def objective(model, x, y):
        seen.append(x)
        return standard_loss(model, x, y)

    model = small_mlp()
    fit(model, clusters_loader(shuffle=False), 1, torch.optim.SGD(model.parameters(), lr=0.1), objective,
        transform=lambda x: 1 - x)
    first = next(iter(clusters_loader(shuffle=False)))[0]
    assert torch.equal(seen[0], 1 - first)
