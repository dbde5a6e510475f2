"""Streaming: a tracked layer's statistic formed while the backward pass is at the layer, without hooks.

The tap routes a streamed layer's output through :class:`_Stream`, an ``autograd.Function`` that is the
identity in the forward pass and, in the backward pass, hands the output gradient on unchanged and returns, as
the "gradient" of zero accumulators it was given, the layer's statistic (:mod:`fninfluence.core.statistics`)::

    forward:   y -> y                      (kept, early) = statistic.forward(masked layer inputs)
    backward:  dL/dy -> dL/dy              dL/d(accumulators) := statistic.backward(kept, masked dL/dy)

Differentiating the loss with respect to the accumulators therefore returns the statistics themselves, layer by
layer as the backward pass reaches them: each output gradient is freed right after its layer is passed, and
only ``kept`` is held from the forward pass. Nothing is registered on the model and the model is unchanged; a
layer called twice gets two such nodes feeding one accumulator, which autograd sums.

The accumulators end with one extra scalar, the number of calls whose output gradient held NaN or Inf, so
that a pass can report non-finite gradients without keeping them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..core.algebra import ConvStats, DenseStats, LayerStats, OneHotInput, OneHotStats
from ..core.statistics import LayerStatistic, Tensors
from ..errors import InfluenceError
from .ops import tokens_of


def all_finite_values(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor: is every element of the floating-point ``tensor`` finite?

    Read off the sum, one reduction without a tensor of flags: a sum is NaN or infinite exactly when some element
    is (NaN and Inf propagate, Inf - Inf is NaN), or when finite elements overflow it: their sum must pass float32's
    3.4e38 (float64's for float64), e.g. 10^4 elements near 1e34, which is then reported as non-finite."""
    wide = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return torch.isfinite(tensor.sum(dtype=wide))


def finite(tree: Any) -> torch.Tensor:
    """A 0-dim bool tensor: is every floating-point tensor in ``tree`` finite? (True when there is none.)"""
    leaves, _ = tree_flatten(tree)
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    checks = [all_finite_values(t) for t in tensors if t.is_floating_point()]
    if checks:
        return torch.stack(checks).all()
    return torch.ones((), dtype=torch.bool, device=tensors[0].device if tensors else None)


# -- masks -----------------------------------------------------------------------------------------

def layer_mask(mask: Any, layer: str) -> Optional[torch.Tensor]:
    """The attention mask of ``layer``: the task's mask, or its entry for the layer when it returned a dict."""
    return mask.get(layer) if isinstance(mask, dict) else mask


