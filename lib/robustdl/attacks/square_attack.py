r"""The Square Attack: random search with square-shaped updates (Andriushchenko et al. 2020).

:func:`square` -- score-based, L-infinity and L2, through a
:class:`~robustdl.attacks.oracle.QueryOracle`; :func:`square_fraction` -- its schedule of the
square's size.

Taught in the chapter on black-box attacks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from robustdl._checks import check_positive_int
from robustdl._random import integers, uniform
from robustdl.attacks.oracle import QueryOracle, log_scores, setup_oracle
from robustdl.losses import margin
from robustdl.threat import LpBall, as_ball

__all__ = ["square", "square_fraction"]

#: The Square Attack halves :math:`p` after these iterations of a 10000-query run
#: (Andriushchenko et al. 2020); for another budget they are rescaled in proportion.
SQUARE_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
SQUARE_REFERENCE_QUERIES = 10000
#: Fresh signs drawn when a Linf square update would leave the image unchanged.
SQUARE_RESAMPLES = 10


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
    log_f = log_scores(scores)
    if target is None:
        loss = margin(log_f, y)
        return loss, loss < 0
    return -log_f.gather(1, target[:, None]).squeeze(1), scores.argmax(dim=1) == target


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
    eps: float | LpBall,
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
        eps: the radius of the threat model, or the threat model itself, an
            :class:`~robustdl.threat.LpBall` (:func:`~robustdl.threat.as_ball`; then ``norm`` is left out).
        norm: ``"linf"`` or ``"l2"``.
        queries: the most queries per example, the clean one included.
        p_init: the initial fraction :math:`p \in (0, 1]` of pixels a square covers (0.8 in the paper).
        target: target labels for a targeted attack, shape (N,).
        generator: the random generator (on any device, see :mod:`robustdl._random`).

    Returns:
        New adversarial images, detached, in the ball and in [0, 1]: per example the point of
        lowest loss found (the first to reach the goal).
    """
    oracle, y, target = setup_oracle(model_or_oracle, x, y, target, "scores")
    ball = as_ball(eps, norm)
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
