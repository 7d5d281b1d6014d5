"""Time robustdl's verifiers: IBP and CROWN on ConvSmall/MNIST, the exact MILP on a small MLP.

    ROBUSTDL_DATA=data ROBUSTDL_PROGRESS=0 python benchmarks/verify.py [--n 100] [--milp-n 10] [--threads 1]

IBP and CROWN (with CROWN's own intermediate bounds, and with IBP's: CROWN-IBP) bound the
margins of the bundled ConvSmall models on the first ``--n`` MNIST test images, 50 at a time,
on CUDA when available (else the CPU); each is timed ``--repeats`` times and the median is
reported as examples per second, with the accuracy each certifies. The exact MILP (HiGHS)
minimises all nine margins of a 64-32-16-10 ReLU MLP trained here on sklearn's 8x8 digits,
one example at a time; its time grows with the number of unstable ReLUs (shown), i.e. with eps.

When ``auto_LiRPA`` is importable, IBP and CROWN are also run by auto_LiRPA on the same margins
(its ``BoundedModule`` built once, outside the timing), interleaved with ours, and the table adds
its speed, our time over its time, and on how many margins our lower bound is equal or tighter
(within 1e-4). Without it those columns are left out. For a fair single-core comparison run with
``--threads 1``. Where auto_LiRPA's batched call fails (0.7.1 raises a shape mismatch in its patches
mode on mnist_pgd_at at eps 0.3) it bounds one example at a time, marked * in its speed column.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from robustdl import zoo
from robustdl.data import load_dataset, loader
from robustdl.models import build_model
from robustdl.train import device, fit, seed_everything
from robustdl.verify import (
    certified_accuracy,
    crown_bounds,
    crown_margin,
    exact_margin,
    ibp_margin,
    margin_spec,
    preactivation_bounds,
)


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def crown_ibp_margin(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """CROWN's backward pass over IBP's intermediate bounds (CROWN-IBP)."""
    return crown_bounds(model, x, eps, spec=margin_spec(y, 10).to(x), intermediate="ibp")[0]


BOUNDS: dict[str, Callable[[nn.Module, Tensor, Tensor, float], Tensor]] = {
    "IBP": ibp_margin, "CROWN-IBP": crown_ibp_margin, "CROWN": crown_margin}
#: auto_LiRPA's name for the methods it shares with us.
LIRPA_METHODS = {"IBP": "IBP", "CROWN": "CROWN"}


def lirpa_margin(model: nn.Module, method: str) -> Callable[[nn.Module, Tensor, Tensor, float], Tensor] | None:
    """auto_LiRPA's lower bounds on the same margins (Linf ball within [0, 1]), or None without auto_LiRPA."""
    try:
        from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
    except ImportError:
        return None
    bounded: dict[tuple, nn.Module] = {}

    def batch_margin(x: Tensor, y: Tensor, eps: float) -> Tensor:
        key = (x.shape[1:], x.device)
        if key not in bounded:  # built once: tracing the graph is not part of bounding
            bounded[key] = BoundedModule(model, torch.zeros_like(x[:1]), verbose=0)
        ball = PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1))
        lower, _ = bounded[key].compute_bounds(x=(BoundedTensor(x, ball),), C=margin_spec(y, 10).to(x),
                                               method=method, bound_upper=False)
        return lower.detach()

    def margin(_: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
        if (id(model), method, eps) not in UNBATCHED:
            try:
                return batch_margin(x, y, eps)
            except RuntimeError:  # auto_LiRPA 0.7.1's patches mode fails on some batches (a shape mismatch)
                UNBATCHED.add((id(model), method, eps))
        return torch.cat([batch_margin(x[i:i + 1], y[i:i + 1], eps) for i in range(len(x))])

    return margin


#: (model id, method, eps) where auto_LiRPA's batched call failed: it bounds those one example at a time.
UNBATCHED: set[tuple[int, str, float]] = set()


def median_seconds(call: Callable[[], object], repeats: int, dev: torch.device) -> float:
    times = []
    for _ in range(repeats):
        synchronize(dev)
        start = time.perf_counter()
        call()
        synchronize(dev)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bound_table(names: list[str], n: int, eps_values: list[float], repeats: int, dev: torch.device) -> None:
    x, y = (t.to(dev) for t in load_dataset("mnist", "test", subset=n).tensors)
    print(f"Bounds on ConvSmall (MNIST, first {n} test images, batches of 50), {dev}, "
          f"{torch.get_num_threads()} threads, median of {repeats} (CROWN-IBP, CROWN: interleaved with auto_LiRPA "
          f"when it is importable)\n")
    header = "| model | eps | bound | examples / s | certified accuracy |"
    compare = lirpa_margin(nn.Identity(), "IBP") is not None
    if compare:
        header += " auto_LiRPA examples / s | time ours / auto_LiRPA | ours equal or tighter |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for name in names:
        model = zoo.load(name, dev)
        for eps in eps_values:
            for label, bound in BOUNDS.items():
                ours = partial(bound, model, x, y, eps)
                reference = lirpa_margin(model, LIRPA_METHODS[label]) if label in LIRPA_METHODS else None
                rounds = repeats if label == "IBP" or reference is not None else 1
                if reference is not None:  # builds auto_LiRPA's graph, and warms both up, before the timing
                    tighter = int((ours() >= reference(model, x, y, eps) - 1e-4).sum())
                seconds, their_seconds = [], []
                for _ in range(rounds):  # interleaved, so that a noisy machine slows both alike
                    seconds.append(median_seconds(ours, 1, dev))
                    if reference is not None:
                        their_seconds.append(median_seconds(partial(reference, model, x, y, eps), 1, dev))
                mine, accuracy = statistics.median(seconds), certified_accuracy(model, x, y, eps, bound=bound)
                row = f"| {name} | {eps} | {label} | {n / mine:.1f} | {accuracy:.3f} |"
                if compare:
                    if reference is None:
                        row += " | | |"
                    else:
                        theirs = statistics.median(their_seconds)
                        alone = "*" if (id(model), LIRPA_METHODS[label], eps) in UNBATCHED else ""
                        row += f" {n / theirs:.1f}{alone} | {mine / theirs:.2f} | {tighter} / {n * 9} |"
                print(row, flush=True)


def digits_mlp() -> nn.Module:
    """A 64-32-16-10 ReLU MLP trained on sklearn's digits for 30 epochs (a few seconds)."""
    seed_everything(0)
    model = build_model("mlp", "digits", hidden=(32, 16))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    fit(model, loader("digits", "train", batch_size=64, seed=0), 30, optimizer, progress=False)
    return model.eval()


def milp_table(count: int, eps_values: list[float]) -> None:
    model = digits_mlp()
    x, y = (t[:count] for t in load_dataset("digits", "test").tensors)
    print(f"\nExact MILP (scipy.optimize.milp / HiGHS) on a 64-32-16-10 MLP (sklearn digits), all 9 margins, "
          f"{count} test images one at a time, 1 CPU thread\n")
    print("| eps | unstable ReLUs (mean of 48) | s / example (median) | s / example (max) | robust (exact) | "
          "certified by CROWN |")
    print("|---|---|---|---|---|---|")
    for eps in eps_values:
        seconds, robust, unstable = [], 0, []
        for i in range(count):
            with torch.no_grad():
                bounds = preactivation_bounds(model, x[i:i + 1], eps)
            unstable.append(sum(int(((lo < 0) & (up > 0)).sum()) for lo, up in bounds))
            start = time.perf_counter()
            robust += int(exact_margin(model, x[i:i + 1], y[i:i + 1], eps).margins.min() > 0)
            seconds.append(time.perf_counter() - start)
        crown = certified_accuracy(model, x, y, eps)
        print(f"| {eps} | {statistics.mean(unstable):.1f} | {statistics.median(seconds):.3f} | {max(seconds):.3f} | "
              f"{robust / count:.2f} | {crown:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="MNIST test images bounded")
    parser.add_argument("--milp-n", type=int, default=10, help="digits test images solved exactly")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds of IBP, and of CROWN when compared with auto_LiRPA (else one)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-milp", action="store_true", help="skip the MILP table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = [name for name in ("mnist_pgd_at", "mnist_ibp") if name in zoo.available()]
    with torch.no_grad():
        bound_table(names, args.n, [0.1, 0.3], args.repeats, device())
    if not args.no_milp:
        milp_table(args.milp_n, [0.01, 0.03, 0.05])


if __name__ == "__main__":
    main()
