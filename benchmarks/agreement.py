"""Our attacks beside the peer libraries' on the same bundled models, images and settings.

    ROBUSTDL_DATA=data ROBUSTDL_PROGRESS=0 python benchmarks/agreement.py [--n 200]

Prints one markdown table: the robust accuracy each implementation leaves (lower is a stronger
attack) or, for minimal-distortion attacks, the success rate and median distortion. The test
suite asserts the same comparisons on smaller subsets (tests/test_pgd.py, test_apgd.py,
test_evaluation.py, test_optimisation.py, test_blackbox.py, test_universal.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch
import torchattacks
from art.attacks.evasion import SquareAttack
from art.estimators.classification import PyTorchClassifier
from torch import Tensor, nn

from robustdl import accuracy, zoo
from robustdl.attacks import apgd, cw_l2, pgd, square
from robustdl.data import load_dataset
from robustdl.evaluation import autoattack_like


def seeded() -> torch.Generator:
    """Seed 0 for our generator and for the peers' global generators (torch, NumPy)."""
    torch.manual_seed(0)
    np.random.seed(0)
    return torch.Generator().manual_seed(0)


def art_classifier(model: nn.Module) -> PyTorchClassifier:
    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
                             clip_values=(0.0, 1.0))


def robust_rows(x: Tensor, y: Tensor) -> list[tuple[str, str, Callable[[], Tensor], Callable[[], Tensor]]]:
    """(model, setting, ours, peer): each call returns adversarial images."""
    cnn, mlp = zoo.load("mnist_smallcnn"), zoo.load("mnist_mlp")
    rows = []
    for name, model in (("smallcnn", cnn), ("mlp", mlp)):
        for eps in (0.1, 0.3):
            alpha = 2.5 * eps / 20
            rows.append((name, f"PGD Linf eps {eps}, 20 steps (torchattacks.PGD)",
                         lambda m=model, e=eps, a=alpha: pgd(m, x, y, e, steps=20, step_size=a, generator=seeded()),
                         lambda m=model, e=eps, a=alpha: torchattacks.PGD(m, eps=e, alpha=a, steps=20)(x, y)))
        rows.append((name, "PGD L2 eps 1.5, 20 steps, no random start (torchattacks.PGDL2)",
                     lambda m=model: pgd(m, x, y, 1.5, norm="l2", steps=20, random_start=False),
                     lambda m=model: torchattacks.PGDL2(m, eps=1.5, alpha=2.5 * 1.5 / 20, steps=20,
                                                        random_start=False)(x, y)))
        for loss in ("ce", "dlr"):
            rows.append((name, f"APGD-{loss.upper()} Linf eps 0.1, 25 steps (torchattacks.APGD)",
                         lambda m=model, lo=loss: apgd(m, x, y, 0.1, steps=25, loss=lo, generator=seeded()),
                         lambda m=model, lo=loss: torchattacks.APGD(m, eps=0.1, steps=25, loss=lo, seed=0)(x, y)))
    rows.append(("smallcnn", "APGD ensemble vs AutoAttack standard, Linf eps 0.15",
                 lambda: autoattack_like(cnn, x, y, 0.15, targets=3, generator=seeded()),
                 lambda: torchattacks.AutoAttack(cnn, norm="Linf", eps=0.15, version="standard", n_classes=10,
                                                 seed=0)(x, y)))
    rows.append(("smallcnn", "Square Linf eps 0.15, 300 queries (ART SquareAttack)",
                 lambda: square(cnn, x, y, 0.15, queries=300, generator=seeded()),
                 lambda: torch.from_numpy(SquareAttack(
                     art_classifier(cnn), norm=np.inf, eps=0.15, max_iter=298, p_init=0.8, nb_restarts=1,
                     batch_size=256, verbose=False).generate(x.numpy(), y=y.numpy()))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="MNIST test images")
    args = parser.parse_args()
    x, y = load_dataset("mnist", "test", subset=args.n).tensors
    print(f"{args.n} MNIST test images; robust accuracy left by each attack (lower is stronger)\n")
    print("| model | attack (peer) | robustdl | peer | difference (points) |")
    print("|---|---|---|---|---|")
    for model_name, setting, ours, theirs in robust_rows(x, y):
        model = zoo.load(f"mnist_{model_name}")
        seeded()
        a = accuracy(model, ours(), y)
        seeded()
        b = accuracy(model, theirs(), y)
        print(f"| {model_name} | {setting} | {100 * a:.1f}% | {100 * b:.1f}% | {100 * (a - b):+.1f} |")
    cnn, xs, ys = zoo.load("mnist_smallcnn"), x[:60], y[:60]
    ours = cw_l2(cnn, xs, ys, c_init=1.0, steps=100, lr=0.1, binary_search_steps=1, progress=False)
    theirs = torchattacks.CW(cnn, c=1.0, kappa=0.0, steps=100, lr=0.1)(xs, ys)
    ok_ours, ok_theirs = cnn(ours).argmax(1) != ys, cnn(theirs).argmax(1) != ys
    both = ok_ours & ok_theirs
    l2 = lambda a: (a - xs).flatten(1).norm(dim=1)[both].median().item()  # noqa: E731
    print(f"\nC&W L2 on 60 images, c = 1, 100 Adam steps, lr 0.1 (torchattacks.CW): success "
          f"{int(ok_ours.sum())} vs {int(ok_theirs.sum())} of 60; median L2 where both succeed "
          f"{l2(ours):.2f} vs {l2(theirs):.2f}")


if __name__ == "__main__":
    main()
