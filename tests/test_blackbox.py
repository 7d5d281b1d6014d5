"""Black-box attacks: the query oracle's contract, ZOO-ADAM and the Square Attack, and ART agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from robustdl import zoo
from robustdl.attacks import QueryBudgetError, QueryOracle, square, zoo_adam
from robustdl.attacks.square_attack import _l2_update, _linf_update, _pyramid, square_fraction
from robustdl.attacks.zoo_attack import _adam_step, _coordinate_gradient, _symmetric_probes
from robustdl.threat import LpBall


def tiny_cnn() -> nn.Module:
    """A random 5-class CNN on 3x8x8 images."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 5)).eval()


def confident_model() -> nn.Module:
    """Class 0 wins by 100 on every image in [0, 1]: no attack within the box can fool it."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([100.0, 0.0, 0.0]))
    return model.eval()


@pytest.fixture
def cnn_data(seeded):
    model = tiny_cnn()
    x = torch.rand(6, 3, 8, 8, generator=seeded(1))
    with torch.no_grad():
        y = model(x).argmax(dim=1)  # the model's own labels: every example starts correctly classified
    return model, x, y


def fooled(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(dim=1) != y


def art_classifier(model: nn.Module, batch_size: int = 128):
    """ART's PyTorchClassifier around ``model``; ``batch_size`` overrides the batch size ART's attacks predict with.

    ART's ZooAttack predicts with its own ``batch_size``, which must be 1 for its coordinate
    bookkeeping to be right; predicting one row at a time made its test take minutes, so the
    classifier predicts in large batches instead (the same numbers, faster).
    """
    from art.estimators.classification import PyTorchClassifier

    class Classifier(PyTorchClassifier):
        def predict(self, x, batch_size=128, training_mode=False, **kwargs):
            return super().predict(x, batch_size=max(batch_size, 4096), training_mode=training_mode, **kwargs)

    return Classifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
                      clip_values=(0.0, 1.0))


# ------------------------------------------------------------------------------------------------
# QueryOracle
# ------------------------------------------------------------------------------------------------


def test_oracle_counts_queries_per_example(cnn_data):
    model, x, _ = cnn_data
    oracle = QueryOracle(model).reset(4)
    scores = oracle(x[[0, 0, 3]], torch.tensor([0, 0, 3]))
    assert scores.shape == (3, 5) and torch.allclose(scores.sum(dim=1), torch.ones(3))
    assert torch.allclose(scores, model(x[[0, 0, 3]]).softmax(dim=1))
    assert oracle.queries.tolist() == [2, 0, 0, 1]
    oracle(x[:4])  # index defaults to 0..N-1
    assert oracle.queries.tolist() == [3, 1, 1, 2]
    assert oracle.reset(2).queries.tolist() == [0, 0]


def test_labels_oracle_answers_labels_only(cnn_data):
    model, x, y = cnn_data
    answer = QueryOracle(model, output="labels").reset(len(x))(x)
    assert answer.shape == (len(x),) and answer.dtype == torch.long and torch.equal(answer, y)


def test_oracle_enforces_its_budget(cnn_data):
    model, x, _ = cnn_data
    oracle = QueryOracle(model, budget=3).reset(2)
    oracle(x[[0, 0, 1]], torch.tensor([0, 0, 1]))
    assert oracle.remaining().tolist() == [1, 2] and oracle.remaining(torch.tensor([1])).tolist() == [2]
    with pytest.raises(QueryBudgetError, match="example 0 has spent 2 of its 3 queries"):
        oracle(x[[0, 0]], torch.tensor([0, 0]))
    assert oracle.queries.tolist() == [2, 1]  # a refused call costs nothing
    oracle(x[[0, 1, 1]], torch.tensor([0, 1, 1]))
    assert oracle.remaining().tolist() == [0, 0]


def test_oracle_leaks_no_gradient_and_restores_the_mode(cnn_data):
    model, x, _ = cnn_data
    model.train()
    scores = QueryOracle(model).reset(len(x))(x.clone().requires_grad_(True))
    assert not scores.requires_grad and scores.grad_fn is None
    assert model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"output": "logits"}, ValueError, "output must be one of"),
    ({"budget": 0}, ValueError, "budget must be >= 1"),
    ({"budget": 2.5}, TypeError, "budget must be an integer"),
])
def test_oracle_rejects_bad_arguments(cnn_data, kwargs, error, match):
    with pytest.raises(error, match=match):
        QueryOracle(cnn_data[0], **kwargs)


@pytest.mark.parametrize(("index", "error", "match"), [
    (torch.tensor([0, 1]), ValueError, r"shape \(3,\)"),
    (torch.tensor([0, 1, 5]), ValueError, r"in \[0, 4\)"),
    (torch.tensor([-1, 0, 1]), ValueError, r"in \[0, 4\)"),
    (torch.tensor([0.0, 1.0, 2.0]), TypeError, "integer tensor"),
    ([0, 1, 2], TypeError, "integer tensor"),
])
def test_oracle_rejects_bad_indices(cnn_data, index, error, match):
    model, x, _ = cnn_data
    oracle = QueryOracle(model).reset(4)
    with pytest.raises(error, match=match):
        oracle(x[:3], index)
    assert oracle.queries.sum() == 0


def test_oracle_needs_a_model():
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        QueryOracle(lambda x: x)


@pytest.mark.parametrize("attack", [
    lambda m, x, y: square(m, x, y, 0.1, queries=5),
    lambda m, x, y: zoo_adam(m, x, y, steps=1),
])
def test_score_attacks_refuse_a_labels_oracle_and_non_models(cnn_data, attack):
    model, x, y = cnn_data
    with pytest.raises(ValueError, match="output='scores'"):
        attack(QueryOracle(model, output="labels"), x, y)
    with pytest.raises(TypeError, match=r"nn\.Module or a QueryOracle"):
        attack(lambda v: model(v), x, y)


# ------------------------------------------------------------------------------------------------
# Reproducibility and shapes shared by both attacks (the contract: tests/test_attack_contract.py)
# ------------------------------------------------------------------------------------------------

ATTACKS = {
    "square": lambda m, x, y, g: square(m, x, y, 0.1, queries=30, generator=g),
    "square_l2": lambda m, x, y, g: square(m, x, y, 0.5, norm="l2", queries=30, generator=g),
    "zoo": lambda m, x, y, g: zoo_adam(m, x, y, steps=5, batch_coordinates=16, lr=0.05, generator=g),
}


@pytest.mark.parametrize("name", ATTACKS)
def test_attacks_are_reproducible_and_take_a_batch_of_one(seeded, cnn_data, name):
    """Shape and dtype, the same result for the same seed, another for another, a batch of one."""
    model, x, y = cnn_data
    x_adv = ATTACKS[name](model, x, y, seeded())
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert torch.equal(x_adv, ATTACKS[name](model, x, y, seeded()))
    assert not torch.equal(x_adv, ATTACKS[name](model, x, y, seeded(1)))
    one = ATTACKS[name](model, x[:1], y[:1].int(), seeded())  # a batch of one, int32 labels
    assert one.shape == (1, 3, 8, 8)


@pytest.mark.parametrize("name", ATTACKS)
def test_misclassified_examples_are_returned_unchanged(seeded, cnn_data, name):
    model, x, y = cnn_data
    wrong = (y + 1) % 5
    oracle = QueryOracle(model)
    assert torch.equal(ATTACKS[name](oracle, x, wrong, seeded()), x)
    assert (oracle.queries == (33 if name == "zoo" else 1)).all()  # one query, or one ZOO iteration


@pytest.mark.parametrize("name", ATTACKS)
def test_attacks_stop_at_the_oracles_budget(seeded, name):
    """An oracle with a smaller budget than the attack's own: the attack stops, never overspends."""
    x = torch.rand(3, 3, 8, 8, generator=seeded(2))
    oracle = QueryOracle(confident_model(), budget=70)
    ATTACKS[name](oracle, x, torch.zeros(3, dtype=torch.long), seeded())
    expected = 2 * 33 if name == "zoo" else 30  # square: its own 30; zoo: two iterations of 2 * 16 + 1
    assert (oracle.queries == expected).all()


