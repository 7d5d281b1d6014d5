"""Time DeepGO's reachability on networks of the sizes of the seed's comparison table (N-0 ... N-5).

    OMP_NUM_THREADS=1 python benchmarks/deepgo.py [--inputs 2] [--tol 1e-2] [--seed 0]

The seed tutorial (Ruan et al. 2018, :cite:`ruan2018reachability`) reports DeepGO's output-range
times beside SHERLOCK's and Reluplex's on six networks: one hidden layer of 100, 200, 500, 500 and
1000 ReLUs, and six layers of 250. Their weights are not public here, so we draw random networks
of the same sizes (PyTorch's default initialisation, seeded; the last layer rescaled so that the
output has standard deviation 1 over the input box) on ``--inputs`` free input dimensions in
[0, 1], and bound the output's range [min, max] within ``--tol`` on each side with
:func:`robustdl.verify.reachability` (dynamic Lipschitz estimate). Beside each range is the
range seen by 100,000 uniform samples (it must lie inside) and the seed's reported times, which
were measured on the authors' networks and machine: compare orders of magnitude, not digits.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from torch import nn

from robustdl.verify.deepgo import logit_of, reachability

#: (name, hidden widths, the seed's times: SHERLOCK, Reluplex, DeepGO)
SEED_TABLE = [
    ("N-0", [100], "1.9s", "1m 55s", "0.4s"),
    ("N-1", [200], "2.4s", "13m 58s", "1.0s"),
    ("N-2", [500], "17.8s", "Timeout", "6.8s"),
    ("N-3", [500], "7.6s", "Timeout", "5.3s"),
    ("N-4", [1000], "7m 57.8s", "Timeout", "1.8s"),
    ("N-5", [250] * 6, "9m 48.4s", "Timeout", "15.1s"),
]


def random_network(inputs: int, hidden: list[int], seed: int) -> nn.Module:
    """A ReLU network ``inputs -> hidden... -> 1``, its output scaled to unit spread on [0, 1]^inputs."""
    torch.manual_seed(seed)
    widths = [inputs, *hidden]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], 1)).eval()
    with torch.no_grad():
        model[-1].weight.div_(model(torch.rand(10_000, inputs)).std())
    return model


def comparison_table(inputs: int = 2, tol: float = 1e-2, seed: int = 0) -> str:
    """Run DeepGO on the six networks and return a markdown table beside the seed's times."""
    rows = [
        f"| NN | layers x neurons | inputs | DeepGO range (tol {tol:g}) | sampled range | our time "
        "| seed: SHERLOCK | seed: Reluplex | seed: DeepGO |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, (name, hidden, sherlock, reluplex, deepgo) in enumerate(SEED_TABLE):
        model = random_network(inputs, hidden, seed + i)
        centre = torch.full((1, inputs), 0.5)
        start = time.perf_counter()
        low, high = reachability(model, centre, list(range(inputs)), 0.5, logit_of(0), tol)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            sampled = model(torch.rand(100_000, inputs, generator=torch.Generator().manual_seed(seed)))[:, 0]
        assert low <= sampled.min() and sampled.max() <= high, f"{name}: samples outside the bounds"
        rows.append(
            f"| {name} | {len(hidden)} x {hidden[0]} | {inputs} | [{low:.3f}, {high:.3f}] "
            f"| [{sampled.min():.3f}, {sampled.max():.3f}] | {seconds:.1f}s | {sherlock} | {reluplex} | {deepgo} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=2)
    parser.add_argument("--tol", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(comparison_table(args.inputs, args.tol, args.seed))


if __name__ == "__main__":
    main()
