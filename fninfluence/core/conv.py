"""Convolutions in the tap's layout: receptive-field patches, and per-example weight gradients without them.

A ``conv1d`` / ``conv2d`` call with weight ``[O, C/G, *k]`` is the layer ``[G, O/G, (C/G) prod(k)]`` applied at
every output position (the tokens): its inputs are the patches ``a: [B, T, G, in]`` (:func:`patches`, F.unfold)
and example ``n``'s gradient is ``G_n = sum_t g_{n,t} a_{n,t}^T``. Forming ``a`` costs ``prod(k)`` times the
input; :func:`example_grads` gets every ``G_n`` from the convolution's own weight-gradient kernel instead, by
treating the batch as groups (input ``[1, B C, ...]``, output gradient ``[1, B O, ...]``, ``B G`` groups), which
never forms the patches (measured 2-100x faster than unfolding and contracting, depending on the shapes).

Padding is explicit (``(before, after)`` per spatial dimension) and applied to ``x`` here, so ``"same"`` with an
even kernel is exact; a module's non-zero padding mode has already been applied by the module before the call.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Tuple

import torch
import torch.nn.functional as F


class ConvSettings(NamedTuple):
    """A convolution call's settings, per spatial dimension, and whether its layer has a tracked bias (then ``a``
    ends with a column of ones)."""

    kernel: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Tuple[Tuple[int, int], ...]
    dilation: Tuple[int, ...]
    groups: int
    bias: bool = False


def expand(value: Any, n: int) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    return value * n if len(value) == 1 else value


def explicit_padding(padding: Any, kernel: Tuple[int, ...], dilation: Tuple[int, ...]) -> Tuple[Tuple[int, int], ...]:
    """Per spatial dim ``(before, after)`` zero padding of a conv call's ``padding`` argument."""
    n = len(kernel)
    if padding == "valid":
        return ((0, 0),) * n
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in totals)
    return tuple((p, p) for p in expand(padding, n))


def settings_of(weight_shape: Tuple[int, ...], stride: Any, padding: Any, dilation: Any, groups: int) -> ConvSettings:
    kernel = tuple(weight_shape[2:])
    spatial = len(kernel)
    dilation = expand(dilation, spatial)
    return ConvSettings(kernel, expand(stride, spatial), explicit_padding(padding, kernel, dilation), dilation,
                        int(groups))


def _padded(x: torch.Tensor, settings: ConvSettings) -> torch.Tensor:
    flat = [p for pair in reversed(settings.padding) for p in pair]  # F.pad wants the last dim first
    return F.pad(x, flat) if any(flat) else x


def output_shape(x: torch.Tensor, settings: ConvSettings) -> Tuple[int, ...]:
    """The spatial shape of the convolution's output for input ``x`` (before padding)."""
    return tuple((size + before + after - d * (k - 1) - 1) // s + 1
                 for size, (before, after), k, s, d in zip(x.shape[2:], settings.padding, settings.kernel,
                                                           settings.stride, settings.dilation))


def positions(x: torch.Tensor, settings: ConvSettings) -> int:
    """Output positions per example (the layer's tokens)."""
    return math.prod(output_shape(x, settings))


def patches(x: torch.Tensor, settings: ConvSettings) -> torch.Tensor:
    """Receptive-field patches ``[B, T, G, (C/G) prod(k)]`` (with the bias column when ``settings.bias``)."""
    x = _padded(x, settings)
    kernel, dilation, stride = settings.kernel, settings.dilation, settings.stride
    if len(kernel) == 1:  # conv1d as conv2d over a height-1 image
        x, kernel, dilation, stride = x.unsqueeze(-2), (1, *kernel), (1, *dilation), (1, *stride)
    cols = F.unfold(x, kernel_size=kernel, dilation=dilation, stride=stride)  # [B, C K, T]
    batch, _, tokens = cols.shape
    a = cols.reshape(batch, settings.groups, -1, tokens).permute(0, 3, 1, 2)
    if settings.bias:
        a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
    return a


def example_grads(x: torch.Tensor, g: torch.Tensor, settings: ConvSettings) -> torch.Tensor:
    """``G_n = sum_t g_{n,t} a_{n,t}^T`` for every example: ``[B, G, O/G, in]`` from ``x`` ``[B, C, *spatial]`` and
    the output gradients ``g`` ``[B, T, G, O/G]``, through the weight-gradient kernel (see the module)."""
    batch, channels = x.shape[:2]
    groups = settings.groups
    out = g.shape[-1]
    spatial_out = output_shape(x, settings)
    symmetric = all(before == after for before, after in settings.padding)
    padding = [before for before, _ in settings.padding] if symmetric else [0] * len(settings.kernel)
    x = x if symmetric else _padded(x, settings)  # the kernel pads symmetrically itself, without a copy
    grad_output = g.permute(0, 2, 3, 1).reshape(1, batch * groups * out, *spatial_out)
    weight_shape = [batch * groups * out, channels // groups, *settings.kernel]
    grads = _weight_grads(grad_output.contiguous(), x.reshape(1, batch * channels, *x.shape[2:]), weight_shape,
                          list(settings.stride), padding, list(settings.dilation), batch * groups)
    grads = grads.reshape(batch, groups, out, -1)
    if settings.bias:
        grads = torch.cat([grads, g.sum(1)[..., None]], dim=-1)
    return grads


def _weight_grads_eager(grad_output: torch.Tensor, x: torch.Tensor, weight_shape, stride, padding, dilation,
                        groups: int) -> torch.Tensor:
    weight = x.new_empty(weight_shape)
    return torch.ops.aten.convolution_backward(grad_output, x, weight, None, stride, padding, dilation, False,
                                               [0] * len(stride), groups, [False, True, False])[1]


@torch.library.custom_op("fninfluence::conv_weight_grads", mutates_args=())
def _weight_grads_op(grad_output: torch.Tensor, x: torch.Tensor, weight_shape: list[int], stride: list[int],
                     padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    # contiguous: the layout the fake below promises (a kernel may pick another, e.g. channels-last on a GPU)
    return _weight_grads_eager(grad_output, x, weight_shape, stride, padding, dilation, groups).contiguous()


@_weight_grads_op.register_fake
def _(grad_output, x, weight_shape, stride, padding, dilation, groups):
    return x.new_empty(weight_shape)


def _weight_grads(grad_output, x, weight_shape, stride, padding, dilation, groups):
    """The weight-gradient kernel; under ``torch.compile`` as an opaque op, so that inductor passes the batch-as-groups
    views to it as they are instead of materialising its own copies of the input and output gradient."""
    if torch.compiler.is_compiling():
        return _weight_grads_op(grad_output.detach(), x.detach(), weight_shape, stride, padding, dilation, groups)
    return _weight_grads_eager(grad_output, x, weight_shape, stride, padding, dilation, groups)


def in_features(channels: int, settings: ConvSettings) -> int:
    return channels // settings.groups * math.prod(settings.kernel) + int(settings.bias)
