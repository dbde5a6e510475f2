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

import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import torch.nn.functional as F

from . import attention
from ..errors import InfluenceError
from .ops import HANDLERS, OpHandler, layout, tokens_of, with_bias_column
from .stream import Stream, stream_call

# Functions that read a tensor's metadata or attributes. A tracked weight passing through them is harmless,
# unless what comes out is a view of it (``weight.T``, ``.mT``, ``.data``): that alias is followed, see
# :meth:`Tap._note_other_uses`.
_METADATA_FUNCS = frozenset({
    "__get__", "size", "dim", "numel", "stride", "is_contiguous", "is_floating_point", "is_complex",
    "element_size", "nelement", "ndimension", "data_ptr", "get_device", "__len__", "__format__", "__repr__",
    "storage_offset", "untyped_storage", "__hash__", "__eq__", "__bool__", "dtype", "device",
})


# Functions whose output is random only in training: func -> ((training at, name, default), (p at, name, default)).
# A training position of None means always; a p of None means any p (rrelu draws its slopes whatever they are).
_DROPOUT, _VF_DROPOUT = ((2, "training", True), (1, "p", 0.5)), ((2, "train", None), (1, "p", None))
_RANDOM_IN_TRAINING = {
    **{f: _DROPOUT for f in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)},
    **{f: ((2, "training", False), (1, "p", 0.5)) for f in (F.alpha_dropout, F.feature_alpha_dropout)},
    **{f: _VF_DROPOUT for f in (torch.dropout, torch.dropout_, torch.alpha_dropout, torch.alpha_dropout_,
                                torch.feature_dropout, torch.feature_dropout_, torch.feature_alpha_dropout,
                                torch.feature_alpha_dropout_)},
    **{f: ((3, "training", False), None) for f in (F.rrelu, F.rrelu_, torch.rrelu, torch.rrelu_)},
    F.scaled_dot_product_attention: ((None, "", True), (4, "dropout_p", 0.0)),
    F.multi_head_attention_forward: ((13, "training", True), (10, "dropout_p", None)),
}
# Functions that always draw random numbers (by name, so that torch.x, Tensor.x and Tensor.x_ are all caught).
_RANDOM_NAMES = frozenset({
    "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "bernoulli", "bernoulli_",
    "multinomial", "normal", "normal_", "uniform_", "exponential_", "geometric_", "cauchy_", "log_normal_", "random_",
    "poisson", "binomial", "_standard_gamma", "_sample_dirichlet", "native_dropout", "gumbel_softmax",
})
# Random unless their samples are passed in (argument 5, ``_random_samples``).
_RANDOM_UNLESS_SAMPLES = frozenset({"fractional_max_pool2d_with_indices", "_fractional_max_pool2d",
                                    "fractional_max_pool3d_with_indices", "_fractional_max_pool3d"})