@pytest.mark.parametrize(("attack", "error", "match"), [
    (lambda m, x, y: square(m, x, y, -0.1), ValueError, "eps"),
    (lambda m, x, y: square(m, x, y, 0.1, norm="l3"), ValueError, "norm"),
    (lambda m, x, y: square(m, x, y, 0.1, norm="l1"), ValueError, "square supports"),
    (lambda m, x, y: square(m, x, y[:2], 0.1), ValueError, "one label per example"),
    (lambda m, x, y: square(m, x + 1, y, 0.1), ValueError, r"\[0, 1\]"),
    (lambda m, x, y: square(m, x, y, 0.1, queries=0), ValueError, "queries must be >= 1"),
    (lambda m, x, y: square(m, x, y, 0.1, p_init=0.0), ValueError, "p_init"),
    (lambda m, x, y: square(m, x.flatten(1), y, 0.1), ValueError, r"\(N, C, H, W\)"),
    (lambda m, x, y: square(m, x[:, :, :3, :3], y, 0.1, norm="l2"), ValueError, "H and W > 3"),
    (lambda m, x, y: square(m, x, y, 0.1, target=y.float()), TypeError, "target must hold integer"),
    (lambda m, x, y: zoo_adam(m, x, y, c=-1.0), ValueError, "c must be"),
    (lambda m, x, y: zoo_adam(m, x, y, h=0.0), ValueError, r"h must be in \(0, 0.5\)"),
    (lambda m, x, y: zoo_adam(m, x, y, h=0.5), ValueError, r"h must be in \(0, 0.5\)"),
    (lambda m, x, y: zoo_adam(m, x, y, steps=0), ValueError, "steps must be >= 1"),
    (lambda m, x, y: zoo_adam(m, x, y, batch_coordinates=0), ValueError, "batch_coordinates must be >= 1"),
    (lambda m, x, y: zoo_adam(m, x, y, lr=-1.0), ValueError, "lr must be"),
    (lambda m, x, y: zoo_adam(m, x, y[:2]), ValueError, "one label per example"),
    (lambda m, x, y: zoo_adam(m, -x, y), ValueError, r"\[0, 1\]"),
])
def test_bad_arguments_raise_clear_errors(cnn_data, attack, error, match):
    model, x, y = cnn_data
    with pytest.raises(error, match=match):
        attack(model, x, y)


