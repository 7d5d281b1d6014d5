"""The shared model helpers: predictions and accuracy in eval mode, in chunks, on the model's device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustdl import accuracy, predict
from robustdl._model import eval_mode


def test_predict_is_the_argmax_whatever_the_chunks(linear_model, images):
    with torch.no_grad():
        expected = linear_model(images).argmax(dim=1)
    assert torch.equal(predict(linear_model, images), expected)
    assert torch.equal(predict(linear_model, images, batch_size=3), expected)


def test_accuracy_is_the_exact_fraction_classified_as_labelled(linear_model, images):
    y = predict(linear_model, images)
    y[:3] = (y[:3] + 1) % 3
    assert accuracy(linear_model, images, y) == 5 / 8
    assert accuracy(linear_model, images, y, batch_size=5) == 5 / 8


def test_predict_runs_in_eval_mode_and_restores_the_mode(images):
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.9), nn.Linear(images[0].numel(), 3)).train()
    with eval_mode(model), torch.no_grad():
        expected = model(images).argmax(dim=1)
    assert torch.equal(predict(model, images), expected) and model.training


def test_a_float64_model_takes_float32_inputs(linear_model, images):
    model = linear_model.double()
    assert accuracy(model, images.float(), predict(model, images.double())) == 1.0


@pytest.mark.parametrize("call, error, match", [
    (lambda m, x: predict(object(), x), TypeError, "model must be a torch.nn.Module"),
    (lambda m, x: predict(m, x, batch_size=0), ValueError, "batch_size must be >= 1"),
    (lambda m, x: accuracy(m, x, torch.zeros(3, dtype=torch.long)), ValueError, "y must have shape"),
    (lambda m, x: accuracy(m, x[:0], torch.zeros(0, dtype=torch.long)), ValueError, "at least one example"),
])
def test_bad_input_is_named(linear_model, images, call, error, match):
    with pytest.raises(error, match=match):
        call(linear_model, images)
