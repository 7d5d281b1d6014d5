"""Train a tiny model with the one loop, in one process or under torchrun (tests/test_train.py).

``torchrun --standalone --nproc_per_node=2 tests/ddp_fit.py OUT`` trains with a batch of 8 per
rank; :func:`run` in a single process with a batch of 16 does the same optimiser steps.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import torch

from robustdl.data import gaussian_clusters
from robustdl.models import build_model
from robustdl.train import distributed, fit, seed_everything
from robustdl.train.adversarial import fast_at_loss

#: FGSM training without random start: deterministic, so every rank computes what one process would.
OBJECTIVE = partial(fast_at_loss, eps=0.05, step_size=0.05, random_start=False)


def run(out: Path, batch_size: int) -> None:
    seed_everything(0)
    model = distributed.wrap(build_model("mlp", "points", hidden=(16,), classes=3))
    data = distributed.loader(gaussian_clusters(128, classes=3, seed=0), batch_size=batch_size, shuffle=False)
    history = fit(model, data, 3, torch.optim.SGD(model.parameters(), lr=0.5), OBJECTIVE,
                  test_loader=data, checkpoint=out / "checkpoint.pt")
    if distributed.is_main_process():
        torch.save(distributed.unwrap(model).state_dict(), out / "weights.pt")
        (out / "history.json").write_text(json.dumps(history))


if __name__ == "__main__":
    distributed.setup()
    try:
        run(Path(sys.argv[1]), batch_size=8)
    finally:
        distributed.cleanup()