# ------------------------------------------------------------------------------------------------
# Square Attack
# ------------------------------------------------------------------------------------------------


def test_square_schedule_halves_p_at_the_papers_iterations():
    """p halves after iterations 10, 50, 200, ..., 8000 of 10000, rescaled to the budget."""
    assert [square_fraction(i, 10000, 0.8) for i in (0, 10, 11, 50, 51, 201, 8000, 8001, 9999)] == [
        0.8, 0.8, 0.4, 0.4, 0.2, 0.1, 0.8 / 256, 0.8 / 512, 0.8 / 512]
    assert square_fraction(1, 1000, 0.8) == 0.8 and square_fraction(2, 1000, 0.8) == 0.4  # 20 of 10000
    assert square_fraction(999, 1000, 0.5) == 0.5 / 512


def test_square_starts_from_vertical_stripes_and_spends_exactly_its_queries(seeded):
    """On an unfoolable model: the init is +-eps constant down each column, and every query is spent."""
    x = 0.2 + 0.6 * torch.rand(4, 3, 8, 8, generator=seeded(3))  # the box is not active at eps 0.1
    oracle = QueryOracle(confident_model())
    stripes = square(oracle, x, torch.zeros(4, dtype=torch.long), 0.1, queries=2, generator=seeded())
    delta = stripes - x
    assert torch.allclose(delta.abs(), torch.full_like(delta, 0.1), atol=1e-6)
    assert torch.equal(delta.sign(), delta[:, :, :1].sign().expand_as(delta))
    assert (oracle.queries == 2).all()
    square(oracle, x, torch.zeros(4, dtype=torch.long), 0.1, queries=57, generator=seeded())
    assert (oracle.queries == 57).all()


def test_square_with_eps_zero_is_the_identity(seeded, cnn_data):
    model, x, y = cnn_data
    assert torch.equal(square(model, x, y, 0.0, queries=20, generator=seeded()), x)


