"""Running a model under the tap: discovery, probes, and per-batch layer statistics.

:class:`ModelTap` is the imperative shell around the pure per-batch function
:meth:`ModelTap.layer_stats`, which maps ``(params, buffers, batch, probes)`` to the loss and, per
tracked layer, a :class:`~fninfluence.core.algebra.DenseStats` ``(a [B, T, G, in], g [B, T, G, out], tokens)``
(for an embedding a :class:`~fninfluence.core.algebra.OneHotStats` ``(ids [B, T], id_values [B, T],
g [B, T, 1, D], tokens)``: see :mod:`.ops`). That function is what the pipeline composes with curvature
updates and score contractions, and what ``torch.compile`` sees.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
import torch.nn.functional as F
import torch.utils.checkpoint as _checkpoint
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..core.algebra import DenseStats, LayerStats, from_single_examples, join_calls
from ..core.statistics import LayerStatistic, Tensors, evaluate, of_stats
from ..errors import InfluenceError
from ..task import Task, tracked_module_names
from .layers import LayerSpec, Target, resolve_parameter_layers, resolve_targets, specs_from_calls
from .ops import HANDLERS as _HANDLERS
from .ops import HANDLERS_BY_NAME as _HANDLERS_BY_NAME
from .ops import layout, weight_as_matrix
from .sharded import CallTimeWeights, check_shardable, is_fully_sharded
from .stream import Stream, accumulators_for, combine, finite, layer_mask, masked_grads, masked_inputs
from .summed import check_summed, tolerance
from .vmapped import run_vmapped
from .tap import ObjectiveMode, Tap, TapRecord, TrackedWeight


OBJECTIVES = ("train", "train_sampled", "measurement")


class _Objective(nn.Module):
    """Calls ``fn(batch, model)``; lets ``functional_call`` swap the user's parameters for one task call.

    The user's model is held as a child so that ``functional_call`` sees its parameters under
    ``"model."``; the user's model itself is not modified.
    """

    def __init__(self, model: nn.Module, fn: Callable[[Any, nn.Module], torch.Tensor]):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch):
        return self.fn(batch, self.model)


@contextlib.contextmanager
def unfused():
    """Turn off PyTorch's fused fast paths of nn.MultiheadAttention / nn.TransformerEncoderLayer.

    Those run a whole attention block as one opaque kernel in eval mode when no tensor requires grad,
    which hides the layers inside from the tap. Eager calls under the tap already avoid them (a torch
    function mode is active), but ``torch.compile`` does not see the mode when it evaluates the check.
    """
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


class _DirectCheckpoints:
    """While active in a thread, ``torch.utils.checkpoint`` calls made there run their function directly.

    Checkpointing only trades memory for time: its forward is the function's own, and it recomputes that
    forward during autograd's backward, which ``torch.func.grad`` cannot run (an ``autograd.Function`` without
    ``setup_context``, or saved-tensor hooks). Running the function directly gives the very same values and
    gradients. Every form of checkpoint (``checkpoint(fn, ...)``, the decorator, ``checkpoint_sequential``,
    Hugging Face's ``_gradient_checkpointing_func``) goes through ``torch.utils.checkpoint._checkpoint_impl``,
    looked up when called, so that is what is replaced, while any thread is inside; other threads keep the
    original behaviour.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._original = None
        self._local = threading.local()

    def _impl(self, function, args, kwargs, **settings):
        if getattr(self._local, "depth", 0):
            self._local.calls = self.calls() + 1
            return function(*args, **kwargs)
        return self._original(function, args, kwargs, **settings)

    def calls(self) -> int:
        """How many checkpointed functions this thread has run directly so far."""
        return getattr(self._local, "calls", 0)

    @contextlib.contextmanager
    def __call__(self):
        if not hasattr(_checkpoint, "_checkpoint_impl"):  # another torch: checkpointing stays refused
            yield
            return
        with self._lock:
            if self._users == 0:
                self._original = _checkpoint._checkpoint_impl
                _checkpoint._checkpoint_impl = self._impl
            self._users += 1
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    _checkpoint._checkpoint_impl = self._original
                    self._original = None


direct_checkpoints = _DirectCheckpoints()


def batch_examples(batch: Any) -> int:
    """The number of examples in a batch: the leading dimension of its first tensor."""
    leaves, _ = tree_flatten(batch)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    raise InfluenceError("A batch holds no tensor with a batch dimension; batches must contain tensors.")


def batch_signature(batch: Any) -> Tuple:
    leaves, spec = tree_flatten(batch)
    return (str(spec),) + tuple(
        (tuple(leaf.shape), leaf.dtype) if isinstance(leaf, torch.Tensor) else type(leaf).__name__ for leaf in leaves
    )


def check_model(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise InfluenceError(
                f"{name or type(module).__name__} is a BatchNorm layer in training mode: its batch statistics "
                "couple the examples of a batch, so per-example gradients would be wrong (and its running "
                "statistics would change). Call model.eval() before computing influence."
            )


def _objective_fns(task: Task) -> Dict[str, Callable[[Any, nn.Module], torch.Tensor]]:
    return {
        "train": lambda batch, model: task.compute_train_loss(batch, model, sample=False),
        "train_sampled": lambda batch, model: task.compute_train_loss(batch, model, sample=True),
        "measurement": lambda batch, model: task.compute_measurement(batch, model),
    }


def differentiate(fn: Callable[[Any], Tuple[torch.Tensor, Any]], wrt: Any, functional: bool = False) -> Tuple[Any, Any]:
    """``(d loss / d wrt, aux)`` for ``fn(wrt) -> (loss, aux)``: zeros where the loss does not depend on a tensor.

    Under ``torch.compile`` (or with ``functional``, e.g. inside ``vmap``) through ``torch.func.grad``. Eagerly
    through the autograd engine itself: ``torch.func.grad`` differentiates with ``create_graph=True`` so that it
    can nest, which records the backward pass and so keeps every layer's output gradient alive until it returns;
    a compiled graph frees each one after its last use either way.
    """
    if functional or torch.compiler.is_compiling():
        return torch.func.grad(fn, has_aux=True)(wrt)
    leaves, spec = tree_flatten(wrt)
    with torch.enable_grad():
        leaves = [_leaf(leaf) for leaf in leaves]
        loss, aux = fn(tree_unflatten(leaves, spec))
        needed = loss.requires_grad and leaves
        grads = torch.autograd.grad(loss, leaves, allow_unused=True) if needed else [None] * len(leaves)
    grads = [torch.zeros_like(leaf) if grad is None else grad for leaf, grad in zip(leaves, grads)]
    aux = tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, aux)
    return tree_unflatten(grads, spec), aux


def _leaf(tensor: torch.Tensor) -> torch.Tensor:
    """A detached copy-free leaf of ``tensor`` that requires grad (set as an attribute: a mode that skips
    ``requires_grad_``, like :class:`ObjectiveMode`, may be active)."""
    leaf = tensor.detach()
    leaf.requires_grad = True
    return leaf


class ModelTap:
    """The user's model and task, ready to be run under the tap.

    Holds detached views of the model's parameters (nothing is registered on the model, its
    ``requires_grad`` flags and training mode are left alone), the tracked layers, and zero probes for
    every batch shape seen so far. Discovery runs once per (objective, batch shapes).
    """

    def __init__(self, model: nn.Module, task: Task, layers: Optional[Sequence[str]] = None,
                 amp_dtype: Optional[torch.dtype] = None, per_example: bool = False):
        check_model(model)
        check_shardable(model)
        self.sharded = is_fully_sharded(model)  # FSDP2: run as it is, weights matched at call time (.sharded)
        self.model = model
        self.per_example = per_example
        self.task = task
        self.amp_dtype = amp_dtype
        names = tracked_module_names(task)
        self.parameter_layers: Dict[str, List[str]] = resolve_parameter_layers(model, names)
        self.targets: List[Target] = resolve_targets(model, names, allow_empty=bool(self.parameter_layers))
        if layers is not None:
            wanted = set(layers)
            self.targets = [t for t in self.targets if t.layer in wanted]
            self.parameter_layers = {k: v for k, v in self.parameter_layers.items() if k in wanted}
        self.params: Dict[str, torch.Tensor] = {n: p.detach() for n, p in model.named_parameters()}
        self.buffers: Dict[str, torch.Tensor] = {n: b.detach() for n, b in model.named_buffers()}
        self.specs: Optional[Dict[str, LayerSpec]] = None
        self._callers = {k: _Objective(model, fn) for k, fn in _objective_fns(task).items()}
        self._probes: Dict[Tuple, Dict[str, List[torch.Tensor]]] = {}
        self.checkpointed = False  # whether the objective uses activation checkpointing (seen by discovery)
        self._exact: set = set()  # objectives whose tapped gradients were checked against autograd's
        self._whole: Optional["ModelTap"] = None  # the tap this one is restricted from (see restricted)
        first = self.params[self.targets[0].weight if self.targets else next(iter(self.parameter_layers.values()))[0]]
        self.device, self.dtype = first.device, first.dtype
        if self.sharded and (self.parameter_layers or per_example):
            raise InfluenceError(
                "With a model sharded by fully_shard, every tracked layer must be a layer the tap sees (Linear, "
                "Conv, Embedding ...): parameter layers "
                f"{sorted(self.parameter_layers)} and per_example_vmap=True need whole parameters in each process. "
                "Leave them out of Task.tracked_modules() (or drop per_example_vmap)." if self.parameter_layers
                else "per_example_vmap=True is not available for a model sharded by fully_shard: drop it.")

    # -- the pure part -------------------------------------------------------------------------

    def _tracked(self, params: Dict[str, torch.Tensor]):
        if self.sharded:
            return CallTimeWeights(self.model, self.targets)
        return [TrackedWeight(t.layer, params[t.weight], params[t.bias] if t.bias else None, t.one_hot)
                for t in self.targets]

    def _call(self, objective: str, params, buffers, batch) -> torch.Tensor:
        tensors = {"model." + k: v for k, v in params.items()}
        tensors.update({"model." + k: v for k, v in buffers.items()})
        # torch.compile traces a checkpoint as one opaque op (see compile_option), so there is nothing to replace
        checkpoints = contextlib.nullcontext() if torch.compiler.is_compiling() else direct_checkpoints()
        with self._autocast(), checkpoints:
            if self.sharded:  # FSDP puts each unit's gathered parameters on the model itself (.sharded)
                return self._callers[objective](batch)
            return torch.func.functional_call(self._callers[objective], tensors, (batch,))

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def layer_stats(self, objective: str, params, buffers, batch, probes) -> Tuple[torch.Tensor, Dict[str, LayerStats]]:
        """The loss of ``objective`` on ``batch`` and every tracked layer's inputs and output gradients.

        A pure function of its arguments (given the model's code), so it can be compiled. ``g[b]`` is
        example ``b``'s output gradient because the loss is a sum over examples that do not interact.
        In per-example mode the same computation runs under ``torch.func.vmap`` on batches of one.
        """
        if not self.per_example:
            return self._batch_stats(objective, params, buffers, batch, probes)

        def one(example):
            single = tree_map(lambda x: x.unsqueeze(0) if isinstance(x, torch.Tensor) else x, example)
            return self._batch_stats(objective, params, buffers, single, probes)

        in_dims = tree_map(lambda x: 0 if isinstance(x, torch.Tensor) else None, batch)
        losses, stats = run_vmapped(torch.func.vmap(one, in_dims=(in_dims,), randomness="different"), (batch,),
                                    self.model, *self._vmap_reasons())
        stats = {layer: from_single_examples(s) for layer, s in stats.items()}
        return losses.sum(), stats

    def _vmap_reasons(self) -> Tuple[str, str]:
        """``(why, instead)`` for :func:`.vmapped.explained`: what runs the model under vmap, and how to do without."""
        layers = sorted(self.parameter_layers)
        if self.per_example and layers:
            why = f"With per_example_vmap=True, and for the per-example gradients of the parameter layers {layers},"
        elif self.per_example:
            why = "With per_example_vmap=True (each example alone),"
        else:
            why = f"For the per-example gradients of the parameter layers {layers},"
        ways = (["drop per_example_vmap=True (only needed where a tracked layer does not see the batch in dimension "
                 "0)"] if self.per_example else []) + \
               ([f"leave {layers} out of Task.tracked_modules() (Linear, Conv and Embedding layers need no vmap)"]
                if layers else []) + ["change that code so that it does not read tensor values in Python"]
        instead = ", ".join(ways[:-1]) + (", or " if len(ways) > 1 else "") + ways[-1]
        return f"{why} the model runs under torch.func.vmap", f"{instead[0].upper()}{instead[1:]}."

    def _batch_stats(self, objective: str, params, buffers, batch, probes):
        return self._run(objective, params, buffers, batch, probes, {})[:2]

    def layer_values(self, objective: str, params, buffers, batch, probes, statistics: Dict[str, LayerStatistic],
                     stream: bool = True, into: Optional[Dict[str, Tensors]] = None
                     ) -> Tuple[torch.Tensor, Dict[str, Tensors], Dict[str, torch.Tensor]]:
        """The loss of ``objective`` on ``batch`` and, per tracked layer, the value of ``statistics[layer]``
        (:mod:`fninfluence.core.statistics`) and whether the layer's inputs and output gradients were finite:
        ``(loss, {layer: value}, {layer: 0-dim bool})``.

        A layer's statistic is streamed (formed while the backward pass is at the layer, so that its output
        gradients are never all held at once; :mod:`.stream`) unless the tap runs per example (under ``vmap``),
        the layer is a parameter layer, or it is called more than once and its statistic is not additive: those
        are evaluated on the layer's batch statistics after the backward pass. ``stream=False`` evaluates every
        layer that way. Pure, like :meth:`layer_stats`, and compiled the same way.

        ``into`` (``{layer: {key: tensor}}``, eager only): a streamed layer's statistic is added in place into those
        tensors as it is formed, and its value comes back empty (``{}``): no layer's value then waits for the
        others' (see :class:`.stream.Stream`). The other layers' values come back as usual.
        """
        if set(statistics) != set(self.specs):
            raise ValueError(f"statistics for {sorted(statistics)}, but the tap tracks {sorted(self.specs)}")
        if self.per_example or not stream:
            loss, stats = self.layer_stats(objective, params, buffers, batch, probes)
            return (loss, {layer: evaluate(statistics[layer], s) for layer, s in stats.items()},
                    {layer: finite(s) for layer, s in stats.items()})
        streamed = {layer: statistic for layer, statistic in statistics.items()  # probes: this objective's calls
                    if self.specs[layer].op != "parameters" and (len(probes[layer]) == 1 or statistic.additive)}
        into = {} if into is None or torch.compiler.is_compiling() else into
        loss, stats, late, record = self._run(objective, params, buffers, batch, probes, streamed, into)
        values = {layer: evaluate(statistics[layer], s) for layer, s in stats.items()}
        flags = {layer: finite(s) for layer, s in stats.items()}
        for layer, (keys, parts) in late.items():
            calls = len(record.early.get(layer, ()))
            if calls != len(probes[layer]):
                raise InfluenceError(
                    f"Layer {layer!r} was called {calls} times, but {len(probes[layer])} times in the discovery "
                    "pass on a batch of the same shapes: the number of calls depends on the data.")
            *parts, nonfinite = parts
            values[layer] = combine(record.early[layer], dict(zip(keys, parts)))
            flags[layer] = torch.stack(record.inputs_finite[layer]).all() & (nonfinite == 0)
        return loss, values, flags

    def _run(self, objective: str, params, buffers, batch, probes, streamed: Dict[str, LayerStatistic],
             into: Optional[Dict[str, Tensors]] = None):
        """``(loss, stats of the other layers, {streamed layer: (keys, its accumulators' gradients)}, record)``."""
        examples = batch_examples(batch)
        mask = self.task.get_attention_mask(batch)
        into = into or {}
        collected = {layer: calls for layer, calls in probes.items() if layer not in streamed}
        zeros = {layer: accumulators_for(statistic, examples, self.call_tokens(layer, probes, examples),
                                         self.device, into.get(layer))
                 for layer, statistic in streamed.items()}

        def loss_of(wrt):
            collected_probes, accumulators = wrt
            streams = {layer: Stream(streamed[layer], zeros[layer][0], accumulators[layer], layer_mask(mask, layer),
                                     into.get(layer)) for layer in streamed}
            tap = Tap(self._tracked(params), collected_probes, examples=examples, per_example=self.per_example,
                      streams=streams)
            with tap:
                loss = self._call(objective, params, buffers, batch)
            return loss, (loss.detach(), tap.record.inputs, tap.record.early, tap.record.inputs_finite)

        wrt = (collected, {layer: accumulators for layer, (_, accumulators) in zeros.items()})
        (probe_grads, late), (loss, inputs, early, inputs_finite) = differentiate(loss_of, wrt,
                                                                                 functional=self.per_example)
        record = TapRecord(inputs=inputs, early=early, inputs_finite=inputs_finite)
        stats = self._parameter_stats(objective, params, buffers, batch) if self.parameter_layers else {}
        for layer in collected:
            stats[layer] = self._collected(layer, record.inputs.get(layer, []), probe_grads[layer], mask, examples)
        return loss, stats, {layer: (zeros[layer][0], late[layer]) for layer in streamed}, record

    def _collected(self, layer: str, a_calls, grads, mask, examples: int) -> LayerStats:
        """A layer's batch statistics from its calls' recorded inputs and probe gradients, masked, calls
        concatenated along tokens."""
        spec = self.specs[layer]
        if len(a_calls) != len(grads):
            raise InfluenceError(
                f"Layer {layer!r} was called {len(a_calls)} times, but {len(grads)} times in the "
                "discovery pass on a batch of the same shapes: the number of calls depends on the data."
            )
        _, output_grad = layout(_HANDLERS_BY_NAME[spec.op], self.per_example)
        sides, g_calls = [], []
        for a, grad in zip(a_calls, grads):
            side, weight = masked_inputs(layer, a, layer_mask(mask, layer))
            sides.append(side)
            g_calls.append(masked_grads(output_grad(grad, spec.groups, examples), weight))
        return join_calls(sides, g_calls)

    def call_tokens(self, layer: str, probes: Dict[str, List[torch.Tensor]], examples: int) -> int:
        """Tokens per example of one call of ``layer`` on a batch of ``examples`` whose ``probes`` these are (1 for
        a parameter layer)."""
        spec = self.specs[layer]
        if spec.op == "parameters":
            return 1
        examples = 1 if self.per_example else examples  # per example, the probes are those of a batch of one
        return layout(_HANDLERS_BY_NAME[spec.op], self.per_example)[1](probes[layer][0], spec.groups, examples).shape[1]

    def _parameter_stats(self, objective: str, params, buffers, batch) -> Dict[str, DenseStats]:
        """Per-example gradients of the parameter layers, by ``vmap(grad(...))`` over batches of one.

        Each becomes a rank-one "layer" with ``a = vec(grad)`` (``in`` = its parameter count) and ``g = 1``,
        so that ``G_n = g a^T`` is exactly the example's gradient and every estimator and score applies.
        """
        names = [n for group in self.parameter_layers.values() for n in group]

        def example_loss(subset, example):
            single = tree_map(lambda x: x.unsqueeze(0) if isinstance(x, torch.Tensor) else x, example)
            with contextlib.nullcontext() if torch.compiler.is_compiling() else ObjectiveMode():
                return self._call(objective, {**params, **subset}, buffers, single)

        in_dims = tree_map(lambda x: 0 if isinstance(x, torch.Tensor) else None, batch)
        grads = run_vmapped(torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, in_dims),
                                            randomness="different"),
                            ({n: params[n] for n in names}, batch), self.model, *self._vmap_reasons())
        stats = {}
        for layer, group in self.parameter_layers.items():
            flat = torch.cat([grads[n].flatten(1) for n in group], dim=1)  # [B, P]
            stats[layer] = DenseStats(flat[:, None, None, :], flat.new_ones(flat.shape[0], 1, 1, 1),
                                      torch.full((), flat.shape[0], dtype=flat.dtype, device=flat.device))
        return stats

    # -- the imperative shell ------------------------------------------------------------------

    def restricted(self, layers: Sequence[str]) -> "ModelTap":
        """This tap tracking only ``layers`` (a module partition), sharing its discovery: the layers' specs,
        the probes of every batch shape and the exactness checks are this tap's, not found again."""
        wanted = set(layers)
        view = copy.copy(self)
        view.targets = [t for t in self.targets if t.layer in wanted]
        view.parameter_layers = {k: v for k, v in self.parameter_layers.items() if k in wanted}
        view.specs = {k: v for k, v in self.specs.items() if k in wanted}
        view._whole = self._whole or self
        return view

    def discover(self, objective: str, batch: Any) -> Dict[str, LayerSpec]:
        """The tracked layers' specs, found by running ``objective`` on ``batch`` under the tap (eagerly, without
        gradients) unless batches of its shapes were seen before; also checks the tap is exact for ``objective``."""
        self.probes_for(objective, batch)
        return self.specs

    def probes_for(self, objective: str, batch: Any) -> Dict[str, List[torch.Tensor]]:
        """Zero probes shaped like every tracked call's output on batches shaped like ``batch``.

        Probes depend on the batch's shapes only: a batch of shapes not seen before costs one discovery pass
        (an eager forward without gradients) that also checks the layers did not change. In per-example mode
        the probes are those of a batch of one (the first example).
        """
        if self._whole is not None:
            probes = self._whole.probes_for(objective, batch)
            return {layer: calls for layer, calls in probes.items() if layer in self.specs}
        probed = self._as_probed(batch)
        key = (objective, batch_signature(probed))
        probes = self._probes.get(key)
        if probes is None:
            probes = self._discover(objective, probed, batch)
            self._probes[key] = probes
        return probes

    def knows(self, objective: str, batch: Any) -> bool:
        """Whether batches shaped like ``batch`` were discovered for ``objective`` (their probes are ready)."""
        if self._whole is not None:
            return self._whole.knows(objective, batch)
        return (objective, batch_signature(self._as_probed(batch))) in self._probes

    def rediscover(self, objective: str, batch: Any) -> None:
        """Run the discovery pass on ``batch`` even if its shapes are known (ranks of a sharded model run one
        together whenever one of them needs one, see :func:`fninfluence.run.loop.run_pass`)."""
        if self._whole is not None:
            return self._whole.rediscover(objective, batch)
        probed = self._as_probed(batch)
        probes = self._discover(objective, probed, batch)
        self._probes.setdefault((objective, batch_signature(probed)), probes)

    def _as_probed(self, batch: Any) -> Any:
        """The batch probes are made for: per example, the first example alone."""
        if self.per_example:
            return tree_map(lambda x: x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 else x, batch)
        return batch

    def tokens_per_call(self, objective: str, batch: Any) -> Dict[str, int]:
        """Tokens per call of every tracked layer on batches shaped like ``batch`` (1 without a token dimension)."""
        probes = self.probes_for(objective, batch)
        examples = 1 if self.per_example else batch_examples(batch)
        return {layer: layout(_HANDLERS_BY_NAME[self.specs[layer].op], self.per_example)[1](
                    calls[0], self.specs[layer].groups, examples).shape[1]
                for layer, calls in probes.items()}

    def _weight_names(self, layers) -> str:
        by_layer = {t.layer: t.weight for t in self.targets}
        return ", ".join(repr(by_layer[layer]) for layer in layers if layer in by_layer)

    def _parameter_specs(self) -> Dict[str, LayerSpec]:
        return {
            layer: LayerSpec(name=layer, op="parameters", groups=1, out_features=1,
                             in_features=sum(self.params[n].numel() for n in group), has_bias=False, weight=group[0],
                             bias=None, weight_shape=(sum(self.params[n].numel() for n in group),), calls=1,
                             parameters=tuple(group))
            for layer, group in self.parameter_layers.items()
        }

    def compile_option(self, compile):
        """``compile``, or False when the objective uses activation checkpointing.

        ``torch.compile`` traces ``torch.utils.checkpoint.checkpoint`` as one opaque higher-order op before
        :data:`direct_checkpoints` can run its function, so the tap would not see the layers inside;
        eager runs give the same numbers.
        """
        if compile and self.sharded:
            warnings.warn("compile is ignored for a model sharded by fully_shard: running eagerly (the results are "
                          "the same).", stacklevel=3)
            return False
        if compile and (self._whole or self).checkpointed:
            warnings.warn("compile is ignored: the model uses activation checkpointing, which torch.compile hides "
                          "from the tap; running eagerly (the results are the same).", stacklevel=3)
            return False
        return compile

    def _discover(self, objective: str, batch: Any, whole: Any = None) -> Dict[str, List[torch.Tensor]]:
        """Discovery on ``batch`` (per example: the first example of ``whole``, the batch as it came), and, once per
        model, task and objective, the checks that depend on the code and not on a batch's shapes: the tap is exact,
        and the objective is a sum over examples (:mod:`.summed`)."""
        checkpoints_before = direct_checkpoints.calls()
        try:
            probes, loss = self._discover_once(objective, batch)  # its record (every layer's input) is freed here
            if objective not in self._exact:  # a use that escapes the tap is in the code, not in a batch's shapes
                if not _EXACT.seen(self, objective):
                    self._check_exact(objective, batch, probes)
                    self._check_summed(objective, batch if whole is None else whole,
                                       loss if whole is None or whole is batch else None)
                    _EXACT.remember(self, objective)
                self._exact.add(objective)
            return probes
        finally:
            self.checkpointed |= direct_checkpoints.calls() > checkpoints_before

    def _check_summed(self, objective: str, batch: Any, loss: Optional[torch.Tensor]) -> None:
        """Refuse an objective that is a mean over the batch (warn if it is no sum at all): :mod:`.summed`. One forward
        pass over the batch's two halves (two over the whole batch when ``loss``, its value, is not known yet), no
        gradients, the random state left as it was. Not for a sharded model, whose forward passes are collectives."""
        if self.sharded:
            return
        accelerator = self.device.type != "cpu"

        def value(part):
            with torch.random.fork_rng(devices=[self.device] if accelerator else [], device_type=self.device.type), \
                    unfused(), ObjectiveMode():
                return self._call(objective, self.params, self.buffers, part)

        dtypes = (self.dtype, self.amp_dtype, None if loss is None else loss.dtype)
        check_summed(value, batch, batch_examples(batch), _OBJECTIVE_NAMES[objective], _SUM_FIX[objective], loss,
                     self.task.get_attention_mask(batch), tolerance(*dtypes, accelerator=accelerator),
                     warn=objective != "train_sampled")

    def _discover_once(self, objective: str, batch: Any) -> Tuple[Dict[str, List[torch.Tensor]], torch.Tensor]:
        examples = batch_examples(batch)
        tap = Tap(self._tracked(self.params), None, discover=True, examples=examples, per_example=self.per_example,
                  outer=self._callers[objective])
        with torch.no_grad(), unfused(), tap:
            loss = self._call(objective, self.params, self.buffers, batch)
        _check_loss(loss, objective)
        record = tap.record
        _check_random(record.random_calls, objective)
        self._check_record(record, objective, examples)
        specs = specs_from_calls(self.targets, record.calls)
        specs.update(self._parameter_specs())
        if self.specs is None:
            self.specs = specs
        else:
            for layer, spec in specs.items():
                known = self.specs[layer]
                if spec.shape != known.shape or spec.op != known.op:
                    raise InfluenceError(
                        f"Layer {layer!r} looks different on this batch ({spec.op} {spec.shape}) than before "
                        f"({known.op} {known.shape}); tracked layers must not change with the data or the objective."
                    )
        # one zero, expanded: a probe costs no memory (a collected layer's gradient is materialised by autograd)
        probes = {
            layer: [torch.zeros((), dtype=c.output_dtype, device=self.device).expand(c.output_shape) for c in calls]
            for layer, calls in record.calls.items()
        }
        return probes, loss

    def _check_record(self, record, objective: str, examples: int) -> None:
        """Refuse a discovery record the tap cannot compute exactly from: a tracked layer not called with its
        weight, a tracked weight used by a function the tap cannot follow, an input whose dimension 0 is not the
        batch, or a layer input modified in place after the layer read it."""
        missing = [t.layer for t in self.targets if t.layer not in record.calls]
        if missing:
            raise InfluenceError(
                f"Tracked layers {missing} were not called with their own weight while computing the "
                f"{_OBJECTIVE_NAMES[objective]}. Call them as modules (layer(x)) or through F.linear/F.conv with "
                "their weight, or leave them out of Task.tracked_modules()."
            )
        if record.other_uses:
            uses = "; ".join(f"{layer}: {sorted(set(fns))}" for layer, fns in record.other_uses.items())
            raise InfluenceError(
                f"Tracked weights are also used by functions the tap cannot follow ({uses}), so their "
                "per-example gradients would miss those uses. Leave these layers out of Task.tracked_modules() "
                "(e.g. a classifier tied to an embedding), or name the weight itself there instead (e.g. "
                f"{self._weight_names(record.other_uses)}): a parameter named that way is analysed with all its uses "
                "through per-example vmap gradients (identity or diagonal; kfac/ekfac up to 4096 values)."
            )
        for layer, calls in record.calls.items():
            for call in calls:
                # with post_process_per_sample_gradient the task maps the rows to examples (e.g. summing choices)
                if call.input_batch != examples and not getattr(self.task, "enable_post_process_per_sample_gradient",
                                                                False):
                    raise InfluenceError(
                        f"Layer {layer!r} received an input with leading dimension {call.input_batch} for a batch "
                        f"of {examples} examples: the tap needs the batch dimension first at every tracked layer "
                        "(e.g. use batch_first=True), since it reads example b's gradient at index b. Or pass "
                        "per_example_vmap=True: each example then runs alone under torch.func.vmap, and any "
                        "layout works (slower)."
                    )
        for layer, tensor, version in record.versions:
            if tensor._version != version:
                raise InfluenceError(
                    f"The input of layer {layer!r} is modified in place after the layer reads it (e.g. "
                    "ReLU(inplace=True) on it): its recorded value would be wrong. Use out-of-place ops there."
                )

    def _check_exact(self, objective: str, batch: Any, probes: Dict[str, List[torch.Tensor]]) -> None:
        """The safety net behind the discovery pass: the tap must account for every use of a tracked weight.

        Per layer, ``sum_n G_n = sum_{n,t} g_{n,t} a_{n,t}^T`` (unmasked) must equal the autograd gradient
        of the summed objective with respect to the layer's weight (and bias): both come from one forward
        pass, so the difference is rounding unless some use of the weight escaped the tap (a path through
        ``__torch_function__`` subclasses, properties, Parameter-aware ops ...). The bound is
        ``sqrt(eps) * sum_{n,t} |g_{n,t}| |a_{n,t}|``, the size of the terms summed. The global random state
        is left as it was, so that the check changes no sampled label.
        """
        specs = {layer: spec for layer, spec in self.specs.items() if spec.op != "parameters" and layer in probes}
        if not specs:
            return
        names = [n for spec in specs.values() for n in (spec.weight, spec.bias) if n is not None]

        def loss(subset):
            with ObjectiveMode():
                return self._call(objective, {**self.params, **subset}, self.buffers, batch), None

        # Two passes, so that the inputs the tap keeps and those autograd keeps for the weight gradients are never
        # held together; each sees the same random draws (sampled labels).
        accelerator = self.device.type != "cpu"
        random_state = lambda: torch.random.fork_rng(devices=[self.device] if accelerator else [],  # noqa: E731
                                                     device_type=self.device.type)
        with random_state(), unfused():
            grads = self._sharded_weight_grads(objective, batch, names) if self.sharded else \
                differentiate(loss, {n: self.params[n] for n in names})[0]
        with random_state(), unfused():
            sums = self._tapped_sums(objective, batch, probes, specs)
        for layer, spec in specs.items():
            tapped, scale = sums[layer]["summed"], sums[layer]["scale"]
            eps = max(torch.finfo(probes[layer][0].dtype).eps, torch.finfo(self.dtype).eps)
            if accelerator and tapped.dtype == torch.float32:
                eps = max(eps, 2.0 ** -10)  # float32 matmuls and convolutions may run in TF32 there
            expected = weight_as_matrix(grads[spec.weight], grads[spec.bias] if spec.has_bias else None,
                                        spec.groups, spec.op).to(tapped.dtype)
            _refuse_escaped_uses(layer, spec, tapped, expected, scale, eps)

    def _sharded_weight_grads(self, objective: str, batch: Any, names: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Autograd's gradients of the objective with respect to the tracked parameters ``names`` as FSDP holds them
        while their unit runs (the unsharded tensors; their ``.grad`` is left alone)."""
        seen = _ParametersSeen(self.model, names)
        with torch.enable_grad(), seen:
            loss = self._call(objective, self.params, self.buffers, batch)
        missing = [n for n in names if n not in seen.tensors]
        if missing:
            raise InfluenceError(f"The tracked parameters {missing} were not used while computing the "
                                 f"{_OBJECTIVE_NAMES[objective]}.")
        grads = torch.autograd.grad(loss, [seen.tensors[n] for n in names], allow_unused=True)
        return {n: torch.zeros_like(seen.tensors[n]) if g is None else g for n, g in zip(names, grads)}

    def _tapped_sums(self, objective: str, batch: Any, probes, specs: Dict[str, LayerSpec]) -> Dict[str, Tensors]:
        """Per layer, ``{"summed": sum_{n,t} g a^T, "scale": sum_{n,t} |g| |a|}`` as the tap sees it (streamed: no
        layer's inputs or output gradients are held beyond its own backward)."""
        examples = batch_examples(batch)
        wide = {layer: torch.promote_types(torch.promote_types(probes[layer][0].dtype, self.dtype), torch.float32)
                for layer in specs}
        statistics = {layer: _summed_gradient(spec, wide[layer], self.device) for layer, spec in specs.items()}
        zeros = {layer: accumulators_for(statistic, examples, self.call_tokens(layer, probes, examples), self.device)
                 for layer, statistic in statistics.items()}

        def tapped_loss(accumulators):
            streams = {layer: Stream(statistics[layer], zeros[layer][0], accumulators[layer], None) for layer in specs}
            tap = Tap(self._tracked(self.params), {}, examples=examples, per_example=self.per_example, streams=streams)
            with tap:
                loss = self._call(objective, self.params, self.buffers, batch)
            return loss, tap.record.early

        late, early = differentiate(tapped_loss, {layer: accumulators for layer, (_, accumulators) in zeros.items()})
        return {layer: combine(early[layer], dict(zip(zeros[layer][0], late[layer][:-1]))) for layer in specs}


class _ParametersSeen(ObjectiveMode):
    """Records, by name, the tensors a sharded model's parameters are while the model runs (FSDP2 puts a unit's
    unsharded parameters on its modules during its forward pass): the arguments of the layer calls the tap
    handles are compared (FSDP's own gathering ops see the sharded parameters)."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        super().__init__()
        self._places = {}
        for name in names:
            path, _, attribute = name.rpartition(".")
            self._places[name] = (model.get_submodule(path), attribute)
        self.tensors: Dict[str, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func not in _HANDLERS and func is not F.multi_head_attention_forward:
            return super().__torch_function__(func, types, args, kwargs)
        arguments = {id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for name, (module, attribute) in self._places.items():
            current = getattr(module, attribute)
            if name not in self.tensors and id(current) in arguments:
                self.tensors[name] = current
        return super().__torch_function__(func, types, args, kwargs)


class _CheckedObjectives:
    """The objectives whose tap was found exact, per model, in this process: a later call with the same model and
    task objects, tracked layers and settings, and parameters neither replaced nor changed in place (their
    ``_version``), runs the same code on the same weights, so its check would find what this one found."""

    def __init__(self):
        self._by_model = weakref.WeakKeyDictionary()

    @staticmethod
    def _task(tap: "ModelTap"):
        """The user's task object inside the pipeline's wrappers (seeded labels, renamed modules: see ``wraps``)."""
        task = tap.task
        while getattr(type(task), "wraps", None) is not None:
            task = task.wraps
        return task

    def _key(self, tap: "ModelTap", objective: str) -> Tuple:
        layers = tuple(sorted(tap.specs))
        parameters = tuple((id(p), p._version) for p in tap.model.parameters())
        forward = (type(tap.model).forward, tap.model.__dict__.get("forward"))  # a patched forward is new code
        return objective, id(self._task(tap)), layers, tap.per_example, tap.amp_dtype, parameters, forward

    def seen(self, tap: "ModelTap", objective: str) -> bool:
        entry = self._by_model.get(tap.model, {}).get(self._key(tap, objective))
        return entry is not None and entry() is self._task(tap)

    def remember(self, tap: "ModelTap", objective: str) -> None:
        try:
            task = weakref.ref(self._task(tap))
        except TypeError:  # a task that cannot be referenced weakly is checked every time
            return
        self._by_model.setdefault(tap.model, {})[self._key(tap, objective)] = task


_EXACT = _CheckedObjectives()


def _refuse_escaped_uses(layer: str, spec: LayerSpec, tapped: torch.Tensor, expected: torch.Tensor,
                         scale: torch.Tensor, eps: float) -> None:
    """Raise when the tap's summed gradient of a layer is farther from autograd's than rounding explains."""
    if not (bool(torch.isfinite(tapped).all()) and bool(torch.isfinite(expected).all())):
        return  # non-finite gradients are reported, with the batch, by the passes themselves
    error = float(torch.linalg.vector_norm(tapped - expected))
    if not error <= eps ** 0.5 * float(scale):
        raise InfluenceError(
            f"The tap's gradient of layer {layer!r} differs from autograd's on the first batch "
            f"(|difference| {error:.3g}, terms {float(scale):.3g}): its weight {spec.weight!r} is also used "
            f"in a way the tap cannot see (e.g. through a tensor subclass, a property or a custom op), so "
            "its per-example gradients would be wrong. Use the weight only through its module call, leave "
            f"{layer!r} out of Task.tracked_modules(), or name the parameter {spec.weight!r} itself there "
            "(its gradient then comes from per-example vmap, which sees every use)."
        )


def _summed_gradient(spec: LayerSpec, wide: torch.dtype, device: torch.device) -> LayerStatistic:
    """``{"summed": sum_{n,t} g a^T as [G, out, in], "scale": sum_{n,t} |g| |a|}`` of a layer's calls, unmasked,
    in ``wide`` (at least float32). For an embedding ``a`` is a one-hot row ``id_values * e_ids``, so ``g a^T``
    adds ``id_values * g`` to column ``ids`` of a ``[1, D, V]`` matrix."""

    def value(stats):
        g = stats.g.to(wide)
        if spec.one_hot:
            rows = g.reshape(-1, g.shape[-1]) * stats.id_values.to(wide).reshape(-1, 1)  # [B T, D]
            term = rows.new_zeros(spec.in_features, rows.shape[-1]).index_add(0, stats.ids.reshape(-1), rows).T[None]
            return {"summed": term, "scale": torch.linalg.vector_norm(rows, dim=-1).sum()}
        a = stats.a.to(wide)
        return {"summed": torch.einsum("btgo,btgi->goi", g, a),
                "scale": (torch.linalg.vector_norm(g, dim=-1) * torch.linalg.vector_norm(a, dim=-1)).sum()}

    return of_stats(value, lambda examples, tokens: {"summed": torch.zeros(*spec.shape, dtype=wide, device=device),
                                                     "scale": torch.zeros((), dtype=wide, device=device)},
                    additive=True)


_OBJECTIVE_NAMES = {
    "train": "training loss (Task.compute_train_loss)",
    "train_sampled": "training loss with sampled labels (Task.compute_train_loss, sample=True)",
    "measurement": "measurement (Task.compute_measurement)",
}

_SUM_FIX = {
    "train": "Return the summed loss, e.g. F.cross_entropy(logits, labels, reduction='sum').",
    "measurement": "Return the summed measurement, e.g. .sum() instead of .mean() over the examples.",
}
_SUM_FIX["train_sampled"] = _SUM_FIX["train"]


def _check_random(random_calls: Sequence[Tuple[str, bool]], objective: str) -> None:
    """Refuse an objective that draws random numbers, except true-Fisher label sampling in the task itself.

    A random op (dropout, rrelu or noise in training mode) makes the same example's gradient differ from
    call to call, so scores would be noise; the sampled labels of ``compute_train_loss(sample=True)`` are
    the one randomness the method asks for, and they are drawn by the task, not inside the model.
    """
    for how, inside_model in random_calls:
        if objective == "train_sampled" and not inside_model and "training=True" not in how:
            continue
        where = "the model" if inside_model else "the task"
        raise InfluenceError(
            f"{where[0].upper()}{where[1:]} draws random numbers while computing the {_OBJECTIVE_NAMES[objective]}: "
            f"{how}. Every call would then give other gradients and other scores (dropout and similar layers are "
            "random in training mode). Call model.eval() before computing influence, or remove the random op; only "
            "the labels of Task.compute_train_loss(sample=True) may be sampled, in the task's own code."
        )


def _check_loss(loss: Any, objective: str) -> None:
    name = _OBJECTIVE_NAMES[objective]
    if not isinstance(loss, torch.Tensor):
        raise InfluenceError(f"The {name} returned {type(loss).__name__}, not a tensor.")
    if loss.dim() != 0:
        raise InfluenceError(
            f"The {name} returned a tensor of shape {tuple(loss.shape)}; it must be a scalar: the sum over the "
            "batch's examples (and tokens), e.g. reduction='sum'."
        )
    if not loss.is_floating_point():
        raise InfluenceError(f"The {name} returned a {loss.dtype} tensor; it must be floating point.")


def check_finite(loss: torch.Tensor, objective: str, batch_index: int) -> None:
    if not bool(torch.isfinite(loss)):
        raise InfluenceError(
            f"The {_OBJECTIVE_NAMES[objective]} is {loss.item()} on batch {batch_index}: influence needs finite "
            "losses. Check that batch's inputs and the model's weights for NaN/Inf, or clamp the loss."
        )
