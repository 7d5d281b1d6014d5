"""Generalisation measures: weight correlation, operator norms, Table 1's measures, GE/RGE, Kendall's tau."""

from __future__ import annotations

import math

import numpy
import pandas
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from robustdl.layers import layer_input_shapes, operator_norm, weight_correlation, weight_matrices
from robustdl.measures import (
    average_weight_correlation,
    complexity_measures,
    correlation_term,
    generalisation_error,
    kendall_tau,
    pac_bayes,
    pac_bayes_sigma,
    robust_generalisation_error,
)


def test_orthogonal_rows_have_no_correlation_and_identical_rows_full_correlation():
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    assert weight_correlation(q[:4]).item() == pytest.approx(0.0, abs=1e-12)
    w = torch.randn(1, 5).repeat(3, 1)
    assert weight_correlation(w).item() == pytest.approx(1.0)
    assert weight_correlation(torch.cat([w, -w])).item() == pytest.approx(1.0)  # |cos|: opposite rows count


def test_weight_correlation_by_hand():
    # Rows (1, 0), (1, 1), (0, 2): |cos| 1/sqrt2, 0, 1/sqrt2 for the pairs (12), (13), (23).
    w = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    assert weight_correlation(w).item() == pytest.approx(2 * (2 / math.sqrt(2)) / 6)


def test_conv_filters_are_reshaped_into_neurons():
    conv = nn.Conv2d(2, 3, 2)
    assert weight_correlation(conv.weight).item() == pytest.approx(weight_correlation(conv.weight.flatten(1)).item())
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(12, 4))
    assert [tuple(w.shape) for w in weight_matrices(model)] == [(3, 8), (4, 12)]
    expected = (weight_correlation(conv.weight) + weight_correlation(model[2].weight)).item() / 2
    assert average_weight_correlation(model) == pytest.approx(expected)


@pytest.mark.parametrize("bad", [torch.ones(1, 4), torch.ones(5), "w"])
def test_weight_correlation_rejects_fewer_than_two_neurons(bad):
    with pytest.raises(ValueError, match="two neurons"):
        weight_correlation(bad)


def test_linear_operator_norm_is_the_largest_singular_value():
    layer = nn.Linear(7, 5)
    assert operator_norm(layer) == pytest.approx(torch.linalg.matrix_norm(layer.weight, ord=2).item())


def explicit_matrix(conv: nn.Conv2d, shape: tuple[int, int, int]) -> torch.Tensor:
    """The matrix of a convolution (no bias) on inputs of ``shape``: its images of the basis vectors."""
    basis = torch.eye(math.prod(shape), dtype=torch.float64).view(-1, *shape)
    with torch.no_grad():
        out = nn.functional.conv2d(basis, conv.weight.double(), None, conv.stride, conv.padding)
    return out.flatten(1).T


@pytest.mark.parametrize(("stride", "padding", "side"), [(1, 0, 5), (1, 1, 4), (2, 1, 6), (2, 0, 7)])
def test_conv_operator_norm_matches_its_explicit_matrix(stride, padding, side):
    torch.manual_seed(stride + padding + side)
    conv = nn.Conv2d(2, 3, 3, stride=stride, padding=padding).double()
    exact = torch.linalg.matrix_norm(explicit_matrix(conv, (2, side, side)), ord=2).item()
    assert operator_norm(conv, (2, side, side), iters=300) == pytest.approx(exact, rel=1e-4)
    # Miyato's reshaped kernel is a different number: the operator's is what bounds the layer.
    assert torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2).item() != pytest.approx(exact, rel=1e-3)


def test_conv_operator_norm_needs_the_input_shape():
    with pytest.raises(ValueError, match="input_shape"):
        operator_norm(nn.Conv2d(1, 1, 3))
    with pytest.raises(TypeError, match=r"Linear or nn\.Conv2d"):
        operator_norm(nn.ReLU())


def test_layer_input_shapes_follow_the_forward_pass():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 2))
    shapes = layer_input_shapes(model, (1, 7, 7))
    assert shapes[model[0]] == (1, 7, 7) and shapes[model[3]] == (36,)
    assert model(torch.zeros(1, 1, 7, 7)).shape == (1, 2)  # the probe left no hook behind


def two_layer(w1: list[list[float]], w2: list[list[float]]) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(w1))
        model[2].weight.copy_(torch.tensor(w2))
    return model