@settings(max_examples=40, deadline=None)
@given(eps=st.floats(0.0, 0.5), side=st.integers(1, 5), channels=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_square_update_stays_in_the_ball_and_changes_one_square(seeded, eps, side, channels, seed):
    """The proposal lies in the ball and the box, and differs from x_best inside one side x side window only."""
    g = seeded(seed)
    x = torch.rand(3, channels, 6, 6, generator=g)
    ball = LpBall("linf", eps)
    x_best = ball.project(x + eps * (2 * torch.rand(x.shape, generator=g) - 1), x)
    proposal = _linf_update(x_best, x, ball, side, g)
    assert ball.contains(proposal, x).all()
    changed = (proposal != x_best).any(dim=1)  # (3, 6, 6)
    for mask in changed:
        rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        if len(rows):
            assert rows.max() - rows.min() < side and cols.max() - cols.min() < side
    window = changed[:, None].expand_as(proposal)
    vertices = ((x + eps).clamp(0, 1), (x - eps).clamp(0, 1))
    assert ((proposal == vertices[0]) | (proposal == vertices[1]))[window].all()


def test_pyramid_of_side_three():
    """The L2 pattern for a 3 x 3 window: 1/4 on the border, 1/4 + 1 at the centre."""
    assert torch.allclose(_pyramid(3, 3, torch.zeros(())), torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]) / 4)


