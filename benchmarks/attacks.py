"""Time robustdl's attacks against torchattacks on one model and one batch.

    ROBUSTDL_DATA=data ROBUSTDL_PROGRESS=0 python benchmarks/attacks.py [--n 256] [--eps 0.1] [--only PGD]

Both libraries attack the bundled ``mnist_smallcnn`` on the same MNIST test images, with equal
settings, on CUDA when available (else the CPU). Each attack is timed ``--repeats`` times, the
attacks interleaved in a shuffled order, and the median is reported. The reference is the
floor any gradient attack of ``steps`` iterations pays: ``steps`` forward and backward passes
on the batch. At ``eps`` = 0.1 (the default) the model keeps about 65% accuracy under PGD: our
attacks stop differentiating the examples they have broken, torchattacks' do not. At eps 0.01
(the extra PGD row) almost nothing is broken, so that row measures the bookkeeping alone.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn

from robustdl import accuracy, zoo
from robustdl.attacks import apgd, cw_l2, fgsm, pgd
from robustdl.data import load_dataset
from robustdl.train import device


@dataclass
class Row:
    """One attack: our call, torchattacks' call, and the gradient evaluations it needs."""

    name: str
    ours: Callable[[], Tensor]
    theirs: Callable[[], Tensor]
    steps: int


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def reference(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> Callable[[], None]:
    """``steps`` forward and backward passes for the input gradient, and nothing else."""

    def run() -> None:
        for _ in range(steps):
            x_grad = x.detach().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(x_grad), y), x_grad)

    return run


def rows(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> list[Row]:
    alpha = 2.5 * eps / 40
    return [
        Row("FGSM", lambda: fgsm(model, x, y, eps), lambda: torchattacks.FGSM(model, eps=eps)(x, y), 1),
        Row("PGD-40", lambda: pgd(model, x, y, eps, steps=40, step_size=alpha),
            lambda: torchattacks.PGD(model, eps=eps, alpha=alpha, steps=40)(x, y), 40),
        # Almost nothing is broken at eps 0.01: no early exit, the time is the iteration's overhead.
        Row("PGD-40 at eps 0.01", lambda: pgd(model, x, y, 0.01, steps=40, step_size=0.01 / 16),
            lambda: torchattacks.PGD(model, eps=0.01, alpha=0.01 / 16, steps=40)(x, y), 40),
        Row("APGD-CE-100", lambda: apgd(model, x, y, eps, steps=100),
            lambda: torchattacks.APGD(model, eps=eps, steps=100, loss="ce")(x, y), 100),
        # One constant c = 1 and 50 Adam steps: torchattacks.CW's defaults.
        Row("C&W-L2-50", lambda: cw_l2(model, x, y, steps=50, lr=0.01, binary_search_steps=1, c_init=1.0,
                                       abort_early=False, progress=False),
            lambda: torchattacks.CW(model, c=1.0, kappa=0.0, steps=50, lr=0.01)(x, y), 50),
    ]


def median_seconds(calls: dict[str, Callable[[], object]], repeats: int, dev: torch.device) -> dict[str, float]:
    """Median wall time of each call over ``repeats`` rounds, in a shuffled order each round."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():  # warm-up
        call()
    order = list(calls)
    for _ in range(repeats):
        random.shuffle(order)
        for name in order:
            synchronize(dev)
            start = time.perf_counter()
            calls[name]()
            synchronize(dev)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="batch size (MNIST test images)")
    parser.add_argument("--eps", type=float, default=0.1, help="Linf radius")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--only", default="", help="time only the attacks whose name starts with this (e.g. PGD)")
    args = parser.parse_args()
    dev = device()
    random.seed(0)
    torch.manual_seed(0)
    model = zoo.load("mnist_smallcnn").to(dev)
    x, y = (t.to(dev) for t in load_dataset("mnist", "test", subset=args.n).tensors)
    table = [row for row in rows(model, x, y, args.eps) if row.name.startswith(args.only)]
    calls: dict[str, Callable[[], object]] = {"reference-40": reference(model, x, y, 40)}
    for row in table:
        calls |= {f"{row.name}/ours": row.ours, f"{row.name}/torchattacks": row.theirs}
    seconds = median_seconds(calls, args.repeats, dev)
    per_step = seconds["reference-40"] / 40
    print(f"{len(x)} MNIST test images, mnist_smallcnn, Linf eps {args.eps}, {dev}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}; reference = steps x (forward + backward) "
          f"= steps x {1000 * per_step:.1f} ms\n")
    print("| attack | ours (s) | torchattacks (s) | ours / torchattacks | ours / reference | "
          "robust acc. ours | robust acc. torchattacks |")
    print("|---|---|---|---|---|---|---|")
    for row in table:
        ours, theirs = seconds[f"{row.name}/ours"], seconds[f"{row.name}/torchattacks"]
        print(f"| {row.name} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f} | {ours / (row.steps * per_step):.3f} | "
              f"{accuracy(model, row.ours(), y):.3f} | {accuracy(model, row.theirs(), y):.3f} |")


if __name__ == "__main__":
    main()
