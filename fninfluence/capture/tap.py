"""The tap: a ``TorchFunctionMode`` that sees every tracked layer call while the model runs.

While active it intercepts ``F.linear`` / ``F.conv1d`` / ``F.conv2d`` / ``torch.addmm`` / ``F.embedding``
calls whose weight is a tracked parameter. For each such call it records the layer input (as per-token patches, see :mod:`.ops`) and
returns ``output + probe``, where ``probe`` is a zero tensor passed in from outside. The gradient of
the summed loss with respect to that probe is the gradient with respect to the layer's output, so one
``torch.func.grad`` over the probes yields every layer's output gradient, and nothing is registered
on or changed in the model.

Weights are matched by identity (``is``) against the tensors handed to ``functional_call``; the
match list must be built inside the transformed function, from those very tensors, because
``torch.func`` wraps its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.overrides import TorchFunctionMode

import torch.nn.functional as F

from . import attention
from ..errors import InfluenceError
from .ops import HANDLERS, OpHandler, layout, with_bias_column

# Functions that only read a tensor's metadata; a tracked weight passing through them is harmless.
_METADATA_FUNCS = frozenset({
    "__get__", "size", "dim", "numel", "stride", "is_contiguous", "is_floating_point", "is_complex",
    "element_size", "nelement", "ndimension", "data_ptr", "get_device", "__len__", "__format__", "__repr__",
    "requires_grad_", "storage_offset", "untyped_storage", "__hash__", "__eq__", "__bool__", "dtype", "device",
})


@dataclass(frozen=True)
class TrackedWeight:
    layer: str
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    one_hot: bool = False  # an embedding: only F.embedding calls are its own; a tied F.linear is another use


@dataclass
class CallRecord:
    """What discovery learns about one tracked call."""

    op: str
    groups: int
    weight_shape: Tuple[int, int, int]  # (groups, out, in) in the tap's layout
    param_shape: Tuple[int, ...]  # the weight's own shape
    has_bias: bool
    input_batch: int
    output_shape: Tuple[int, ...]
    output_dtype: torch.dtype
    input_tokens: int


@dataclass
class TapRecord:
    """What one run of the model under the tap produced."""

    inputs: Dict[str, List] = field(default_factory=dict)  # per layer, per call: [B, T, G, in] or {"ids", "id_values"}
    handlers: Dict[str, List[OpHandler]] = field(default_factory=dict)
    calls: Dict[str, List[CallRecord]] = field(default_factory=dict)
    other_uses: Dict[str, List[str]] = field(default_factory=dict)  # layer -> functions it cannot handle
    versions: List[Tuple[str, torch.Tensor, int]] = field(default_factory=list)


class Tap(TorchFunctionMode):
    """Records tracked layer inputs and adds ``probes[layer][k]`` to the output of the k-th call.

    With ``probes=None`` it only records (the discovery pass).
    """

    def __init__(self, tracked: Sequence[TrackedWeight], probes: Optional[Dict[str, List[torch.Tensor]]] = None,
                 discover: bool = False, examples: int = 0, per_example: bool = False):
        super().__init__()
        self.examples = examples
        self.per_example = per_example
        self.tracked = tuple(tracked)
        self.probes = probes
        self.discover = discover
        self.record = TapRecord()

    def _layer_of(self, weight) -> Optional[TrackedWeight]:
        for t in self.tracked:
            if weight is t.weight:
                return t
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            bound = attention.bind(args, kwargs)
            in_proj = self._layer_of(bound["in_proj_weight"])
            tracked = in_proj or self._layer_of(bound["out_proj_weight"])
            if tracked is not None:
                with self:  # re-enter the mode so that the projections inside are tapped
                    return attention.attention_forward(tracked.layer, bound, in_proj is not None)
        handler = HANDLERS.get(func)
        if handler is not None:
            call = handler.parse(args, kwargs)
            tracked = self._layer_of(call.weight)
            # an embedding's weight in F.linear (or a linear weight in F.embedding) is a tied weight: another use
            if tracked is not None and handler.one_hot == tracked.one_hot:
                return self._tracked_call(func, handler, tracked, call, args, kwargs)
        if self.discover:
            self._note_other_uses(func, args, kwargs)
        return func(*args, **kwargs)

    def _tracked_call(self, func, handler: OpHandler, tracked: TrackedWeight, call, args, kwargs):
        layer = tracked.layer
        handler.check(call, layer)
        out = func(*args, **kwargs)
        has_bias = call.bias is not None and call.bias is tracked.bias
        if self.discover and call.bias is not None and not has_bias:
            self.record.other_uses.setdefault(layer, []).append(f"{handler.name} with a bias that is not {layer}'s own")
        layer_input, _ = layout(handler, self.per_example)
        flat_rows = handler.flat_rows or layer_input is not handler.layer_input
        if flat_rows and call.input.shape[0] % self.examples:
            raise InfluenceError(
                f"Layer {layer!r} ({handler.name}) received {call.input.shape[0]} rows for a batch of {self.examples} "
                "examples; its rows must be (example, token) pairs with the example first."
            )
        a = layer_input(call, self.examples)  # [B, T, G, in], or {"ids", "id_values"} for one-hot layers
        if has_bias:
            a = with_bias_column(a)
        calls_so_far = len(self.record.inputs.setdefault(layer, []))
        self.record.inputs[layer].append(a)
        self.record.handlers.setdefault(layer, []).append(handler)
        if self.discover:
            groups = handler.groups(call)
            self.record.calls.setdefault(layer, []).append(CallRecord(
                op=handler.name, groups=groups, weight_shape=handler.weight_shape(call.weight, groups),
                param_shape=tuple(call.weight.shape),
                has_bias=has_bias, input_batch=self.examples if flat_rows else int(call.input.shape[0]), output_shape=tuple(out.shape),
                output_dtype=out.dtype, input_tokens=int((a["ids"] if handler.one_hot else a).shape[1]),
            ))
            self.record.versions.append((layer, call.input, call.input._version))
        if self.probes is not None:
            layer_probes = self.probes[layer]
            if calls_so_far >= len(layer_probes):
                raise InfluenceError(
                    f"Layer {layer!r} was called more often ({calls_so_far + 1}) than in the discovery pass "
                    f"({len(layer_probes)}) on a batch of the same shapes: the number of calls depends on the data. "
                    "Make the forward pass call each tracked layer a fixed number of times, or stop tracking it."
                )
            out = out + layer_probes[calls_so_far]
        return out

    def _note_other_uses(self, func, args, kwargs) -> None:
        name = getattr(func, "__name__", repr(func))
        if name in _METADATA_FUNCS:
            return
        for value in list(args) + list(kwargs.values()):
            for t in self.tracked:
                if value is t.weight or (t.bias is not None and value is t.bias):
                    self.record.other_uses.setdefault(t.layer, []).append(name)