@settings(max_examples=40, deadline=None)
@given(eps=st.floats(0.01, 2.0), side=st.integers(3, 5), channels=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_square_l2_update_keeps_the_norm_at_eps(seeded, eps, side, channels, seed):
    """Away from the box the L2 proposal has norm exactly eps; in general it lies in the ball and the box."""
    g = seeded(seed)
    ball = LpBall("l2", eps)
    inner = 0.45 + 0.1 * torch.rand(3, channels, 6, 6, generator=g)
    direction = torch.randn(inner.shape, generator=g)
    x_best = inner + 0.04 * direction / direction.flatten(1).norm(dim=1)[:, None, None, None]
    proposal = _l2_update(x_best, inner, LpBall("l2", 0.04), side, g)
    assert torch.allclose(ball.norm(proposal - inner) / 0.04 * eps, torch.full((3,), eps), rtol=1e-4)
    x = torch.rand(3, channels, 6, 6, generator=g)
    x_best = ball.project(x + torch.randn(x.shape, generator=g), x)
    assert ball.contains(_l2_update(x_best, x, ball, side, g), x).all()


@pytest.mark.mnist
def test_square_fools_the_mnist_mlp(seeded, mnist):
    """Measured with these settings: 29/30 fooled at eps 0.2 (median 18 queries per success)."""
    model, (x, y) = zoo.load("mnist_mlp"), mnist(30)
    oracle = QueryOracle(model)
    x_adv = square(oracle, x, y, 0.2, queries=200, generator=seeded())
    ok = fooled(model, x_adv, y)
    assert LpBall("linf", 0.2).contains(x_adv, x).all()
    assert ok.float().mean() >= 0.9 and (oracle.queries <= 200).all()
    assert oracle.queries[ok].float().median() <= 60


@pytest.mark.mnist
def test_targeted_square_reaches_the_target(seeded, mnist):
    """Measured with these settings: 10/10 digits reach the label y + 1."""
    model, (x, y) = zoo.load("mnist_mlp"), mnist(30)
    x, y = x[:10], y[:10]
    target = (y + 1) % 10
    x_adv = square(model, x, y, 0.3, queries=300, target=target, generator=seeded())
    with torch.no_grad():
        reached = model(x_adv).argmax(dim=1) == target
    assert reached.float().mean() >= 0.8


@pytest.mark.mnist
def test_square_is_no_weaker_than_arts(seeded, mnist):
    """ART's SquareAttack (Linf) at the same eps and number of iterations, on the same 30 digits.

    ART draws one window and one sign vector for the whole batch at each iteration, accepts the
    stripes only where they lower the loss, and does not redraw signs that would change nothing;
    it also evaluates the model three times per iteration, where the attack needs one query.
    Measured on these 30 digits at eps 0.15 with 100 queries (98 iterations), seeds 0-3: ours
    fools 0.60-0.73 (0.60 with seed 0), ART 0.40-0.70 (0.53 with seed 0); at eps 0.1 with 300
    queries, ours 0.63-0.70, ART 0.60. Tolerance: ours at least ART's minus 0.1 (three digits of
    30, below one standard error, 0.12, of the difference of two rates near 0.6 on 30 digits),
    so that seeds cannot make the test flaky.
    """
    pytest.importorskip("art")
    from art.attacks.evasion import SquareAttack

    model, (x, y) = zoo.load("mnist_mlp"), mnist(30)
    ours = square(model, x, y, 0.15, queries=100, generator=seeded())
    np.random.seed(0)
    attack = SquareAttack(art_classifier(model), norm=np.inf, eps=0.15, max_iter=98, p_init=0.8, nb_restarts=1,
                          batch_size=128, verbose=False)
    theirs = torch.from_numpy(attack.generate(x.numpy(), y=y.numpy()))
    assert LpBall("linf", 0.15).contains(theirs, x).all()
    ours_rate, theirs_rate = fooled(model, ours, y).float().mean(), fooled(model, theirs, y).float().mean()
    assert ours_rate >= theirs_rate - 0.1


@pytest.mark.mnist
def test_square_l2_is_no_weaker_than_arts(seeded, mnist):
    """ART's SquareAttack (L2) at eps 2 and 98 iterations on the same 30 digits.

    ART shares each iteration's windows across the batch, like its L-infinity version.
    Measured (seeds 0, 1): 100 queries, ours 0.20 and 0.23, ART 0.17 and 0.17; at eps 1.5 with
    300 queries ours 0.37 and 0.40, ART 0.03-0.13. Tolerance as for L-infinity: 0.1.
    """
    pytest.importorskip("art")
    from art.attacks.evasion import SquareAttack

    model, (x, y) = zoo.load("mnist_mlp"), mnist(30)
    ours = square(model, x, y, 2.0, norm="l2", queries=100, generator=seeded())
    np.random.seed(0)
    attack = SquareAttack(art_classifier(model), norm=2, eps=2.0, max_iter=98, p_init=0.8, nb_restarts=1,
                          batch_size=128, verbose=False)
    with np.errstate(divide="ignore", invalid="ignore"):  # ART divides by a zero norm on some windows
        theirs = torch.from_numpy(attack.generate(x.numpy(), y=y.numpy()))
    assert LpBall("l2", 2.0).contains(ours, x).all()
    assert fooled(model, ours, y).float().mean() >= fooled(model, theirs, y).float().mean() - 0.1


# ------------------------------------------------------------------------------------------------
# ZOO
# ------------------------------------------------------------------------------------------------


def test_symmetric_differences_are_exact_for_a_quadratic():
    """For f = ||x||^2 the estimate is 2 x_i inside the box, one-sided (h) at a pixel at 0."""
    x = torch.tensor([[0.0, 0.25, 0.5, 1.0]], dtype=torch.float64)
    coords = torch.tensor([[0, 1, 2, 3]])
    probes = _symmetric_probes(x, coords, 1e-3)
    assert probes.shape == (1, 8, 4) and probes.min() >= 0 and probes.max() <= 1
    g = _coordinate_gradient(probes.pow(2).sum(dim=2), probes, coords)
    assert torch.allclose(g, torch.tensor([[1e-3, 0.5, 1.0, 2.0 - 1e-3]], dtype=torch.float64))


def test_coordinate_adam_matches_torch_adam_on_each_coordinate():
    """A coordinate updated at every step follows torch.optim.Adam; one never chosen stays put."""
    grads = torch.tensor([0.3, -1.2, 0.05, 2.0, -0.4])
    state = (torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2))
    w = torch.zeros(1, 2)
    reference = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.Adam([reference], lr=0.1, eps=1e-8)
    for g in grads:
        w[0, 1] += _adam_step(state, torch.tensor([0]), torch.tensor([[1]]), g.view(1, 1), 0.1)[0, 0]
        reference.grad = g.view(1)
        optimiser.step()
    assert torch.allclose(w[0, 1], reference.detach()[0], atol=1e-6)
    assert w[0, 0] == 0 and state[2].tolist() == [[0.0, 5.0]]


