r"""Coverage-guided test generation by gradient ascent on uncovered neurons (DeepXplore / DLFuzz style).

DeepXplore :cite:`pei2017deepxplore` and DLFuzz :cite:`guo2018dlfuzz` mutate a seed input by
gradient ascent on an objective that rewards (i) activating a chosen neuron not yet covered and
(ii) moving the prediction away from the seed's label, keep a mutant when it raises coverage,
and report the mutants the model misclassifies. :func:`generate_tests` does this inside the
threat model's ball around the seed (:class:`robustdl.threat.LpBall`, box [0, 1] included),
as DLFuzz bounds its mutations, with the steepest-ascent step and projection of PGD. It is
gradient-guided, not concolic (Sun et al. 2018 :cite:`sun2018concolic` solve a linear program
per target instead). Taught in the chapter *Testing neural networks*.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustdl._checks import check_labels, check_nonnegative, check_positive_int
from robustdl._random import integers
from robustdl.ascent import projected_ascent
from robustdl.threat import LpBall, as_ball
from robustdl.verify.coverage import ActivationProfile, Coverage, activations, boundary_coverage, neuron_coverage

__all__ = ["TestReport", "generate_tests", "neuron_targets"]


@dataclass(frozen=True)
class TestReport:
    """What :func:`generate_tests` found.

    * ``inputs``, ``labels`` -- the generated tests kept because each raised coverage, and
      the labels of their seeds;
    * ``failures``, ``failure_labels`` -- every generated input the model misclassifies (kept
      or not) whose seed it classified correctly: new bugs;
    * ``coverage_before``, ``coverage_after`` -- coverage of the seeds, and of the seeds plus
      the kept tests.
    """

    __test__ = False  # not a pytest class

    inputs: Tensor
    labels: Tensor
    failures: Tensor
    failure_labels: Tensor
    coverage_before: Coverage
    coverage_after: Coverage


def neuron_targets(mask: Tensor) -> Tensor:
    """The flat neuron index behind each uncovered item of a neuron or boundary coverage mask.

    A neuron-coverage mask (neurons,) targets its uncovered neurons; a boundary-coverage mask
    (2, neurons) targets the neurons whose upper corner is uncovered (pushing a ReLU neuron
    up is the direction gradient ascent can reach).
    """
    uncovered = ~mask if mask.dim() == 1 else ~mask[1]
    return uncovered.nonzero().flatten()


def _climb(model: nn.Module, x0: Tensor, y: Tensor, neuron: Tensor, ball: LpBall,
           steps: int, step_size: float, weight: float) -> Tensor:
    r"""Steepest ascent of :math:`u_n(x) + w\,J(\theta, x, y)` over the ball around each seed.

    :math:`u_n` is the pre-activation of the target neuron :math:`n` of each seed (the ReLU
    output has no gradient while the neuron is off), :math:`J` the cross-entropy: PGD's loop,
    :func:`~robustdl.ascent.projected_ascent`, from the seeds themselves.
    """
    def objective(x: Tensor, rows: Tensor) -> tuple[Tensor, None]:
        act = activations(model, x, grad=True)
        pre = torch.cat(act.pre, dim=1)[rows, neuron]
        return pre.sum() + weight * F.cross_entropy(act.logits, y, reduction="sum"), None

    return projected_ascent(objective, x0, ball, [step_size] * steps)


def generate_tests(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    criterion: str = "neuron",
    eps: float | LpBall = 0.1,
    budget: int = 100,
    norm: str | float = "linf",
    steps: int = 10,
    step_size: float | None = None,
    weight: float = 1.0,
    threshold: float = 0.0,
    profile: ActivationProfile | None = None,
    generator: torch.Generator | None = None,
) -> TestReport:
    r"""Coverage-guided test generation from labelled seeds, :cite:`pei2017deepxplore` :cite:`guo2018dlfuzz`.

    Each round gives every seed a target drawn uniformly from the neurons still uncovered
    (:func:`neuron_targets`) and climbs :math:`u_n(x') + w\,J(\theta, x', y)` for ``steps``
    projected steps of size ``step_size`` (default ``2.5 eps / steps``) within the ball
    :math:`\|x' - x\|_p \le \epsilon` and the box [0, 1]. A mutant is kept if it covers an
    item no earlier test covers; rounds repeat until ``budget`` mutants have been tried or
    everything is covered.

    Args:
        criterion: ``"neuron"`` (:func:`~robustdl.verify.coverage.neuron_coverage` at
            ``threshold``) or ``"boundary"`` (:func:`~robustdl.verify.coverage.boundary_coverage`
            against ``profile``).
        weight: :math:`w`, the weight of the misclassification term (0: coverage alone).
    """
    check_labels(y, x)
    ball = as_ball(eps, norm)
    budget = check_positive_int(budget, "budget")
    steps = check_positive_int(steps, "steps")
    weight = check_nonnegative(weight, "weight")
    step_size = 2.5 * ball.eps / steps if step_size is None else check_nonnegative(step_size, "step_size")
    if criterion == "neuron":
        def measure(t: Tensor) -> Coverage:
            return neuron_coverage(model, t, threshold)
    elif criterion == "boundary":
        if profile is None:
            raise ValueError("criterion='boundary' needs the training set's profile= (see activation_profile)")

        def measure(t: Tensor) -> Coverage:
            return boundary_coverage(model, t, profile)
    else:
        raise ValueError(f"criterion must be 'neuron' or 'boundary', got {criterion!r}")

    before = measure(x)
    covered = before.mask.clone()
    kept: list[Tensor] = []
    kept_labels: list[Tensor] = []
    failures: list[Tensor] = []
    failure_labels: list[Tensor] = []
    seed_correct = activations(model, x).logits.argmax(1) == y
    tried = 0
    while tried < budget:
        targets = neuron_targets(covered)
        if not len(targets):
            break
        seeds = torch.arange(min(len(x), budget - tried), device=x.device)
        choice = integers(0, len(targets), (len(seeds),), targets.device, generator)
        mutants = _climb(model, x[seeds], y[seeds], targets[choice], ball, steps, step_size, weight)
        tried += len(seeds)
        wrong = (activations(model, mutants).logits.argmax(1) != y[seeds]) & seed_correct[seeds]
        failures.append(mutants[wrong])
        failure_labels.append(y[seeds][wrong])
        for i in range(len(mutants)):
            new = measure(mutants[i:i + 1]).mask
            if (new & ~covered).any():
                covered |= new
                kept.append(mutants[i:i + 1])
                kept_labels.append(y[seeds[i:i + 1]])
    empty = x[:0]
    return TestReport(
        inputs=torch.cat(kept) if kept else empty,
        labels=torch.cat(kept_labels) if kept_labels else y[:0],
        failures=torch.cat(failures) if failures else empty,
        failure_labels=torch.cat(failure_labels) if failure_labels else y[:0],
        coverage_before=before,
        coverage_after=Coverage.of(covered),
    )
