"""Figures: they draw what they are given and reject what they cannot draw."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch

from robustdl.plot import accuracy_curve, adversarial_triple, image_grid, slider, to_image


def test_image_grid_marks_wrong_predictions_in_red():
    x = torch.rand(5, 1, 8, 8)
    fig = image_grid(x, torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 1, 9, 3, 4]), ncols=3)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    colors = [ax.title.get_color() for ax in fig.axes if ax.get_title()]
    assert titles == ["0 / 0", "1 / 1", "2 / 9", "3 / 3", "4 / 4"]
    assert colors[2] == "tab:red" and colors[0] == "black"
    plt.close(fig)


def test_adversarial_triple_reports_predictions_and_size(linear_model):
    x = torch.full((1, 2, 2), 0.5)
    x_adv = x + torch.tensor([0.1, -0.1, 0.0, 0.05]).view(1, 2, 2)
    fig = adversarial_triple(linear_model, x, x_adv, ["a", "b", "c"])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[1] == "perturbation, max |δ| = 0.1"
    assert titles[0].startswith('"') and "%" in titles[2]
    plt.close(fig)


def test_to_image_layouts():
    assert to_image(torch.rand(1, 4, 5)).shape == (4, 5)
    assert to_image(torch.rand(3, 4, 5)).shape == (4, 5, 3)
    with pytest.raises(ValueError, match="one image"):
        to_image(torch.rand(2, 1, 4, 5))


def test_accuracy_curve_checks_lengths():
    fig = accuracy_curve([0, 0.1], {"FGSM": [1.0, 0.5]})
    assert fig.axes[0].lines[0].get_ydata().tolist() == [100.0, 50.0]
    plt.close(fig)
    with pytest.raises(ValueError, match="one value per eps"):
        accuracy_curve([0, 0.1], {"FGSM": [1.0]})


def test_slider_falls_back_to_static_figures(monkeypatch):
    monkeypatch.setenv("ROBUSTDL_WIDGETS", "0")
    drawn = []

    def draw(value):
        drawn.append(value)
        return plt.figure()

    slider(draw, [0.0, 0.1, 0.2, 0.3, 0.4])
    assert drawn == [0.0, 0.2, 0.4]
    with pytest.raises(ValueError, match="at least one"):
        slider(draw, [])