def _argument(args: tuple, kwargs: dict, position: Optional[int], name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if position is not None and position < len(args) else default


def random_call(func, args: tuple, kwargs: dict) -> Optional[str]:
    """How ``func(*args, **kwargs)`` is random (e.g. ``"dropout (training=True, p=0.1)"``), or None if it is not."""
    name = getattr(func, "__name__", None)
    if func in _RANDOM_IN_TRAINING:
        training, p = _RANDOM_IN_TRAINING[func]
        if training[0] is not None and not _argument(args, kwargs, *training):
            return None
        if p is None:
            return f"{name} (training=True)"
        rate = _argument(args, kwargs, *p)
        return f"{name} (training=True, {p[1]}={rate})" if rate else None
    if name in _RANDOM_NAMES:
        return name
    if name in _RANDOM_UNLESS_SAMPLES and _argument(args, kwargs, 5, "_random_samples", None) is None:
        return name
    return None


_CALL_IMPL = nn.Module._call_impl.__code__


def _inside_a_module(outer: Optional[nn.Module]) -> bool:
    """Whether the caller runs inside the forward of a module other than ``outer`` (the task's wrapper).

    Tells the user's model apart from the task's own code (true-Fisher label sampling) without a hook.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _CALL_IMPL and frame.f_locals.get("self") is not outer:
            return True
        frame = frame.f_back
    return False


def _name(func) -> str:
    """A function's name as an error message shows it; a property reads as ``.T``."""
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":
        return "." + getattr(getattr(func, "__self__", None), "__name__", "<attribute>")
    return name


def tensors_in(tree) -> List[torch.Tensor]:
    """The tensors among the leaves of a pytree (arguments are often lists, e.g. ``torch.cat([w, x])``)."""
    leaves, _ = tree_flatten(tree)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a wrapper subclass without storage: assume the worst
        return True


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
    # (how a call was random, whether it ran inside the user's model rather than the task's own code)
    random_calls: List[Tuple[str, bool]] = field(default_factory=list)
    versions: List[Tuple[str, torch.Tensor, int]] = field(default_factory=list)
    # streamed layers (see .stream): per call, the statistic's forward part and whether the inputs were finite
    early: Dict[str, List[Dict[str, torch.Tensor]]] = field(default_factory=dict)
    inputs_finite: Dict[str, List[torch.Tensor]] = field(default_factory=dict)


class ObjectiveMode(TorchFunctionMode):
    """What every run of the task's objective needs under ``torch.func``: ``requires_grad_`` is a no-op.

    Under ``torch.func.grad`` every tensor is already differentiated, and ``requires_grad_`` raises there
    (Hugging Face's ``enable_input_require_grads`` calls it on the input embeddings' output, e.g. after
    ``gradient_checkpointing_enable()``); it changes no value, so skipping it is exact.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) == "requires_grad_":
            return args[0]
        return func(*args, **(kwargs or {}))


class Tap(ObjectiveMode):
    """Records tracked layer inputs and adds ``probes[layer][k]`` to the output of the k-th call, or, for the
    layers in ``streams``, routes their outputs through their statistics (:mod:`.stream`) and records nothing
    but the statistics' forward parts.

    With ``probes=None`` and no streams it only records (the discovery pass).
    """

    def __init__(self, tracked: Sequence[TrackedWeight], probes: Optional[Dict[str, List[torch.Tensor]]] = None,
                 discover: bool = False, examples: int = 0, per_example: bool = False,
                 outer: Optional[nn.Module] = None, streams: Optional[Dict[str, Stream]] = None):
        super().__init__()
        self.streams = streams or {}
        self.outer = outer  # discovery: the module that calls the task, to tell the task's code from the model's
        self.examples = examples
        self.per_example = per_example
        self.tracked = tracked if getattr(tracked, "at_call_time", False) else tuple(tracked)  # see .sharded
        self.probes = probes
        self.discover = discover
        self.record = TapRecord()
        # discovery only: views of tracked tensors (weight.T ...) -> the layers they belong to. Holding the
        # tensors keeps their ids from being reused while the pass runs.
        self._aliases: List[Tuple[torch.Tensor, str, str]] = []  # (view, layer, how it was made, e.g. ".T")

    def _layer_of(self, weight) -> Optional[TrackedWeight]:
        for t in self.tracked:
            if weight is t.weight:
                return t
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) == "requires_grad_":
            return args[0]  # see ObjectiveMode
        if self.discover:
            randomness = random_call(func, args, kwargs)
            if randomness is not None:
                self.record.random_calls.append((randomness, _inside_a_module(self.outer)))
        if func is F.multi_head_attention_forward:
            bound = attention.bind(args, kwargs)
            in_proj = self._layer_of(bound["in_proj_weight"])
            weights = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj_weight")
            tracked = next((t for t in map(self._layer_of, (bound[w] for w in weights)) if t is not None), None)
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
        out = func(*args, **kwargs)
        if self.discover:
            self._note_other_uses(func, args, kwargs, out)
        return out

    def _tracked_call(self, func, handler: OpHandler, tracked: TrackedWeight, call, args, kwargs):
        layer = tracked.layer
        handler.check(call, layer)
        out = func(*args, **kwargs)
        has_bias = call.bias is not None and call.bias is tracked.bias
        if self.discover and call.bias is not None and not has_bias:
            # another tensor as the bias leaves this weight's gradient exact; that tensor's own gradient is a use
            # the tap does not follow (unless it is nobody's, e.g. a chunk of attention's shared in_proj_bias)
            owners = [(layer, "")] if tracked.bias is not None else []
            for owner, via in owners + self._owners(call.bias):
                self.record.other_uses.setdefault(owner, []).append(f"{handler.name} with a bias that is not {layer}'s own")
        layer_input, output_grad = layout(handler, self.per_example)
        flat_rows = handler.flat_rows or layer_input is not handler.layer_input
        if flat_rows and call.input.shape[0] % self.examples:
            raise InfluenceError(
                f"Layer {layer!r} ({handler.name}) received {call.input.shape[0]} rows for a batch of {self.examples} "
                "examples; its rows must be (example, token) pairs with the example first."
            )
        with torch.no_grad():  # the inputs are read, never differentiated
            a = layer_input(call, self.examples)  # [B, T, G, in], or {"ids", "id_values"} for one-hot layers
            if has_bias:
                a = with_bias_column(a)
        stream = self.streams.get(layer)
        if stream is not None:
            groups, examples = handler.groups(call), self.examples
            return stream_call(layer, stream, out, a, lambda grad: output_grad(grad, groups, examples),
                               self.record.early.setdefault(layer, []),
                               self.record.inputs_finite.setdefault(layer, []))
        calls_so_far = len(self.record.inputs.setdefault(layer, []))
        self.record.inputs[layer].append(None if self.discover else a)  # discovery keeps shapes, not inputs
        self.record.handlers.setdefault(layer, []).append(handler)
        if self.discover:
            groups = handler.groups(call)
            self.record.calls.setdefault(layer, []).append(CallRecord(
                op=handler.name, groups=groups, weight_shape=handler.weight_shape(call.weight, groups),
                param_shape=tuple(call.weight.shape),
                has_bias=has_bias, input_batch=self.examples if flat_rows else int(call.input.shape[0]), output_shape=tuple(out.shape),
                output_dtype=out.dtype, input_tokens=tokens_of(a),
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

    def _owners(self, tensor: torch.Tensor) -> List[Tuple[str, str]]:
        """The tracked layers ``tensor`` belongs to, as ``(layer, how the alias was made or "")``."""
        owners = [(t.layer, "") for t in self.tracked
                  if tensor is t.weight or (t.bias is not None and tensor is t.bias)]
        return owners + [(layer, via) for alias, layer, via in self._aliases if tensor is alias]

    def _note_other_uses(self, func, args, kwargs, out) -> None:
        """Record every use of a tracked weight or bias that is not one of its layer calls.

        What counts is what comes out: a metadata read is harmless, unless it returns a view of the
        tensor (``weight.T``, ``.mT``, ``.data``), which is then followed as the tensor itself, so that
        ``x @ layer.weight.T`` is a use of ``layer`` like ``torch.mm(x, layer.weight)``. Any other
        function that receives a tracked tensor or one of its aliases is a use the tap cannot follow.
        """
        sources = [(value, self._owners(value)) for value in tensors_in((args, kwargs))]
        sources = [(value, owners) for value, owners in sources if owners]
        if not sources:
            return
        if getattr(func, "__name__", None) in _METADATA_FUNCS:
            for result in tensors_in(out):
                if self._owners(result):
                    continue  # the tensor itself (e.g. requires_grad_ returns self)
                for value, owners in sources:
                    if _shares_storage(result, value):
                        self._aliases += [(result, layer, via + _name(func)) for layer, via in owners]
            return
        name = _name(func)
        for layer, via in (owner for _, owners in sources for owner in owners):
            self.record.other_uses.setdefault(layer, []).append(f"{name} of its {via}" if via else name)

