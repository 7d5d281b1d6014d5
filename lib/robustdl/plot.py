"""Figures the chapters show: image grids with predictions, the adversarial triple, curves.

Every function returns a :class:`matplotlib.figure.Figure` made with ``plt.subplots`` (so a
notebook displays it) and takes images in [0, 1], shape (N, C, H, W) or (C, H, W).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

__all__ = ["accuracy_curve", "adversarial_triple", "image_grid", "slider", "to_image"]


def to_image(x: Tensor) -> np.ndarray:
    """One image (C, H, W) in [0, 1] as an array matplotlib shows: (H, W) or (H, W, C)."""
    if x.dim() != 3:
        raise ValueError(f"x must be one image of shape (C, H, W), got shape {tuple(x.shape)}")
    array = x.detach().cpu().float().numpy()
    return array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0))


def _show(ax: plt.Axes, x: Tensor) -> None:
    ax.imshow(to_image(x), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _name(label: int, class_names: Sequence[str] | None) -> str:
    return class_names[label] if class_names is not None else str(label)


def image_grid(
    images: Tensor,
    labels: Tensor | None = None,
    predictions: Tensor | None = None,
    class_names: Sequence[str] | None = None,
    ncols: int = 8,
    size: float = 1.4,
) -> Figure:
    """A grid of images titled ``true / predicted``; wrong predictions in red."""
    n = len(images)
    if n == 0:
        raise ValueError("images must hold at least one image, got an empty batch")
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        _show(ax, images[i])
        parts, color = [], "black"
        if labels is not None:
            parts.append(_name(int(labels[i]), class_names))
        if predictions is not None:
            parts.append(_name(int(predictions[i]), class_names))
            if labels is not None and int(predictions[i]) != int(labels[i]):
                color = "tab:red"
        ax.set_title(" / ".join(parts), fontsize=9, color=color)
    if labels is not None and predictions is not None:
        fig.suptitle("true / predicted (wrong in red)", fontsize=10)
    fig.tight_layout()
    return fig


def adversarial_triple(
    model: nn.Module,
    x: Tensor,
    x_adv: Tensor,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """Original, perturbation and adversarial image with the model's top class and confidence.

    The figure that opens the seed tutorial: "pig" (91%) + 0.005 x noise = "airliner" (99%).
    The perturbation is drawn on a diverging scale centred at zero, its L_inf size in the title.
    """
    if x.dim() == 4:
        x, x_adv = x[0], x_adv[0]
    if x.shape != x_adv.shape:
        raise ValueError(f"x_adv must have the shape of x {tuple(x.shape)}, got {tuple(x_adv.shape)}")
    with torch.no_grad():
        probs = torch.softmax(model(torch.stack([x, x_adv])), dim=1)
    conf, pred = probs.max(dim=1)
    delta = (x_adv - x).detach().cpu()
    size = float(delta.abs().max())

    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.9))
    _show(axes[0], x)
    axes[0].set_title(f'"{_name(int(pred[0]), class_names)}" ({100 * conf[0]:.0f}%)')
    scale = max(size, 1e-12)
    axes[1].imshow(to_image(delta).mean(axis=-1) if delta.shape[0] == 3 else to_image(delta),
                   cmap="seismic", vmin=-scale, vmax=scale, interpolation="nearest")
    axes[1].set_xticks([])
    axes[1].set_yticks([])
    axes[1].set_title(f"perturbation, max |δ| = {size:.3g}")
    _show(axes[2], x_adv)
    axes[2].set_title(f'"{_name(int(pred[1]), class_names)}" ({100 * conf[1]:.0f}%)')
    fig.text(0.345, 0.45, "+", fontsize=22, ha="center")
    fig.text(0.66, 0.45, "=", fontsize=22, ha="center")
    fig.tight_layout(w_pad=3)
    return fig


def accuracy_curve(
    eps: Sequence[float],
    accuracies: Mapping[str, Sequence[float]],
    xlabel: str = r"$\epsilon$",
    title: str | None = None,
) -> Figure:
    """Accuracy against the threat model's radius, one line per attack or model."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, values in accuracies.items():
        if len(values) != len(eps):
            raise ValueError(f"accuracies[{label!r}] must have one value per eps ({len(eps)}), got {len(values)}")
        ax.plot(eps, [100 * v for v in values], marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def slider(
    draw: Callable[[float], Figure],
    values: Sequence[float],
    name: str = "eps",
    static_values: Sequence[float] | None = None,
) -> None:
    """An ipywidgets slider over ``values`` redrawing ``draw(value)``, or static figures.

    A rendered book cannot run widgets, so where ``$ROBUSTDL_WIDGETS`` is ``0`` (``make book``
    and nbval set it) or ipywidgets is missing, the figures for ``static_values`` (default:
    the first, middle and last value) are shown instead.
    """
    from IPython.display import display

    if not values:
        raise ValueError(f"values must hold at least one {name}, got an empty sequence")
    try:
        import ipywidgets
    except ImportError:
        ipywidgets = None
    if ipywidgets is None or os.environ.get("ROBUSTDL_WIDGETS", "1") == "0":
        shown = static_values or sorted({values[0], values[len(values) // 2], values[-1]})
        for value in shown:
            fig = draw(value)
            display(fig)
            plt.close(fig)
        return

    def update(value: float) -> None:
        fig = draw(value)
        display(fig)
        plt.close(fig)

    options = [(f"{v:g}", v) for v in values]
    ipywidgets.interact(update, value=ipywidgets.SelectionSlider(options=options, description=name))
