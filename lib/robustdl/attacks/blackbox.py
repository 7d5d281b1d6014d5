r"""Black-box attacks: the model seen only through its answers to queries.

A black-box attacker cannot differentiate the model: it submits images and reads back the
softmax scores (a *score-based* attack) or only the predicted label (a *decision-based*
attack). :class:`QueryOracle` is that view of a model. It also counts the queries spent on
each example, the cost by which black-box attacks are compared.

* :func:`zoo_adam` -- ZOO-ADAM: coordinate-wise ADAM on symmetric-difference estimates of the
  gradient of the C&W objective (Chen et al. 2017), L2;
* :func:`square` -- the Square Attack: random search with square-shaped updates
  (Andriushchenko et al. 2020), L-infinity and L2.

Every attack takes ``model_or_oracle`` first: a model is wrapped in a fresh oracle, so
``attack(model, x, y, ...)`` works like every other attack of :mod:`robustdl.attacks`, while
an oracle passed in can be read afterwards (``oracle.queries``). Each attack resets the
oracle's counts to its own ``x``.

Taught in the chapter on black-box attacks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from robustdl._checks import check_images, check_labels, check_nonnegative, check_positive_int
from robustdl._random import integers, uniform
from robustdl.attacks._core import eval_mode, margin
from robustdl.threat import LpBall

__all__ = ["QueryBudgetError", "QueryOracle", "square", "square_fraction", "zoo_adam"]

#: What a :class:`QueryOracle` answers: softmax probabilities, or the predicted label only.
OUTPUTS = ("scores", "labels")
#: ADAM's constants in ZOO-ADAM (Chen et al. 2017, Algorithm 2): the defaults of Kingma and Ba.
ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.9, 0.999, 1e-8
#: The Square Attack halves :math:`p` after these iterations of a 10000-query run
#: (Andriushchenko et al. 2020); for another budget they are rescaled in proportion.
SQUARE_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
SQUARE_REFERENCE_QUERIES = 10000
#: Fresh signs drawn when a Linf square update would leave the image unchanged.
SQUARE_RESAMPLES = 10


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


def _setup(
    model_or_oracle: object, x: Tensor, y: Tensor, target: Tensor | None, output: str
) -> tuple[QueryOracle, Tensor, Tensor | None]:
    """Check the arguments every black-box attack takes; return its oracle (reset to ``x``) and the labels as int64."""
    oracle = _as_oracle(model_or_oracle, output)
    check_images(x)
    y = check_labels(y, x).long()
    if target is not None:
        target = check_labels(target, x, "target").long()
    return oracle.reset(len(x)), y, target


def _log(scores: Tensor) -> Tensor:
    """:math:`\\log F(x)`, with probabilities that underflowed to 0 floored at the smallest normal float."""
    return scores.clamp_min(torch.finfo(scores.dtype).tiny).log()


def _gap(log_scores: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    r"""The gap that ZOO's loss floors at :math:`-\kappa`, per example, from log-probabilities.

    Untargeted: :math:`\log F(x)_y - \max_{i \ne y} \log F(x)_i`; targeted:
    :math:`\max_{i \ne t} \log F(x)_i - \log F(x)_t`. Negative exactly when the goal is reached.
    On log-probabilities it equals the C&W logit gap, since the log-normaliser cancels.
    """
    return margin(log_scores, y) if target is None else -margin(log_scores, target)


# ----------------------------------------------------------------------------------------------
# ZOO
# ----------------------------------------------------------------------------------------------


def _random_coordinates(n: int, d: int, b: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """``b`` distinct coordinates out of ``d``, drawn uniformly for each of ``n`` examples, shape (n, b)."""
    return uniform((n, d), like, generator, dtype=torch.float32).argsort(dim=1)[:, :b]


def _symmetric_probes(x_adv: Tensor, coords: Tensor, h: float) -> Tensor:
    r"""The points :math:`x + h e_i` (first ``b``) and :math:`x - h e_i` (last ``b``) per example.

    ``x_adv`` (n, d) flattened, ``coords`` (n, b); returns (n, 2b, d), clipped into [0, 1] so
    that every query is a valid image (at a pixel on the box's edge the difference is one-sided).
    """
    b = coords.shape[1]
    probes = x_adv[:, None, :].repeat(1, 2 * b, 1)
    offsets = torch.cat([torch.full_like(coords, 1), torch.full_like(coords, -1)], dim=1).to(x_adv.dtype) * h
    probes.scatter_add_(2, coords.repeat(1, 2)[..., None], offsets[..., None])
    return probes.clamp(0, 1)


def _coordinate_gradient(objective: Tensor, probes: Tensor, coords: Tensor) -> Tensor:
    r"""ZOO's estimate :math:`\hat g_i = (f(x + h e_i) - f(x - h e_i)) / 2h` of :cite:`chen2017zoo`.

    The divisor is the actual distance between the two (clipped) probes, :math:`2h` inside the box.
    """
    b = coords.shape[1]
    index = coords[..., None]
    spacing = probes[:, :b].gather(2, index) - probes[:, b:].gather(2, index)
    return (objective[:, :b] - objective[:, b:]) / spacing.squeeze(2)


def _adam_step(state: tuple[Tensor, Tensor, Tensor], rows: Tensor, coords: Tensor, g: Tensor, lr: float) -> Tensor:
    r"""One ZOO-ADAM step on the coordinates ``coords`` of the examples ``rows`` (Algorithm 2).

    Each coordinate keeps its own moments and count :math:`T_i` (the state ``(M, v, T)``, updated
    in place): :math:`M_i \leftarrow \beta_1 M_i + (1 - \beta_1)\hat g_i`,
    :math:`v_i \leftarrow \beta_2 v_i + (1 - \beta_2)\hat g_i^2`, and the step is
    :math:`\delta^\star = -\eta\, \hat M_i / (\sqrt{\hat v_i} + \epsilon)` with the bias-corrected
    :math:`\hat M_i = M_i / (1 - \beta_1^{T_i})`, :math:`\hat v_i = v_i / (1 - \beta_2^{T_i})`.
    """
    m, v, t = state
    i = (rows[:, None], coords)
    t[i] += 1
    m[i] = ADAM_BETA1 * m[i] + (1 - ADAM_BETA1) * g
    v[i] = ADAM_BETA2 * v[i] + (1 - ADAM_BETA2) * g**2
    m_hat = m[i] / (1 - ADAM_BETA1 ** t[i])
    v_hat = v[i] / (1 - ADAM_BETA2 ** t[i])
    return -lr * m_hat / (v_hat.sqrt() + ADAM_EPS)


def zoo_adam(
    model_or_oracle: nn.Module | QueryOracle,
    x: Tensor,
    y: Tensor,
    *,
    c: float = 1.0,
    kappa: float = 0.0,
    steps: int = 1000,
    batch_coordinates: int = 128,
    lr: float = 0.01,
    h: float = 1e-4,
    target: Tensor | None = None,
    abort_early: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""ZOO-ADAM, the score-based L2 attack of Chen et al. (2017), :cite:`chen2017zoo` (Sec. 3, Algorithm 2).

    The C&W L2 problem with the logits replaced by the log-probabilities the oracle returns:

    .. math:: \min_{x' \in [0, 1]^d} \|x' - x\|_2^2 + c\, f(x'), \qquad
              f(x') = \max\big(\log F(x')_y - \max_{i \ne y} \log F(x')_i,\ -\kappa\big)

    (targeted: :math:`f(x') = \max(\max_{i \ne t} \log F(x')_i - \log F(x')_t, -\kappa)`),
    solved without gradients by stochastic coordinate descent. Each iteration picks
    ``batch_coordinates`` random coordinates :math:`i` per example, estimates each partial
    derivative by the symmetric difference :math:`\hat g_i = (F(x' + h e_i) - F(x' - h e_i))/2h`
    of the whole objective, and moves those coordinates by ADAM with per-coordinate moments.
    The box is kept by projection (each updated pixel is clipped to [0, 1], exact because the
    box constraint is separable), not by the paper's alternative change of variables through
    tanh, under which MNIST's many pixels at exactly 0 or 1 could hardly move.

    Each iteration asks the oracle, in one call, :math:`2B + 1` queries per example: the current
    iterate (to know whether it succeeded) and its :math:`2B` neighbours. An example stops when
    its query budget cannot pay for another iteration.

    Args:
        model_or_oracle: a classifier returning logits, or a ``"scores"`` :class:`QueryOracle`.
        x: clean images in [0, 1], shape (N, ...).
        y: true labels, shape (N,).
        c: the constant weighing the loss :math:`f` against the squared distortion.
        kappa: the confidence :math:`\kappa \ge 0`: success needs the gap below :math:`-\kappa`.
        steps: iterations (each moves ``batch_coordinates`` coordinates per example).
        batch_coordinates: coordinates :math:`B` estimated and updated per iteration (128 in the paper).
        lr: ADAM's step size :math:`\eta` (0.01 in the paper).
        h: the finite-difference step, in (0, 0.5) (1e-4 in the paper).
        target: target labels for a targeted attack, shape (N,).
        abort_early: stop each example at its first successful iterate (saves queries); otherwise
            run all ``steps`` and keep the successful iterate of smallest distortion.
        generator: the random generator choosing coordinates (on any device: a CPU generator
            chooses the same coordinates for ``x`` on the CPU or a GPU).

    Returns:
        New images, detached, in [0, 1]: per example the successful iterate of smallest L2
        distortion, or the last iterate where none succeeded.
    """
    oracle, y, target = _setup(model_or_oracle, x, y, target, "scores")
    c = check_nonnegative(c, "c")
    kappa, lr = check_nonnegative(kappa, "kappa"), check_nonnegative(lr, "lr")
    h = check_nonnegative(h, "h")
    if not 0 < h < 0.5:
        raise ValueError(f"h must be in (0, 0.5), a small finite-difference step, got {h}")
    steps = check_positive_int(steps, "steps")
    x = x.detach()
    n, flat = len(x), x.flatten(1)
    b = min(check_positive_int(batch_coordinates, "batch_coordinates"), flat.shape[1])
    goal = y if target is None else target
    x_adv, best = flat.clone(), flat.clone()
    best_distance = flat.new_full((n,), math.inf)
    adam = (torch.zeros_like(flat), torch.zeros_like(flat), torch.zeros_like(flat))
    active = torch.arange(n, device=x.device)
    for _ in range(steps):
        active = active[oracle.remaining(active) >= 2 * b + 1]
        if len(active) == 0:
            break
        coords = _random_coordinates(len(active), flat.shape[1], b, generator, x)
        probes = torch.cat([x_adv[active, None], _symmetric_probes(x_adv[active], coords, h)], dim=1)
        queries = active.repeat_interleave(2 * b + 1)
        gap = _gap(_log(oracle(probes.view(-1, *x.shape[1:]), queries)), goal[queries],
                   None if target is None else target[queries]).view(len(active), -1)
        distance = (probes - flat[active, None]).pow(2).sum(dim=2)
        # the current iterate (column 0): keep it if it succeeds closer than before
        success = gap[:, 0] < -kappa
        better = success & (distance[:, 0] < best_distance[active])
        best[active[better]], best_distance[active[better]] = x_adv[active[better]], distance[better, 0]
        keep = ~success if abort_early else torch.ones_like(success)
        active, coords, probes = active[keep], coords[keep], probes[keep, 1:]
        objective = (distance + c * gap.clamp_min(-kappa))[keep, 1:]
        g = _coordinate_gradient(objective, probes, coords)
        i = (active[:, None], coords)
        x_adv[i] = (x_adv[i] + _adam_step(adam, active, coords, g, lr)).clamp(0, 1)
    found = best_distance.isfinite()[:, None]
    return torch.where(found, best, x_adv).view_as(x)


# ----------------------------------------------------------------------------------------------
# Square Attack
# ----------------------------------------------------------------------------------------------


def square_fraction(iteration: int, queries: int, p_init: float) -> float:
    r"""The Square Attack's :math:`p`, the fraction of pixels a square covers, at ``iteration``.

    :math:`p` starts at ``p_init`` and is halved after iterations 10, 50, 200, 500, 1000, 2000,
    4000, 6000 and 8000 of a 10000-query run (:cite:`andriushchenko2020square`),
    the schedule being rescaled in proportion for a budget of ``queries``.
    """
    t = int(iteration * SQUARE_REFERENCE_QUERIES / queries)
    return p_init / 2 ** sum(t > k for k in SQUARE_HALVINGS)


def _square_side(p: float, height: int, width: int, smallest: int = 1) -> int:
    """The side :math:`s = \\mathrm{round}(\\sqrt{p\\, h w})` of a square covering a fraction ``p`` of the image.

    Kept in [``smallest``, min(h, w) - 1], as the authors do, so that a square never covers a whole side.
    """
    return max(smallest, min(round(math.sqrt(p * height * width)), min(height, width) - 1))


def _random_signs(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Independent uniform signs in {-1, +1} of ``like``'s dtype and device."""
    return integers(0, 2, shape, like.device, generator).to(like.dtype) * 2 - 1


def _random_square(n: int, height: int, width: int, s: int, generator: torch.Generator | None,
                   like: Tensor) -> tuple[Tensor, Tensor]:
    """One ``s`` x ``s`` square per example, placed uniformly at random in the image.

    Returns the coordinates of every row (n, height) and column (n, width) relative to the
    square's corner: a pixel lies in the square where both are in [0, s).
    """
    def relative(size: int) -> Tensor:
        start = integers(0, size - s + 1, (n, 1), like.device, generator)
        return torch.arange(size, device=like.device) - start
    return relative(height), relative(width)


def _mask(rows: Tensor, cols: Tensor, s: int) -> Tensor:
    """The square of :func:`_random_square` as a mask (n, 1, height, width)."""
    return (((rows >= 0) & (rows < s))[:, :, None] & ((cols >= 0) & (cols < s))[:, None, :])[:, None]


def _square_loss(scores: Tensor, y: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
    r"""The Square Attack's loss, to be minimised, and whether the goal is reached, per example.

    Untargeted: the margin :math:`\log F(x)_y - \max_{i \ne y} \log F(x)_i` (the logit margin),
    below 0 exactly when misclassified; targeted: the cross-entropy :math:`-\log F(x)_t` of the
    target, the goal being the prediction :math:`t`, as in :cite:`andriushchenko2020square`.
    """
    log_scores = _log(scores)
    if target is None:
        loss = margin(log_scores, y)
        return loss, loss < 0
    return -log_scores.gather(1, target[:, None]).squeeze(1), scores.argmax(dim=1) == target


def _linf_stripes(x: Tensor, ball: LpBall, generator: torch.Generator | None) -> Tensor:
    """The L-infinity initialisation: vertical stripes, each column of each channel at :math:`\\pm\\epsilon`."""
    n, channels, _, width = x.shape
    return ball.project(x + ball.eps * _random_signs((n, channels, 1, width), generator, x), x)


def _linf_update(x_best: Tensor, x: Tensor, ball: LpBall, s: int, generator: torch.Generator | None) -> Tensor:
    r"""The L-infinity proposal (:cite:`andriushchenko2020square`, Algorithm 2): one square at :math:`x \pm \epsilon`.

    A random ``s`` x ``s`` window gets, per channel, a random shift :math:`\pm 2\epsilon`,
    projected onto the ball: the window's pixels become :math:`x \pm \epsilon` (clipped to the
    box). As the authors do, the signs are drawn again (up to :data:`SQUARE_RESAMPLES` times)
    where the proposal would equal ``x_best``, a query that could not change anything.
    """
    n, channels, height, width = x.shape
    window = _mask(*_random_square(n, height, width, s, generator, x), s)
    up = ball.project(x_best + 2 * ball.eps * window, x)
    down = ball.project(x_best - 2 * ball.eps * window, x)
    same_up, same_down = ((v == x_best).flatten(2).all(dim=2)[:, None] for v in (up, down))  # (n, 1, C)
    signs = _random_signs((n, SQUARE_RESAMPLES, channels), generator, x)
    unchanged = torch.where(signs > 0, same_up, same_down).all(dim=2)  # (n, draws)
    first = (~unchanged).int().argmax(dim=1)  # the first draw that changes the image (or the first draw)
    chosen = signs[torch.arange(n, device=x.device), first][..., None, None]
    return torch.where(chosen > 0, up, down)


def _pyramid(h1: int, h2: int, like: Tensor) -> Tensor:
    r"""The pattern :math:`\eta^{(h_1, h_2)}` of the L2 update of :cite:`andriushchenko2020square`, (h1, h2).

    Concentric rectangles of growing height towards the centre:
    :math:`\eta_{r,s} = \sum_{k=0}^{M(r,s)} (n + 1 - k)^{-2}` with :math:`n = \lfloor h_1/2 \rfloor` and
    :math:`M(r,s) = n - \max(|r - \lfloor h_1/2 \rfloor - 1|, |s - \lfloor h_2/2 \rfloor - 1|)`, for
    :math:`r, s` counted from 1 (an empty sum, :math:`M < 0`, is 0).
    """
    n = h1 // 2
    r = torch.arange(1, h1 + 1, device=like.device)[:, None]
    s = torch.arange(1, h2 + 1, device=like.device)[None, :]
    m = n - torch.maximum((r - n - 1).abs(), (s - h2 // 2 - 1).abs())
    terms = (n + 1 - torch.arange(n + 1, device=like.device, dtype=like.dtype)) ** -2
    sums = torch.cat([terms.new_zeros(1), terms.cumsum(0)])  # sums[M + 1] = sum over k = 0..M
    return sums[(m + 1).clamp_min(0)]


def _l2_pattern(s: int, like: Tensor) -> Tensor:
    r"""The L2 update's shape on an ``s`` x ``s`` square, of unit L2 norm.

    :math:`[\eta^{(s, k)}, -\eta^{(s, s - k)}]` with :math:`k = \lfloor s/2 \rfloor`: two pyramids of
    opposite signs side by side.
    """
    eta = torch.cat([_pyramid(s, s // 2, like), -_pyramid(s, s - s // 2, like)], dim=1)
    return eta / eta.norm()


def _channel_norm(v: Tensor) -> Tensor:
    """The L2 norm of each channel of each example, shape (N, C, 1, 1)."""
    return v.flatten(2).norm(dim=2)[..., None, None]


def _clip_l2(x: Tensor, delta: Tensor, eps: float) -> Tensor:
    """``x + delta`` with ``delta`` rescaled to L2 norm ``eps`` if longer, then clipped to [0, 1].

    Clipping moves every pixel towards ``x``, so the point stays in the ball: this is the
    projection the L2 Square Attack needs, without a bisection.
    """
    norm = delta.flatten(1).norm(dim=1)[:, None, None, None]
    return (x + delta * (eps / norm.clamp_min(torch.finfo(x.dtype).tiny)).clamp_max(1)).clamp(0, 1)


def _l2_tiles(x: Tensor, ball: LpBall, generator: torch.Generator | None) -> Tensor:
    r"""The L2 initialisation, as the authors': a centred grid of tiles of side :math:`\lfloor h/5 \rfloor`.

    Each tile holds the update's pattern (:func:`_l2_pattern`) with a random sign per channel; the
    whole is rescaled to norm :math:`\epsilon` and clipped to the box.
    """
    n, channels, height, width = x.shape
    t = max(min(height, width) // 5, 1)
    rows, cols = height // t, width // t
    signs = _random_signs((n, channels, rows, cols), generator, x)
    grid = signs.repeat_interleave(t, dim=2).repeat_interleave(t, dim=3) * _l2_pattern(t, x).repeat(rows, cols)
    top, left = (height - rows * t) // 2, (width - cols * t) // 2
    delta = torch.nn.functional.pad(grid, (left, width - cols * t - left, top, height - rows * t - top))
    return _clip_l2(x, ball.eps * delta / delta.flatten(1).norm(dim=1)[:, None, None, None], ball.eps)


def _l2_update(x_best: Tensor, x: Tensor, ball: LpBall, s: int, generator: torch.Generator | None) -> Tensor:
    r"""The L2 proposal (:cite:`andriushchenko2020square`, Algorithm 3): mass moved between two squares.

    With :math:`\nu = \hat x - x`, two random squares :math:`W_1, W_2` and the budget left
    :math:`\epsilon_{\rm unused}^2 = \epsilon^2 - \|\nu\|_2^2`, each channel :math:`i` gets
    :math:`\nu_{W_2} \leftarrow 0` and, on :math:`W_1`, the direction of
    :math:`\rho\,\eta^\ast + \nu_{W_1} / \|\nu_{W_1}\|_2` (random sign :math:`\rho`, the
    pattern :math:`\eta^\ast` of :func:`_l2_pattern`, randomly transposed) scaled to the norm
    :math:`(\|\nu_{W_1 \cup W_2}\|_2^2 + \epsilon_{\rm unused}^2 / c)^{1/2}`: the perturbation keeps
    norm :math:`\epsilon` before clipping to the box.
    """
    n, channels, height, width = x.shape
    nu = x_best - x
    rows, cols = _random_square(n, height, width, s, generator, x)
    w1 = _mask(rows, cols, s)
    union = w1 | _mask(*_random_square(n, height, width, s, generator, x), s)
    pattern = _l2_pattern(s, x)
    patterns = torch.where(uniform((n, 1, 1), x, generator, dtype=torch.float32) < 0.5, pattern, pattern.T)
    eta = patterns[torch.arange(n, device=x.device)[:, None, None], rows.clamp(0, s - 1)[:, :, None],
                   cols.clamp(0, s - 1)[:, None, :]][:, None] * w1
    unused = (ball.eps**2 - ball.norm(nu) ** 2).clamp_min(0)[:, None, None, None]
    tiny = torch.finfo(x.dtype).tiny
    rho = _random_signs((n, channels, 1, 1), generator, x)
    direction = rho * eta + nu * w1 / _channel_norm(nu * w1).clamp_min(tiny)
    available = (_channel_norm(nu * union) ** 2 + unused / channels).sqrt()
    nu = nu * ~union + direction / _channel_norm(direction).clamp_min(tiny) * available
    return _clip_l2(x, nu, ball.eps)


#: Per norm: the initialisation, the proposal, and the smallest side of a square.
SQUARE_GEOMETRY = {math.inf: (_linf_stripes, _linf_update, 1), 2.0: (_l2_tiles, _l2_update, 3)}


def square(
    model_or_oracle: nn.Module | QueryOracle,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str | float = "linf",
    queries: int = 1000,
    p_init: float = 0.8,
    target: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The Square Attack of Andriushchenko et al. (2020), :cite:`andriushchenko2020square` (Algorithm 1).

    Random search on the loss :math:`L` (the margin :math:`\log F_y - \max_{i \ne y} \log F_i`,
    or for a target the cross-entropy :math:`-\log F_t`): from an initial point :math:`\hat x`
    of the ball, propose :math:`\hat x_{\rm new} = \Pi_{S(x)}(\hat x + \delta)` with
    :math:`\delta` supported on a random square of side :math:`s` and accept it if the loss
    decreases. The square covers a fraction :math:`p` of the image (``p_init`` at first,
    halved on :func:`square_fraction`'s schedule), so the search moves from coarse to fine.

    * L-infinity: initialisation by vertical stripes of :math:`\pm\epsilon`; the update sets a
      square, per channel, to :math:`x \pm \epsilon` (Algorithm 2).
    * L2: initialisation by a grid of pyramid-shaped tiles; the update moves the perturbation's
      mass from a second square into a first, reshaped there as two pyramids of opposite signs
      (Algorithm 3), keeping the norm at :math:`\epsilon`. Squares have side at least 3.

    Each example costs one query for the clean image (an example already misclassified, or
    at its target, is returned unchanged), one for the initialisation and one per iteration, and
    stops as soon as it reaches its goal, or when its ``queries`` (or its oracle's budget) are spent.

    Args:
        model_or_oracle: a classifier returning logits, or a ``"scores"`` :class:`QueryOracle`.
        x: clean images in [0, 1], shape (N, C, H, W).
        y: true labels, shape (N,).
        eps: the radius of the threat model.
        norm: ``"linf"`` or ``"l2"``.
        queries: the most queries per example, the clean one included.
        p_init: the initial fraction :math:`p \in (0, 1]` of pixels a square covers (0.8 in the paper).
        target: target labels for a targeted attack, shape (N,).
        generator: the random generator (on any device, see :mod:`robustdl._random`).

    Returns:
        New adversarial images, detached, in the ball and in [0, 1]: per example the point of
        lowest loss found (the first to reach the goal).
    """
    oracle, y, target = _setup(model_or_oracle, x, y, target, "scores")
    ball = LpBall(norm, eps)
    if ball.p not in SQUARE_GEOMETRY:
        raise ValueError(f"square supports norm 'linf' or 'l2', got {norm!r}")
    initialise, update, smallest = SQUARE_GEOMETRY[ball.p]
    if x.dim() != 4 or min(x.shape[2:]) <= smallest:
        raise ValueError(f"x must be a batch of images of shape (N, C, H, W), H and W > {smallest} for norm "
                         f"{ball.name!r}, got shape {tuple(x.shape)}")
    queries = check_positive_int(queries, "queries")
    if isinstance(p_init, bool) or not isinstance(p_init, (int, float)) or not 0 < p_init <= 1:
        raise ValueError(f"p_init must be a number in (0, 1], got {p_init!r}")
    x = x.detach()

    def ask(candidates: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        return _square_loss(oracle(candidates, rows), y[rows], None if target is None else target[rows])

    def live(rows: Tensor) -> Tensor:
        return rows[~done[rows] & (oracle.remaining(rows) >= 1)]

    rows = torch.arange(len(x), device=x.device)
    loss, done = ask(x, rows)
    x_best = x.clone()
    rows = live(rows)
    if queries > 1 and len(rows):
        x_best[rows] = initialise(x[rows], ball, generator)
        loss[rows], done[rows] = ask(x_best[rows], rows)
    for iteration in range(queries - 2):
        rows = live(rows)
        if len(rows) == 0:
            break
        s = _square_side(square_fraction(iteration, queries, p_init), *x.shape[2:], smallest)
        proposal = update(x_best[rows], x[rows], ball, s, generator)
        new_loss, reached = ask(proposal, rows)
        accept = (new_loss < loss[rows]) | reached
        taken = rows[accept]
        x_best[taken], loss[taken], done[taken] = proposal[accept], new_loss[accept], reached[accept]
    return x_best
