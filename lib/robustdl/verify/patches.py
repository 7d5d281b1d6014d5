r"""Patches: CROWN's linear functions of a convolution's neurons, each kept as its local window.

A neuron :math:`z_{c,i,j}` of a convolution's output depends only on a window of each feature map
below it, its receptive field: the kernel :math:`w_c` at position :math:`(i, j)` of the layer's
input, which a further convolution (stride :math:`s`, kernel :math:`k`) widens to
:math:`(h - 1) s + k` and a ReLU or an elementwise affine layer leaves as it is. So the
coefficients :math:`\Lambda` of CROWN's backward pass (Zhang et al. 2018
:cite:`zhang2018efficient`, Theorem 3.2) for that neuron are zero outside the window, and can be
kept as the window alone, (C, h, w) rather than (C, H, W): the *patches* representation of Xu et
al. (2020) :cite:`xu2020automatic`. Each step of the pass then costs what the window holds, not
what the whole map holds, which is what makes CROWN's bounds on the neurons of a second
convolution cheap.

A :class:`Patches` holds K such windows per example and where they lie; the bound operators
(:mod:`robustdl.verify.operators`) map it through their layers with ``backward_patches``, and
:meth:`Patches.concretise` bounds it over the threat model like :meth:`LpBall.concretise` does
for dense coefficients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustdl.threat import LpBall

__all__ = ["Patches"]


def _transposed(conv: nn.Conv2d, window: tuple[int, int, int]) -> Tensor:
    r"""The matrix of :math:`\Lambda \mapsto \Lambda W` from a window (C_out, h, w) of ``conv``'s output to the input.

    Row r is the r-th unit window pushed through the transposed convolution: shape
    (C_out h w, C_in, (h-1) s + d (k-1) + 1, ...), the input window the output window reads
    (with every input channel, whatever the groups).
    """
    units = torch.eye(math.prod(window), dtype=conv.weight.dtype, device=conv.weight.device).view(-1, *window)
    return F.conv_transpose2d(units, conv.weight, stride=conv.stride, dilation=conv.dilation, groups=conv.groups)


@dataclass(frozen=True)
class Patches:
    r"""K linear functions per example of a feature map (C, H, W), each zero outside its window.

    Row k of example n has coefficients ``A[n, k]`` (C, h, w) on the window whose top-left corner
    is at ``position[n, k] * stride - padding`` (rows, columns) of the map; entries of a window that
    fall outside the map (into a convolution's zero padding) are zero.
    """

    #: The windows' coefficients, (N, K, C, h, w).
    A: Tensor
    #: Each row's position (i, j) on the grid of windows, (N, K, 2), long.
    position: Tensor
    stride: tuple[int, int]
    padding: tuple[int, int]

    @classmethod
    def of_conv(cls, conv: nn.Conv2d, neurons: Tensor, out_shape: torch.Size, in_shape: torch.Size,
                sign: float) -> tuple[Patches, Tensor]:
        r"""The rows :math:`\mathrm{sign} \cdot z_{c,i,j}` for ``neurons`` (N, K) of ``conv``'s output, and the biases.

        ``neurons`` index the flattened output (C, H, W) of shape ``out_shape``. The neuron
        :math:`z_{c,i,j} = w_c \cdot x_{\mathrm{window}(i, j)} + b_c` is the kernel :math:`w_c` on the
        window of its receptive field in the input (of shape ``in_shape``), and the bias :math:`b_c`:
        the 1x1 window of the output at :math:`(i, j)`, through :func:`_transposed`.
        """
        height, width = out_shape[-2:]
        channel, i, j = neurons // (height * width), neurons // width % height, neurons % width
        kernels = _transposed(conv, (conv.out_channels, 1, 1))  # (C_out, C_in, kh', kw')
        patches = cls(sign * kernels[channel], torch.stack([i, j], dim=-1), conv.stride, conv.padding)
        bias = sign * conv.bias[channel] if conv.bias is not None else conv.weight.new_zeros(neurons.shape)
        return patches.inside(in_shape), bias

    def windows(self, t: Tensor) -> Tensor:
        """The values of a map ``t`` (N or 1, C, H, W) on each row's window: (N, K, C, h, w), zero outside the map."""
        n, k, _, h, w = self.A.shape
        grid_w = (t.shape[-1] + 2 * self.padding[1] - w) // self.stride[1] + 1
        columns = F.unfold(t, (h, w), padding=self.padding, stride=self.stride)  # (N or 1, C h w, windows)
        index = self.position[..., 0] * grid_w + self.position[..., 1]  # (N, K)
        batch = torch.arange(n, device=t.device).unsqueeze(1) if len(t) > 1 else torch.zeros_like(index[:, :1])
        return columns.transpose(1, 2)[batch, index].view(n, k, t.shape[1], h, w)

    def inside(self, shape: torch.Size) -> Patches:
        """The same rows with the entries outside a map of ``shape`` (C, H, W) set to zero (padding is constant)."""
        ones = self.A.new_ones(1, 1, *shape[-2:])
        return replace(self, A=self.A * self.windows(ones))

    def through_conv(self, conv: nn.Conv2d, in_shape: torch.Size) -> Patches:
        r""":math:`\Lambda \leftarrow \Lambda W` for ``conv``'s weight :math:`W`: each window, transposed-convolved.

        A window (C_out, h, w) of the output becomes one (C_in, (h-1) s + d (k-1) + 1, ...) of the
        input, whose corner moves to ``corner * s - p``; so the grid's stride multiplies by s and its
        padding becomes ``padding * s + p``. The map from window to window is linear and the same for
        every row: its matrix (:func:`_transposed`) is built once and applied to all rows as one product.
        """
        n, k, *window = self.A.shape
        matrix = _transposed(conv, tuple(window))
        A = (self.A.flatten(2) @ matrix.flatten(1)).view(n, k, *matrix.shape[1:])
        stride = tuple(a * s for a, s in zip(self.stride, conv.stride, strict=True))
        padding = tuple(a * s + p for a, s, p in zip(self.padding, conv.stride, conv.padding, strict=True))
        return Patches(A, self.position, stride, padding).inside(in_shape)

    def inner(self, t: Tensor) -> Tensor:
        r""":math:`\langle \Lambda_k, t \rangle` for each example and row, (N, K), for a map ``t`` (N or 1, C, H, W)."""
        return (self.A * self.windows(t)).flatten(2).sum(-1)

    def concretise(self, ball: LpBall, x: Tensor) -> Tensor:
        r"""Lower bounds (N, K) on the rows over the threat model around ``x``: :meth:`LpBall.concretise` per window.

        A row is zero outside its window, so its bound over the ball is the bound of the window's
        coefficients over the ball's coordinates in the window (the image's, zero-padded).
        """
        n, k = self.A.shape[:2]
        return ball.concretise(self.A.reshape(n * k, 1, -1), self.windows(x).reshape(n * k, -1)).view(n, k)