def call_mask(layer: str, tokens: int, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The ``[B, T]`` mask of a call with ``tokens`` tokens per example (None: no mask applies).

    A mask applies to every call whose token count it matches; calls without a token dimension (T = 1, e.g. a
    head on a pooled output) are not masked.
    """
    if mask is None or tokens == 1:
        return None
    if mask.dim() != 2 or tokens != mask.shape[1]:
        raise InfluenceError(
            f"Layer {layer!r} has {tokens} tokens per example but the attention mask has shape "
            f"{tuple(mask.shape)}. Return a [batch, tokens] mask that matches, or a dict of masks per layer "
            "name from Task.get_attention_mask()."
        )
    return mask


def masked_inputs(layer: str, recorded, mask: Optional[torch.Tensor]) -> Tuple[LayerStats, Optional[torch.Tensor]]:
    """``(input side, weight)`` of one call: its inputs with the tokens outside the mask zeroed and the count of
    the rest (a dense ``a`` or an embedding's ids and values; ``g = None``), and the ``[B, T, 1, 1]`` weight its
    output gradients are to be multiplied by (None without a mask)."""
    one_hot = isinstance(recorded, (OneHotInput, OneHotStats))
    tokens = tokens_of(recorded)
    convolution = isinstance(recorded, ConvStats)
    if convolution and call_mask(layer, tokens, mask) is not None:  # masked positions: the patches themselves
        recorded, convolution = recorded.a, False
    values = recorded.id_values[:, :, None, None] if one_hot else recorded.x if convolution else recorded
    batch = values.shape[0]
    applied = call_mask(layer, tokens, mask)
    if applied is None:
        weight, count = None, torch.full((), batch * tokens, dtype=values.dtype, device=values.device)
    else:
        weight = applied.to(values.dtype)[:, :, None, None]
        values, count = values * weight, applied.to(values.dtype).sum()
    if one_hot:
        return OneHotStats(recorded.ids, values[:, :, 0, 0], None, count), weight
    if convolution:
        return ConvStats(values, None, count, recorded.conv), weight
    return DenseStats(values, None, count), weight


def masked_grads(g: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    return g if weight is None else g * weight.to(g.dtype)


# -- the autograd function -------------------------------------------------------------------------

class _Stream(torch.autograd.Function):
    """Identity on ``output``; its backward returns ``late(saved tensors, dL/d output)`` for the accumulators."""

    @staticmethod
    def forward(output, late, spec, accumulators, *tensors):
        return output.view_as(output)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.late, ctx.spec, ctx.accumulators, *tensors = inputs
        ctx.save_for_backward(*tensors[ctx.accumulators:])

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        spec, absent = ctx.spec
        tensors = iter(saved)
        values = ctx.late(tree_unflatten([None if none else next(tensors) for none in absent], spec), grad)
        return (grad, None, None, None, *values, *([None] * len(saved)))


@dataclass(frozen=True)
class Stream:
    """How the tap streams one layer: its statistic, the zero accumulators ``late`` is returned for (in the order
    of ``keys``, then the non-finite count) and the layer's attention mask.

    With ``into`` (eager runs only: a side effect), the statistic's parts are added in place into those tensors as
    they are formed instead (the forward part when the layer is called, the backward part when the backward pass
    reaches it), so that no layer's part outlives its own step: the accumulators are then the count alone.
    """

    statistic: LayerStatistic
    keys: Tuple[str, ...]
    accumulators: Tuple[torch.Tensor, ...]
    mask: Optional[torch.Tensor]
    into: Optional[Dict[str, torch.Tensor]] = None


def accumulators_for(statistic: LayerStatistic, examples: int, tokens: int, device: torch.device,
                     into: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[Tuple[str, ...], Tuple[torch.Tensor, ...]]:
    """``(keys, zeros)``: the zero value of the statistic's ``late`` part (nothing when it goes ``into`` tensors),
    then a float32 non-finite count."""
    zeros = {} if into is not None else statistic.zeros(examples, tokens)
    keys = tuple(zeros)
    return keys, tuple(zeros[k] for k in keys) + (torch.zeros((), dtype=torch.float32, device=device),)


def _add_into(layer: str, into: Dict[str, torch.Tensor], part: Tensors, half: str) -> None:
    unknown = sorted(set(part) - set(into))
    if unknown:
        raise InfluenceError(f"The statistic of layer {layer!r} returned {unknown} from its {half} half, which are "
                             f"not among the keys it accumulates into ({sorted(into)}).")
    for key, value in part.items():
        into[key].add_(value)


def stream_call(layer: str, stream: Stream, output: torch.Tensor, recorded, output_grad: Callable[[torch.Tensor], torch.Tensor],
                early: List[Tensors], inputs_finite: List[torch.Tensor]) -> torch.Tensor:
    """``output`` routed through :class:`_Stream` for ``stream``'s statistic; ``early`` and ``inputs_finite`` (the
    tap's record of this layer) get this call's forward part and whether its inputs are finite."""
    with torch.no_grad():
        inputs, weight = masked_inputs(layer, recorded, stream.mask)
        kept, forward_part = stream.statistic.forward(inputs)
        inputs_finite.append(finite(inputs))
        if stream.into is not None:
            _add_into(layer, stream.into, forward_part, "forward")
            forward_part = {}
    early.append(forward_part)
    leaves, spec = tree_flatten((kept, weight))
    if not all(leaf is None or isinstance(leaf, torch.Tensor) for leaf in leaves):
        raise InfluenceError(f"The statistic of layer {layer!r} keeps non-tensor values from its forward half; "
                             "keep tensors only (or None).")
    spec = (spec, tuple(leaf is None for leaf in leaves))
    leaves = [leaf for leaf in leaves if leaf is not None]
    # A view made here, inside the gradient transform: under torch.compile, Dynamo decides whether to trace an
    # autograd.Function's backward from the requires_grad it recorded for the inputs, and a torch.func.grad
    # argument used as it is reads False there (its tracker predates the transform's wrapping): the backward
    # would be dropped and every statistic silently 0. The view reads True.
    accumulators = tuple(zeros.view_as(zeros) for zeros in stream.accumulators)
    late = _late(layer, stream, output_grad)
    return _Stream.apply(output, late, spec, len(accumulators), *accumulators, *leaves)


def _late(layer: str, stream: Stream, output_grad: Callable[[torch.Tensor], torch.Tensor]):
    def late(saved, grad: torch.Tensor) -> List[torch.Tensor]:
        kept, weight = saved
        g = masked_grads(output_grad(grad), weight)
        values = stream.statistic.backward(kept, g)
        nonfinite = (~all_finite_values(grad)).to(torch.float32)
        if stream.into is not None:
            _add_into(layer, stream.into, values, "backward")
            return [nonfinite]
        if set(values) != set(stream.keys):
            raise InfluenceError(f"The statistic of layer {layer!r} returned {sorted(values)} from its backward half, "
                                 f"but its zeros have {sorted(stream.keys)}: they must have the same keys.")
        zeros = stream.accumulators
        return [values[k].to(zeros[i].dtype) for i, k in enumerate(stream.keys)] + [nonfinite]

    return late


def combine(early: List[Tensors], late: Dict[str, torch.Tensor]) -> Tensors:
    """A streamed layer's value: its calls' forward parts summed, with the backward part accumulated by autograd."""
    total = dict(early[0]) if early else {}
    for part in early[1:]:
        for key, value in part.items():
            total[key] = total[key] + value
    return {**total, **late}
