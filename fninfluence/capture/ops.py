"""Per-op handlers of the tap: how a tracked call's input becomes per-token layer inputs.

Every tracked layer is seen through one lens: a weight of shape ``[groups, out, in]`` applied at
``tokens`` positions of each example. A layer input becomes ``a: [batch, tokens, groups, in]`` (with a
trailing column of ones when the call adds a tracked bias) and the output gradient becomes
``g: [batch, tokens, groups, out]``, so that example ``b``'s weight gradient is
``sum_t g[b, t] a[b, t]^T`` for every op:

* ``linear``: tokens are all the dims between the batch dim and the feature dim, ``groups = 1``;
* ``conv1d`` / ``conv2d``: tokens are output positions, ``in`` is a receptive-field patch of one
  group's input channels. Stride, dilation, padding (integer, tuple, ``"same"``, ``"valid"``) and
  groups are read from the intercepted call itself, so a module that pads with ``reflect`` /
  ``replicate`` / ``circular`` before calling the op is handled exactly (the call sees padded input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..core.algebra import ConvStats, OneHotInput
from ..core.conv import ConvSettings, patches as conv_patches, positions, settings_of
from ..errors import InfluenceError


@dataclass(frozen=True)
class CallArgs:
    """The arguments of one tracked call, normalised."""

    input: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    settings: Tuple[Any, ...] = ()  # conv: (stride, padding, dilation, groups)


def _bind(names: Sequence[str], defaults: Dict[str, Any], args: tuple, kwargs: dict) -> Dict[str, Any]:
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _parse_linear(args: tuple, kwargs: dict) -> CallArgs:
    b = _bind(("input", "weight", "bias"), {"bias": None}, args, kwargs)
    return CallArgs(b["input"], b["weight"], b["bias"])


def _parse_conv(args: tuple, kwargs: dict) -> CallArgs:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    b = _bind(names, {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}, args, kwargs)
    return CallArgs(b["input"], b["weight"], b["bias"], (b["stride"], b["padding"], b["dilation"], b["groups"]))


def _conv_settings(call: CallArgs) -> ConvSettings:
    stride, padding, dilation, groups = call.settings
    return settings_of(tuple(call.weight.shape), stride, padding, dilation, groups)


def _parse_embedding(args: tuple, kwargs: dict) -> CallArgs:
    names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
    defaults = {"padding_idx": None, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False, "sparse": False}
    b = _bind(names, defaults, args, kwargs)
    return CallArgs(b["input"], b["weight"], None, (b["padding_idx"], b["max_norm"], b["scale_grad_by_freq"]))


def _check_embedding(call: CallArgs, layer: str) -> None:
    _, max_norm, scale_grad_by_freq = call.settings
    if max_norm is not None:
        raise InfluenceError(
            f"Embedding {layer!r} has max_norm={max_norm}: it renormalises its weight rows in place during the forward "
            "pass, so the gradients would not be those of a lookup. Use max_norm=None or leave it out of "
            "Task.tracked_modules()."
        )
    if scale_grad_by_freq:
        raise InfluenceError(
            f"Embedding {layer!r} has scale_grad_by_freq=True, which rescales gradients by in-batch token counts (the "
            "examples' gradients are then coupled). Use scale_grad_by_freq=False or leave it out of "
            "Task.tracked_modules()."
        )


def _padding_row(padding_idx: Optional[int], vocabulary: int) -> Optional[int]:
    if padding_idx is None:
        return None
    return padding_idx + vocabulary if padding_idx < 0 else padding_idx


def _one_hot_input(ids: torch.Tensor, call: CallArgs, rows: int) -> OneHotInput:
    """``ids`` ``[rows, T]`` and ``id_values`` ``[rows, T]``: token ids and the value of their one-hot entry.

    The value is 0 at ``padding_idx``: PyTorch gives the padding row no gradient, as if that token's
    one-hot input were the zero vector.
    """
    ids = ids.reshape(rows, -1)
    pad = _padding_row(call.settings[0], call.weight.shape[0])
    values = torch.ones(ids.shape, dtype=call.weight.dtype, device=ids.device)
    if pad is not None:
        values = values * (ids != pad).to(values.dtype)
    return OneHotInput(ids, values)


def _embedding_input(call: CallArgs, examples: int):
    return _one_hot_input(call.input, call, call.input.shape[0] if call.input.dim() else 1)


def _flat_embedding_input(call: CallArgs, examples: int):
    return _one_hot_input(call.input, call, examples)


def _parse_addmm(args: tuple, kwargs: dict) -> CallArgs:
    b = _bind(("input", "mat1", "mat2"), {"beta": 1, "alpha": 1}, args, kwargs)
    if b["beta"] != 1 or b["alpha"] != 1:
        raise InfluenceError("torch.addmm on a tracked weight with beta or alpha other than 1 is not supported.")
    return CallArgs(b["mat1"], b["mat2"], b["input"])


def _linear_input(call: CallArgs, examples: int) -> torch.Tensor:
    x = call.input
    return x.reshape(x.shape[0], -1, 1, x.shape[-1])


def _flat_rows_input(call: CallArgs, examples: int) -> torch.Tensor:
    """``addmm(bias, x.view(-1, d), W)`` (Hugging Face Conv1D): rows are (example, token) pairs, example-major."""
    x = call.input
    return x.reshape(examples, -1, 1, x.shape[-1])


def _conv_input(call: CallArgs, examples: int) -> ConvStats:
    """The call's input as it is (the patches are unfolded only where a formula needs them, see
    :class:`~fninfluence.core.algebra.ConvStats`)."""
    return ConvStats(call.input, None, None, _conv_settings(call))


def _conv_patches(call: CallArgs, examples: int) -> torch.Tensor:
    return conv_patches(call.input, _conv_settings(call))


def _linear_output(grad: torch.Tensor, groups: int, examples: int) -> torch.Tensor:
    return grad.reshape(grad.shape[0], -1, 1, grad.shape[-1])


def _flat_rows_output(grad: torch.Tensor, groups: int, examples: int) -> torch.Tensor:
    return grad.reshape(examples, -1, 1, grad.shape[-1])


def _conv_output(grad: torch.Tensor, groups: int, examples: int) -> torch.Tensor:
    batch, channels = grad.shape[:2]
    grad = grad.reshape(batch, groups, channels // groups, -1)
    return grad.permute(0, 3, 1, 2)


@dataclass(frozen=True)
class OpHandler:
    """How to read a tracked call: parse its arguments, lay out its input and its output gradient."""

    name: str
    parse: Callable[[tuple, dict], CallArgs]
    layer_input: Callable[[CallArgs, int], torch.Tensor]  # (call, examples) -> [B, T, G, in]
    output_grad: Callable[[torch.Tensor, int, int], torch.Tensor]  # (grad of output, groups, examples) -> [B, T, G, out]
    groups: Callable[[CallArgs], int]
    weight_shape: Callable[[torch.Tensor, int], Tuple[int, int, int]]  # (weight, groups) -> (G, out, in)
    flat_rows: bool = False  # the call's rows are (example, token) pairs, not examples
    transposed: bool = False  # the weight is stored as [in, out]
    one_hot: bool = False  # the layer input is a OneHotInput (one-hot rows), not a dense [B, T, G, in]
    check: Callable[[CallArgs, str], None] = lambda call, layer: None  # (call, layer) -> raise if unsupported


def _conv_weight_shape(weight: torch.Tensor, groups: int) -> Tuple[int, int, int]:
    return groups, weight.shape[0] // groups, math.prod(weight.shape[1:])


HANDLERS: Dict[Any, OpHandler] = {
    F.linear: OpHandler("linear", _parse_linear, _linear_input, _linear_output, lambda c: 1,
                        lambda w, g: (1, w.shape[0], w.shape[1])),
    F.conv1d: OpHandler("conv1d", _parse_conv, _conv_input, _conv_output, lambda c: int(c.settings[3]),
                        _conv_weight_shape),
    F.conv2d: OpHandler("conv2d", _parse_conv, _conv_input, _conv_output, lambda c: int(c.settings[3]),
                        _conv_weight_shape),
    torch.addmm: OpHandler("addmm", _parse_addmm, _flat_rows_input, _flat_rows_output, lambda c: 1,
                           lambda w, g: (1, w.shape[1], w.shape[0]), flat_rows=True, transposed=True),
    F.embedding: OpHandler("embedding", _parse_embedding, _embedding_input, _linear_output, lambda c: 1,
                           lambda w, g: (1, w.shape[1], w.shape[0]), transposed=True, one_hot=True,
                           check=_check_embedding),
}

HANDLERS_BY_NAME: Dict[str, OpHandler] = {h.name: h for h in HANDLERS.values()}


def with_bias_column(a):
    """Append the constant input that multiplies the bias: ``[a; 1]`` (for a convolution's input, in its settings)."""
    if isinstance(a, ConvStats):
        return ConvStats(a.x, a.g, a.tokens, a.conv._replace(bias=True))
    return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)


