r"""The query oracle: the model as a black-box attacker sees it, its answers counted.

A black-box attacker cannot differentiate the model: it submits images and reads back the
softmax scores (a *score-based* attack) or only the predicted label (a *decision-based*
attack). :class:`QueryOracle` is that view of a model. It also counts the queries spent on
each example, the cost by which black-box attacks are compared.

Every black-box attack (:func:`~robustdl.attacks.zoo_attack.zoo_adam`,
:func:`~robustdl.attacks.square_attack.square`) takes ``model_or_oracle`` first: a model is
wrapped in a fresh oracle (:func:`setup_oracle`), so ``attack(model, x, y, ...)`` works like
every other attack of :mod:`robustdl.attacks`, while an oracle passed in can be read afterwards
(``oracle.queries``). Each attack resets the oracle's counts to its own ``x``.

Taught in the chapter on black-box attacks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustdl._checks import check_images, check_labels, check_positive_int
from robustdl._model import eval_mode

__all__ = ["QueryBudgetError", "QueryOracle"]

#: What a :class:`QueryOracle` answers: softmax probabilities, or the predicted label only.
OUTPUTS = ("scores", "labels")


class QueryBudgetError(RuntimeError):
    """A query for an example that has already spent its budget."""


class QueryOracle:
    """The only view of a model that a black-box attack gets: answers to queries, counted.

    ``oracle(x, index)`` answers a batch of queries, row ``k`` of ``x`` being a query about
    example ``index[k]`` of the attacked set: the softmax probabilities (N, C) for
    ``output="scores"``, the predicted labels (N,) for ``output="labels"``. Answers are
    computed under ``torch.no_grad()`` with the model in eval mode (its mode restored), so no
    gradient can leak to the attacker. ``oracle.queries`` counts the queries per example since
    the last :meth:`reset`; with a ``budget``, a query for an example that has spent it raises
    :class:`QueryBudgetError`.

    Args:
        model: a classifier returning logits, taking images in [0, 1].
        output: ``"scores"`` or ``"labels"``.
        budget: the most queries per example, or ``None`` for no limit.

    Example:
        >>> oracle = QueryOracle(model, budget=1000)
        >>> x_adv = square(oracle, x, y, eps=0.1, queries=1000)
        >>> oracle.queries  # queries spent on each example
    """

    def __init__(self, model: nn.Module, output: str = "scores", budget: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module returning logits, got {type(model).__name__}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.model, self.output = model, output
        self.budget = None if budget is None else check_positive_int(budget, "budget")
        self.queries = torch.zeros(0, dtype=torch.long)

    def __repr__(self) -> str:
        return (f"QueryOracle({type(self.model).__name__}, output={self.output!r}, budget={self.budget}, "
                f"examples={len(self.queries)}, queries={int(self.queries.sum())})")

    def reset(self, n: int) -> QueryOracle:
        """Start counting afresh for an attacked set of ``n`` examples; returns the oracle."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be the number of examples, an integer >= 0, got {n!r}")
        self.queries = torch.zeros(n, dtype=torch.long)
        return self

    def remaining(self, index: Tensor | None = None) -> Tensor:
        """Queries left to each example (of ``index``); the largest int64 when there is no budget."""
        index = torch.arange(len(self.queries)) if index is None else self._check_index(index, len(index))
        spent = self.queries[index.cpu()]
        limit = torch.iinfo(torch.long).max if self.budget is None else self.budget
        return (limit - spent).to(index.device)

    def __call__(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """Answer the queries ``x`` (N, ...) about the examples ``index`` (N,), default ``0..N-1``."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor of images, got {type(x).__name__}")
        if len(self.queries) == 0:
            raise ValueError("the oracle has no attacked set to count queries for: call oracle.reset(n) first "
                             "(the attacks do it themselves)")
        index = self._check_index(torch.arange(len(x), device=x.device) if index is None else index, len(x))
        asked = torch.bincount(index.cpu(), minlength=len(self.queries))
        if self.budget is not None and (over := self.queries + asked > self.budget).any():
            i = int(over.nonzero()[0])
            raise QueryBudgetError(
                f"example {i} has spent {int(self.queries[i])} of its {self.budget} queries and asks "
                f"{int(asked[i])} more; an attack should check oracle.remaining(index) first"
            )
        with torch.no_grad(), eval_mode(self.model):
            logits = self.model(x)
        if not isinstance(logits, Tensor) or logits.shape[:1] != x.shape[:1] or logits.dim() != 2:
            raise TypeError("model must return a logits tensor of shape (N, C); wrap a model that returns a "
                            "dict or tuple in a module that returns the logits")
        self.queries += asked
        return logits.softmax(dim=1) if self.output == "scores" else logits.argmax(dim=1)

    def _check_index(self, index: object, rows: int) -> Tensor:
        integer = isinstance(index, Tensor) and not (index.is_floating_point() or index.is_complex())
        if not integer or index.dtype == torch.bool:
            raise TypeError(f"index must be an integer tensor of example indices, got {index!r:.80}")
        if index.shape != (rows,):
            raise ValueError(f"index must have shape ({rows},), one example index per query, got {tuple(index.shape)}")
        n = len(self.queries)
        if rows and (index.min() < 0 or index.max() >= n):
            raise ValueError(f"index must lie in [0, {n}) for the {n} examples of oracle.reset({n}), got values "
                             f"in [{int(index.min())}, {int(index.max())}]")
        return index.long()


def _as_oracle(model_or_oracle: object, output: str) -> QueryOracle:
    """The oracle an attack queries: ``model_or_oracle`` itself, or a fresh oracle around a model."""
    if isinstance(model_or_oracle, QueryOracle):
        if model_or_oracle.output != output:
            raise ValueError(f"this attack needs a QueryOracle with output={output!r}, got {model_or_oracle.output!r}")
        return model_or_oracle
    if isinstance(model_or_oracle, nn.Module):
        return QueryOracle(model_or_oracle, output)
    raise TypeError(f"model_or_oracle must be an nn.Module or a QueryOracle, got {type(model_or_oracle).__name__}")


def setup_oracle(
    model_or_oracle: object, x: Tensor, y: Tensor, target: Tensor | None, output: str
) -> tuple[QueryOracle, Tensor, Tensor | None]:
    """Check the arguments every black-box attack takes; return its oracle (reset to ``x``) and the labels as int64."""
    oracle = _as_oracle(model_or_oracle, output)
    check_images(x)
    y = check_labels(y, x).long()
    if target is not None:
        target = check_labels(target, x, "target").long()
    return oracle.reset(len(x)), y, target


def log_scores(scores: Tensor) -> Tensor:
    """:math:`\\log F(x)`, with probabilities that underflowed to 0 floored at the smallest normal float."""
    return scores.clamp_min(torch.finfo(scores.dtype).tiny).log()