def test_zoo_spends_two_b_plus_one_queries_per_iteration(seeded, cnn_data):
    model, x, y = cnn_data
    oracle = QueryOracle(model)
    zoo_adam(oracle, x, y, steps=3, batch_coordinates=10, abort_early=False, generator=seeded())
    assert (oracle.queries == 3 * 21).all()
    points = QueryOracle(nn.Linear(3, 2))
    zoo_adam(points, torch.full((1, 3), 0.5), torch.tensor([0]), steps=2, abort_early=False)  # B capped at d = 3
    assert points.queries.tolist() == [2 * 7]


@pytest.mark.mnist
def test_zoo_fools_the_mnist_mlp_with_small_l2(seeded, mnist):
    """Measured with these settings on the first 10 digits: 10/10 fooled, median L2 1.52, 771-2056 queries."""
    model, (x, y) = zoo.load("mnist_mlp"), mnist(30)
    x, y = x[:10], y[:10]
    oracle = QueryOracle(model)
    x_adv = zoo_adam(oracle, x, y, steps=60, lr=0.1, generator=seeded())
    ok = fooled(model, x_adv, y)
    assert ok.all() and (x_adv - x).flatten(1).norm(dim=1).median() < 2.5
    assert (oracle.queries <= 60 * 257).all()


@pytest.mark.mnist
def test_zoo_confidence_and_target(seeded, mnist):
    """A target is reached with the requested margin kappa on the log-probabilities."""
    model, (x, y) = zoo.load("mnist_mlp"), mnist(30)
    x, y = x[:4], y[:4]
    target = (y + 1) % 10
    x_adv = zoo_adam(model, x, y, kappa=1.0, steps=80, lr=0.1, target=target, generator=seeded())
    with torch.no_grad():
        log_p = model(x_adv).log_softmax(dim=1)
    others = log_p.scatter(1, target[:, None], -math.inf).amax(dim=1)
    assert (log_p.gather(1, target[:, None]).squeeze(1) - others > 1.0).all()


@pytest.mark.mnist
def test_zoo_is_no_weaker_than_arts(seeded, mnist):
    """ART's ZooAttack with the same constant, rate, h, 128 coordinates and iterations (2B + 1 queries each).

    ART clips its perturbation to [0, 1] instead of the image (so it can only brighten pixels)
    and resets ADAM after its first success. Measured on 5 digits, 20 iterations, c = 1, lr 0.1:
    both fool 5/5, our median L2 1.76 against ART's 2.81 (ratio 0.49 where both succeed); on
    10 digits with 50 iterations, 10/10 and 1.13 against 8/10 and 2.77. Tolerance: ours fools
    at least as many, with a median L2 at most 10% above ART's.
    """
    pytest.importorskip("art")
    from art.attacks.evasion import ZooAttack

    model, (x, y) = zoo.load("mnist_mlp"), mnist(30)
    x, y = x[:4], y[:4]
    ours = zoo_adam(model, x, y, c=1.0, steps=15, lr=0.1, abort_early=False, generator=seeded())
    np.random.seed(0)
    attack = ZooAttack(art_classifier(model), confidence=0.0, learning_rate=0.1, max_iter=15, binary_search_steps=1,
                       initial_const=1.0, abort_early=False, use_resize=False, use_importance=False, nb_parallel=128,
                       batch_size=1, variable_h=1e-4, verbose=False)
    theirs = torch.from_numpy(attack.generate(x.numpy(), y=y.numpy()))
    ours_ok, theirs_ok = fooled(model, ours, y), fooled(model, theirs, y)
    assert ours_ok.sum() >= theirs_ok.sum()
    l2 = (ours - x).flatten(1).norm(dim=1)[ours_ok].median()
    assert theirs_ok.sum() == 0 or l2 <= 1.1 * (theirs - x).flatten(1).norm(dim=1)[theirs_ok].median()


def test_an_oracle_never_reset_asks_for_its_attacked_set(linear_model, images):
    with pytest.raises(ValueError, match=r"oracle.reset\(n\)"):
        QueryOracle(linear_model)(images)