def tokens_of(recorded) -> int:
    """Tokens per example of a recorded layer input (a dense ``a``, a convolution's input or one-hot ids)."""
    if isinstance(recorded, ConvStats):
        return positions(recorded.x, recorded.conv)
    return int((recorded.ids if isinstance(recorded, OneHotInput) else recorded).shape[1])


def weight_as_matrix(weight: torch.Tensor, bias: Optional[torch.Tensor], groups: int, op: str = "linear") -> torch.Tensor:
    """A layer's parameters in the tap's layout ``[groups, out, in (+1 for the bias)]``."""
    if HANDLERS_BY_NAME[op].transposed:
        weight = weight.T
    w = weight.reshape(groups, weight.shape[0] // groups, -1)
    if bias is not None:
        w = torch.cat([w, bias.reshape(groups, -1, 1)], dim=-1)
    return w

def layout(handler: OpHandler, per_example: bool):
    """The (input, output gradient) layout functions of a handler.

    In per-example mode (one example per call, under ``vmap``) a linear layer's leading dimensions are
    all tokens of that one example, whatever their order: sequence-first layouts work there.
    """
    if per_example and handler.name == "linear":
        return _flat_rows_input, _flat_rows_output
    if per_example and handler.name == "embedding":
        return _flat_embedding_input, _flat_rows_output
    if per_example and handler.name in ("conv1d", "conv2d"):  # under vmap: the patches (no batched conv kernel)
        return _conv_patches, handler.output_grad
    return handler.layer_input, handler.output_grad