def test_complexity_measures_of_a_hand_set_network():
    final = two_layer([[3.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]])
    init = two_layer([[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 0.0]])
    data = (torch.rand(8, 2, dtype=torch.float64), torch.zeros(8, dtype=torch.long))
    m = complexity_measures(final, init, data, (2,), sigma=0.5)
    assert m["PFN"] == pytest.approx(math.sqrt(10) * 2)
    assert m["PSN"] == pytest.approx(3 * 2)
    assert m["NoP"] == 8
    # Differences: diag(-2, 0) (norm 2) and [[0, 0], [0, -1]] (norm 1).
    assert m["SoSP"] == pytest.approx(8 * (2 + 1))
    assert m["PB"] == pytest.approx((4 + 1) / (2 * 0.25))
    assert m["WC"] == pytest.approx((0 + 1) / 2)
    # g: layer 1 uncorrelated (0); layer 2, rho = 1, is capped just below 1 and is huge.
    assert correlation_term(final[0].weight) == pytest.approx(0.0, abs=1e-12)
    assert m["PBC"] > m["PB"] + 10


def test_correlation_term_grows_with_correlation():
    base = torch.randn(4, 6)
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    values = [correlation_term(w) for w in (q[:4], base, base + 3 * torch.randn(1, 6).expand(4, 6))]
    assert values[0] == pytest.approx(0.0, abs=1e-9) and values[0] < values[1] < values[2]
    rho = weight_correlation(base).item()
    equicorrelation = torch.full((4, 4), rho, dtype=torch.float64).fill_diagonal_(1)
    assert values[1] == pytest.approx(-6 / 2 * torch.logdet(equicorrelation).item(), rel=1e-6)


def test_pac_bayes_sigma_is_larger_for_a_flatter_network():
    torch.manual_seed(0)
    x = torch.randn(400, 2)
    y = (x[:, 0] > 0).long()
    sharp = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        sharp[0].weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        sharp[0].bias.zero_()
    flat = nn.Sequential(nn.Linear(2, 2))
    flat.load_state_dict({k: 10 * v for k, v in sharp.state_dict().items()})
    s_sharp, s_flat = (pac_bayes_sigma(m, (x, y), bounds=(1e-3, 100.0)) for m in (sharp, flat))
    # Scaling the weights by 10 leaves the classifier unchanged and tolerates 10 times the noise.
    assert s_flat == pytest.approx(10 * s_sharp, rel=0.35)
    assert pac_bayes(sharp, sharp, 0.1) == 0.0


def test_generalisation_error_is_zero_on_identical_sets_and_the_loss_gap_otherwise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    a = (torch.rand(20, 1, 2, 2), torch.randint(0, 3, (20,)))
    b = (torch.rand(30, 1, 2, 2), torch.randint(0, 3, (30,)))
    assert generalisation_error(model, a, a) == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        gap = abs(nn.functional.cross_entropy(model(b[0]), b[1]) - nn.functional.cross_entropy(model(a[0]), a[1]))
    assert generalisation_error(model, a, b, batch_size=7) == pytest.approx(gap.item(), rel=1e-5)
    identity = lambda m, x, y: x  # noqa: E731
    assert robust_generalisation_error(model, a, b, identity) == pytest.approx(gap.item(), rel=1e-5)


def test_kendall_tau_reproduces_the_tutorials_table_2():
    ge = [2.056, 2.354, 0.929, 0.553, 0.678, 2.681, 2.552, 2.807, 1.437]
    pbc = [1.14e5, 1.24e5, 3.41e4, 3.73e4, 4.26e4, 1.34e5, 1.30e5, 1.62e7, 1.04e9]
    pb = [1.1e4, 8.8e3, 2.0e3, 2.6e3, 3.3e3, 4.7e3, 1.0e4, 1.6e7, 1.0e9]
    assert kendall_tau(pbc, ge)[1:] == (29, 7) and kendall_tau(pbc, ge).tau == pytest.approx(0.61, abs=0.005)
    assert kendall_tau(pb, ge)[1:] == (24, 12) and kendall_tau(pb, ge).tau == pytest.approx(1 / 3)
    assert kendall_tau(pandas.Series(pb), numpy.array(ge)) == kendall_tau(pb, ge)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=2, max_size=12))
def test_kendall_tau_matches_scipy(pairs):
    a, b = zip(*pairs, strict=True)
    expected = scipy.stats.kendalltau(a, b).statistic
    ours = kendall_tau(a, b).tau
    assert (math.isnan(ours) and math.isnan(expected)) or ours == pytest.approx(expected)


def test_kendall_tau_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same length"):
        kendall_tau([1, 2, 3], [1, 2])
