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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
import torch.utils.checkpoint as _checkpoint
from torch.utils._pytree import tree_flatten, tree_map

from ..core.algebra import DenseStats, LayerStats, OneHotInput, OneHotStats, from_single_examples
from ..errors import InfluenceError
from ..task import Task, tracked_module_names
from .layers import LayerSpec, Target, resolve_parameter_layers, resolve_targets, specs_from_calls
from .ops import HANDLERS_BY_NAME as _HANDLERS_BY_NAME
from .ops import layout, weight_as_matrix
from .tap import ObjectiveMode, Tap, TrackedWeight


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


def _apply_mask(layer: str, a_calls, g_calls, mask) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate calls along tokens; zero the tokens outside ``mask`` and count the rest.

    A ``[batch, tokens]`` mask applies to every call whose token count it matches; calls without a
    token dimension (T = 1, e.g. a head on a pooled output) are not masked.
    """
    a_out, g_out, tokens = [], [], []
    for a, g in zip(a_calls, g_calls):
        if mask is not None and a.shape[1] != 1 and (mask.dim() != 2 or a.shape[1] != mask.shape[1]):
            raise InfluenceError(
                f"Layer {layer!r} has {a.shape[1]} tokens per example but the attention mask has shape "
                f"{tuple(mask.shape)}. Return a [batch, tokens] mask that matches, or a dict of masks per layer "
                "name from Task.get_attention_mask()."
            )
        if mask is not None and a.shape[1] != 1:
            weight = mask.to(a.dtype)[:, :, None, None]
            a, g = a * weight, g * weight.to(g.dtype)
            tokens.append(mask.to(a.dtype).sum())
        else:
            tokens.append(torch.full((), a.shape[0] * a.shape[1], dtype=a.dtype, device=a.device))
        a_out.append(a)
        g_out.append(g)
    a = a_out[0] if len(a_out) == 1 else torch.cat(a_out, dim=1)
    g = g_out[0] if len(g_out) == 1 else torch.cat(g_out, dim=1)
    return a, g, sum(tokens[1:], tokens[0])


def _one_hot_stats(layer: str, id_calls: Sequence[OneHotInput], g_calls, mask) -> OneHotStats:
    """An embedding's stats, masked like dense layers.

    The ``[B, T]`` ids and values of every call go through :func:`_apply_mask` as a ``[B, T, 1, 1]``
    stand-in for ``a`` (masked tokens get value 0 and a zero ``g``); the ids ride along unchanged.
    """
    values = [c.id_values[:, :, None, None] for c in id_calls]
    values, g, tokens = _apply_mask(layer, values, g_calls, mask)
    ids = [c.ids for c in id_calls]
    ids = ids[0] if len(ids) == 1 else torch.cat(ids, dim=1)
    return OneHotStats(ids, values[:, :, 0, 0], g, tokens)


class ModelTap:
    """The user's model and task, ready to be run under the tap.

    Holds detached views of the model's parameters (nothing is registered on the model, its
    ``requires_grad`` flags and training mode are left alone), the tracked layers, and zero probes for
    every batch shape seen so far. Discovery runs once per (objective, batch shapes).
    """

    def __init__(self, model: nn.Module, task: Task, layers: Optional[Sequence[str]] = None,
                 amp_dtype: Optional[torch.dtype] = None, per_example: bool = False):
        check_model(model)
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

    # -- the pure part -------------------------------------------------------------------------

    def _tracked(self, params: Dict[str, torch.Tensor]) -> List[TrackedWeight]:
        return [TrackedWeight(t.layer, params[t.weight], params[t.bias] if t.bias else None, t.one_hot)
                for t in self.targets]

    def _call(self, objective: str, params, buffers, batch) -> torch.Tensor:
        tensors = {"model." + k: v for k, v in params.items()}
        tensors.update({"model." + k: v for k, v in buffers.items()})
        # torch.compile traces a checkpoint as one opaque op (see compile_option), so there is nothing to replace
        checkpoints = contextlib.nullcontext() if torch.compiler.is_compiling() else direct_checkpoints()
        with self._autocast(), checkpoints:
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
        losses, stats = torch.func.vmap(one, in_dims=(in_dims,), randomness="different")(batch)
        stats = {layer: from_single_examples(s) for layer, s in stats.items()}
        return losses.sum(), stats

    def _batch_stats(self, objective: str, params, buffers, batch, probes):
        examples = batch_examples(batch)

        def loss_of_probes(probes):
            tap = Tap(self._tracked(params), probes, examples=examples, per_example=self.per_example)
            with tap:
                loss = self._call(objective, params, buffers, batch)
            return loss, (loss.detach(), tap.record.inputs)

        probe_grads, (loss, inputs) = torch.func.grad(loss_of_probes, has_aux=True)(probes)
        mask = self.task.get_attention_mask(batch)
        stats = self._parameter_stats(objective, params, buffers, batch) if self.parameter_layers else {}
        for layer, spec in self.specs.items():
            if spec.op == "parameters":
                continue
            a_calls = inputs[layer]
            if len(a_calls) != len(probes[layer]):
                raise InfluenceError(
                    f"Layer {layer!r} was called {len(a_calls)} times, but {len(probes[layer])} times in the "
                    "discovery pass on a batch of the same shapes: the number of calls depends on the data."
                )
            _, output_grad = layout(_HANDLERS_BY_NAME[spec.op], self.per_example)
            g_calls = [output_grad(grad, spec.groups, examples) for grad in probe_grads[layer]]
            layer_mask = mask.get(layer) if isinstance(mask, dict) else mask
            if spec.one_hot:
                stats[layer] = _one_hot_stats(layer, a_calls, g_calls, layer_mask)
            else:
                a, g, tokens = _apply_mask(layer, a_calls, g_calls, layer_mask)
                stats[layer] = DenseStats(a, g, tokens)
        return loss, stats

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
        grads = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, in_dims), randomness="different")(
            {n: params[n] for n in names}, batch)
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
        if self.per_example:
            batch = tree_map(lambda x: x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 else x, batch)
        key = (objective, batch_signature(batch))
        probes = self._probes.get(key)
        if probes is None:
            probes = self._discover(objective, batch)
            self._probes[key] = probes
        return probes

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
        if compile and (self._whole or self).checkpointed:
            warnings.warn("compile is ignored: the model uses activation checkpointing, which torch.compile hides "
                          "from the tap; running eagerly (the results are the same).", stacklevel=3)
            return False
        return compile

    def _discover(self, objective: str, batch: Any) -> Dict[str, List[torch.Tensor]]:
        checkpoints_before = direct_checkpoints.calls()
        try:
            return self._discover_once(objective, batch)
        finally:
            self.checkpointed |= direct_checkpoints.calls() > checkpoints_before

    def _discover_once(self, objective: str, batch: Any) -> Dict[str, List[torch.Tensor]]:
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
        probes = {
            layer: [torch.zeros(c.output_shape, dtype=c.output_dtype, device=self.device) for c in calls]
            for layer, calls in record.calls.items()
        }
        if objective not in self._exact:  # a use that escapes the tap is in the code, not in a batch's shapes
            self._check_exact(objective, batch, probes)
            self._exact.add(objective)
        return probes

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
        examples = batch_examples(batch)

        def loss_of(probes, subset):
            params = {**self.params, **subset}
            tap = Tap(self._tracked(params), probes, examples=examples, per_example=self.per_example)
            with tap:
                loss = self._call(objective, params, self.buffers, batch)
            return loss, tap.record.inputs

        accelerator = self.device.type != "cpu"
        with torch.random.fork_rng(devices=[self.device] if accelerator else [], device_type=self.device.type), \
                unfused():
            (probe_grads, grads), inputs = torch.func.grad(loss_of, argnums=(0, 1), has_aux=True)(
                probes, {n: self.params[n] for n in names})
        for layer, spec in specs.items():
            _, output_grad = layout(_HANDLERS_BY_NAME[spec.op], self.per_example)
            g_calls = [output_grad(grad, spec.groups, examples) for grad in probe_grads[layer]]
            tapped, scale, eps = _summed_gradient(inputs[layer], g_calls, spec.in_features if spec.one_hot else None)
            if accelerator and tapped.dtype == torch.float32:
                eps = max(eps, 2.0 ** -10)  # float32 matmuls and convolutions may run in TF32 there
            expected = weight_as_matrix(grads[spec.weight], grads[spec.bias] if spec.has_bias else None,
                                        spec.groups, spec.op).to(tapped.dtype)
            if not (bool(torch.isfinite(tapped).all()) and bool(torch.isfinite(expected).all())):
                continue  # non-finite gradients are reported, with the batch, by the passes themselves
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


def _summed_gradient(a_calls, g_calls, vocabulary: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """``(sum_{n,t} g a^T as [G, out, in], sum_{n,t} |g| |a|, machine epsilon of the inputs)`` over all calls.

    Summed in at least float32. For an embedding ``a`` is a one-hot row ``id_values * e_ids``, so
    ``g a^T`` adds ``id_values * g`` to column ``ids`` of a ``[1, D, V]`` matrix.
    """
    total, scale, eps = None, 0.0, 0.0
    for a, g in zip(a_calls, g_calls):
        dtypes = [g.dtype, (a["id_values"] if vocabulary is not None else a).dtype]
        wide = torch.promote_types(torch.promote_types(*dtypes), torch.float32)
        eps = max([eps] + [torch.finfo(d).eps for d in dtypes])
        if vocabulary is not None:
            rows = g.to(wide).reshape(-1, g.shape[-1]) * a["id_values"].to(wide).reshape(-1, 1)  # [B T, D]
            term = rows.new_zeros(vocabulary, rows.shape[-1]).index_add(0, a["ids"].reshape(-1), rows).T[None]
            size = torch.linalg.vector_norm(rows, dim=-1).sum()
        else:
            a, g = a.to(wide), g.to(wide)
            term = torch.einsum("btgo,btgi->goi", g, a)
            size = (torch.linalg.vector_norm(g, dim=-1) * torch.linalg.vector_norm(a, dim=-1)).sum()
        total = term if total is None else total + term
        scale = scale + size
    return total, scale, eps


_OBJECTIVE_NAMES = {
    "train": "training loss (Task.compute_train_loss)",
    "train_sampled": "training loss with sampled labels (Task.compute_train_loss, sample=True)",
    "measurement": "measurement (Task.compute_measurement)",
}


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
