"""The imperative shell: loops over data, cells (data x module partitions), stores, compilation, progress.

Each public function composes the pure per-batch pieces — :meth:`ModelTap.layer_stats`, an
estimator's ``update`` / ``precondition`` / ``self_score``, the contractions in :mod:`.scores` — into one
step function per pass, optionally compiled with ``torch.compile(fullgraph=True)``, and runs it over
the batches of each cell. With a ``store`` every finished cell is written to Zarr and marked complete,
so a killed run loses at most the cells in progress and a rerun computes only the missing ones.
"""

from __future__ import annotations

import contextlib
import logging
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from . import arguments
from . import distributed as parallel
from . import finite
from . import partitions as parts
from . import postprocess
from . import sampling
from .capture import LayerSpec, ModelTap, batch_examples, check_finite, unfused
from .curvature import (CurvatureEstimator, check_parameter_layers, pass_declaration, pass_order, per_example_grads,
                        resolve_strategies)
from .data import Data, batches, num_batches
from .errors import InfluenceError
from .factors import Factors, canonical_layout
from .precision import Precision
from .progress import log_phase
from .scores import (Query, example_grad_dot, low_rank, pairwise_layer_scores, spread_to_tokens,
                     summed_train_scores, total)
from .store import factors_store, fingerprint, scores_store
from .task import Task

logger = logging.getLogger("fninfluence")

CompileOption = Union[bool, Mapping[str, Any]]
PerPass = Union[int, None, Mapping[str, Optional[int]]]
Targets = Optional[Sequence[int]]


# -- small helpers ---------------------------------------------------------------------------------

def _mark_shapes(args: Sequence[Any], batched: Sequence[int]) -> None:
    """Dimension 0 (the examples) of the tensors in ``args[batched]`` dynamic, every other dimension
    static: a last, shorter batch then reuses the compiled graph instead of compiling another, and the
    contraction plans (:mod:`.contract`) see static sizes everywhere else. (``maybe_``: a model that needs
    a fixed batch size still compiles, specialised.) The model's parameters and buffers (the first two
    arguments) are left alone: their shapes never change, and they are the user's tensors."""
    for position, value in enumerate(args):
        if position < 2:
            continue
        for leaf in torch.utils._pytree.tree_leaves(value):
            if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
                continue
            dynamic = position in batched
            if dynamic:
                torch._dynamo.maybe_mark_dynamic(leaf, 0)
            else:  # e.g. query gradients returned by another compiled step inherit its dynamic batch dimension
                vars(leaf).pop("_dynamo_propagated_dynamic_indices", None)
            for dim in range(1 if dynamic else 0, leaf.dim()):
                torch._dynamo.mark_static(leaf, dim)


def _maybe_compile(fn: Callable, compile: CompileOption, batched: Sequence[int] = (2, 3)) -> Callable:
    """``fn``, or ``torch.compile(fn, fullgraph=True, **options)`` (a graph break is an error), run with
    PyTorch's fused attention fast paths off so that the tap sees the layers inside them. The arguments
    at positions ``batched`` (the batch and the probes) have their first dimension marked dynamic."""
    if compile:
        options = {} if compile is True else dict(compile)
        fn = torch.compile(fn, fullgraph=True, **options)
        dynamic_batch = options.get("dynamic") is not False

    def run(*args):
        if compile and dynamic_batch:
            _mark_shapes(args, batched)
        with unfused():
            return fn(*args)

    return run


def _progress(data: Data, batch_size: Optional[int], desc: str, enabled: bool, argument: str):
    return tqdm(total=num_batches(data, batch_size, argument), desc=desc, unit="batch", disable=not enabled,
                leave=False)


@contextlib.contextmanager
def _on_batch(what: str, index: int):
    """Adds to any error raised while processing a batch which pass and which batch it was."""
    try:
        yield
    except RuntimeError as error:
        message = str(error)
        if "setup_context staticmethod" in message or "saved tensor hooks" in message:
            raise InfluenceError(
                "The model uses an autograd.Function without setup_context or a saved-tensor hook (e.g. activation "
                "checkpointing or offloading by a library other than torch.utils.checkpoint) that torch.func.grad "
                "cannot run. Turn it off while computing influence (e.g. model.gradient_checkpointing_disable() for "
                "Hugging Face models, or call the checkpointed blocks directly); checkpointing only trades memory for "
                f"time, the results do not change. (torch.utils.checkpoint itself is supported.) [{what}, batch {index}]"
            ) from error
        if hasattr(error, "add_note"):
            error.add_note(f"fninfluence: raised while computing {what} on batch {index}.")
        raise
    except Exception as error:
        if hasattr(error, "add_note"):
            error.add_note(f"fninfluence: raised while computing {what} on batch {index}.")
        raise


def _gradient_stats(engine: ModelTap, objective: str, params, buffers, batch, probes):
    """:meth:`ModelTap.layer_stats` with the task's ``post_process_per_sample_gradient`` applied to the
    per-example gradients (:mod:`.postprocess`); the covariance pass reads raw statistics instead."""
    loss, stats = engine.layer_stats(objective, params, buffers, batch, probes)
    post_process = postprocess.post_process_of(engine.task)
    if post_process is not None and engine.per_example:
        raise InfluenceError(
            "per_example_vmap=True runs each example alone, so post_process_per_sample_gradient would see "
            "per-example instead of per-row gradients. Drop per_example_vmap (or the post-processing)."
        )
    if post_process is not None:
        stats = postprocess.post_processed_stats(post_process, engine.specs, stats, batch)
    return loss, stats


def _shaped(value: Any, expected: Tuple[int, ...], what: str, layer: str):
    """``value`` if it is a tensor of shape ``expected``; a custom estimator's output of another shape would
    otherwise broadcast silently against the gradients or the scores."""
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(expected):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise InfluenceError(
            f"The estimator's {what} returned {got} for layer {layer!r}; it must return shape "
            f"{tuple(expected)} (see fninfluence.curvature.base for each function's contract)."
        )
    return value


def _updated(fit_pass, state: Dict[str, torch.Tensor], stats, earlier, layer: str):
    """``fit_pass.update`` with its result checked against the state's keys and shapes."""
    new = fit_pass.update(state, stats, earlier)
    if not isinstance(new, Mapping) or set(new) != set(state):
        raise InfluenceError(
            f"The estimator's {fit_pass.name} update returned keys "
            f"{sorted(new) if isinstance(new, Mapping) else type(new).__name__} for layer {layer!r}; it must return "
            f"the state's keys {sorted(state)}."
        )
    return {key: _shaped(value, state[key].shape, f"{fit_pass.name} update [{key!r}]", layer)
            for key, value in new.items()}


def _check_damping(damping: Optional[float]) -> None:
    arguments.check_damping(damping)


def _length(data: Data, argument: str) -> int:
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if not hasattr(dataset, "__len__"):
        raise InfluenceError(f"{argument} has no length; partitions, max_examples and stores need a sized Dataset.")
    return len(dataset)


def _subset(data: Data, indices: range) -> Data:
    """The examples ``indices`` of ``data``, keeping a DataLoader's batching and collation."""
    if isinstance(data, DataLoader):
        settings = {name: getattr(data, name) for name in (
            "batch_size", "collate_fn", "num_workers", "pin_memory", "drop_last", "timeout", "worker_init_fn",
            "generator", "persistent_workers", "pin_memory_device", "multiprocessing_context")}
        if data.num_workers > 0:
            settings["prefetch_factor"] = data.prefetch_factor
        return DataLoader(Subset(data.dataset, indices), **settings)
    return Subset(data, indices)


def _per_pass(value: PerPass, name: str, default):
    if isinstance(value, Mapping):
        return value.get(name, default)
    return default if value is None else value


def _cast_stats(stats: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    return {k: v.to(dtype) if k in ("a", "g", "id_values") else v for k, v in stats.items()}


def _first_batch(data: Data, batch_size: Optional[int], device: torch.device, argument: str):
    first = next(iter(batches(data, batch_size, device, argument)), None)
    if first is None:
        raise InfluenceError(f"{argument} is empty: there is nothing to compute on.")
    return first


def _discover(model, task, data, batch_size, objective, amp_dtype, argument="data", per_example=False) -> ModelTap:
    engine = ModelTap(model, task, amp_dtype=amp_dtype, per_example=per_example)
    first = _first_batch(data, batch_size, engine.device, argument)
    if objective == "train_sampled":  # a SeededTask's batches carry their examples' indices
        first = sampling.with_example_ids(first, 0, batch_examples(first), engine.device)
    engine.probes_for(objective, first)
    return engine


# -- fitting ---------------------------------------------------------------------------------------

def _state_dtype(precision: Precision, fit_pass, model_dtype: torch.dtype) -> torch.dtype:
    return precision.fit_dtypes(fit_pass, model_dtype)[0]


def _fit_cell(engine: ModelTap, pass_name: str, fit_passes, objective: str, data: Data, batch_size, earlier,
              precision: Precision, compile: CompileOption, progress: bool, label: str, first: int = 0, seed: int = 0):
    """Sum over ``data`` of each layer's state of pass ``pass_name`` (``fit_passes[layer]``): ``(states, examples)``.

    ``data``'s examples are examples ``first, first + 1, ...`` of the whole dataset: with sampled labels each batch
    carries those indices, so that every example's labels depend on (seed, index) only (:mod:`.sampling`)."""
    model_dtype = engine.dtype
    declared = pass_declaration(fit_passes)
    state_dtype, compute_dtype = precision.fit_dtypes(declared, model_dtype)

    def step(params, buffers, batch, probes, state, earlier):
        if declared.reads_raw_statistics:  # e.g. sums of raw a a^T and g g^T: no per-example gradient to post-process
            loss, stats = engine.layer_stats(objective, params, buffers, batch, probes)
        else:
            loss, stats = _gradient_stats(engine, objective, params, buffers, batch, probes)
        stats = {layer: _cast_stats(s, compute_dtype) for layer, s in stats.items()}
        checked = (loss, finite.finite_flags(loss, stats))
        return checked, {layer: _updated(fit_passes[layer], state[layer], stats[layer], earlier[layer], layer)
                         for layer in state}

    run = _maybe_compile(step, engine.compile_option(compile))
    state, examples = None, 0
    bar = _progress(data, batch_size, label, progress, "data")
    sampled = objective == "train_sampled"
    for index, batch in enumerate(batches(data, batch_size, engine.device)):
        size = batch_examples(batch)
        with _on_batch(label, index), (sampling.seeded_generators(seed, first + examples, engine.device)
                                       if sampled else contextlib.nullcontext()):
            if sampled:
                batch = sampling.with_example_ids(batch, first + examples, size, engine.device)
            probes = engine.probes_for(objective, batch)
            if state is None:
                state = {layer: fit_passes[layer].init(spec.shape, state_dtype, engine.device)
                         for layer, spec in engine.specs.items()}
            (loss, flags), state = run(engine.params, engine.buffers, batch, probes, state,
                                       {layer: earlier.get(layer, {}) for layer in engine.specs})
        finite.raise_not_finite(flags, loss, objective, index, [engine.specs], [finite.STATISTICS],
                                f"The {pass_name} statistics")
        examples += size
        bar.update(1)
    bar.close()
    return state, examples


def _fit_plan(pass_names, total_examples, max_examples, data_partitions, module_partitions, group):
    """``{pass: (examples, data partitions, module partitions)}``: known before any data is read."""
    plan = {}
    for name in pass_names:
        limit = _per_pass(max_examples, name, None)
        examples = total_examples if limit is None or total_examples is None else min(limit, total_examples)
        module_parts = _per_pass(module_partitions, name, 1)
        plan[name] = (examples, parallel.enough_partitions(_per_pass(data_partitions, name, 1), module_parts, group),
                      module_parts)
        parts.check_count(plan[name][1], "data partitions")
        parts.check_count(plan[name][2], "module partitions")
    return plan


def _strategy_label(estimators) -> str:
    names = sorted({e.name for e in estimators.values()})
    return names[0] if len(names) == 1 else "mixed"


def fit_factors(
    model: nn.Module,
    task: Task,
    data: Data,
    *,
    strategy: Union[str, CurvatureEstimator, Mapping[str, Union[str, CurvatureEstimator]]] = "ekfac",
    use_empirical_fisher: bool = False,
    batch_size: Optional[int] = None,
    compile: CompileOption = False,
    progress: bool = True,
    store: Optional[Union[str, Path]] = None,
    overwrite: bool = False,
    passes: Optional[Sequence[str]] = None,
    max_examples: PerPass = None,
    data_partitions: PerPass = 1,
    module_partitions: PerPass = 1,
    target_data_partitions: Targets = None,
    target_module_partitions: Targets = None,
    precision: Optional[Precision] = None,
    per_example_vmap: bool = False,
    distributed: Optional[bool] = None,
    seed: int = 0,
) -> Optional[Factors]:
    """Fit the curvature factors of ``strategy`` on ``data``.

    With ``use_empirical_fisher=False`` (the default) the task is asked for labels sampled from the
    model (``sample=True``), which gives the true Fisher; with True the batch's own labels are used.
    Sampled labels are reproducible: while ``compute_train_loss(..., sample=True)`` runs, PyTorch's random
    functions (``torch.multinomial``, ``bernoulli``, ``rand``, ``randn``, ...) draw from a generator keyed by
    (``seed``, the example's index in ``data``), so batch size, partitions, resume, order of cells and ranks do
    not change the factors (see :mod:`fninfluence.sampling` for the exact rule and its fallback).
    ``compile`` may be True or a dict of ``torch.compile`` options (``fullgraph=True`` is always set).

    ``strategy`` may be a dict ``{layer name: strategy}`` with ``"*"`` for the others, e.g.
    ``{"*": "ekfac", "ln_f": "diagonal"}``: each layer is fitted and preconditioned by its own estimator.

    Partitions and persistence: each pass over the data (``covariance`` and ``lambda`` for EKFAC) is split
    into ``data_partitions`` x ``module_partitions`` cells (an int, or a dict per pass name); with
    ``store`` (a directory) each finished cell is written there, so several processes can fill disjoint
    cells (``target_data_partitions`` / ``target_module_partitions``) and a rerun computes only what is
    missing. ``passes`` restricts the run to some passes (later passes read earlier ones from the store).
    ``max_examples`` (an int or a dict per pass) uses only the first examples of ``data``.

    ``per_example_vmap=True`` runs each example alone under ``torch.func.vmap`` (batches of one): for
    models whose tracked layers do not see the batch in dimension 0 (sequence-first layouts). Slower.

    Under ``torchrun`` (``distributed=None`` and an initialised process group of several ranks, or
    ``distributed=True``) the cells are dealt to the ranks and every rank returns the same factors, equal bit
    for bit to a one-process run with the same partitions (at least one cell per rank: see
    docs/distributed.md). ``distributed=False`` ignores the process group.

    Returns the factors once every cell of every pass is complete, else None.
    """
    precision = precision or Precision()
    arguments.check_positive(batch_size, "batch_size")
    arguments.check_per_pass(max_examples, "max_examples", allow_none=True)
    model, task = parallel.unwrap(model, task)
    group = parallel.ranks(distributed)
    progress = progress and (group is None or group.leader)  # one set of progress bars, rank 0's
    if group is not None:
        parallel.check_data(data, "data")
    objective = "train" if use_empirical_fisher else "train_sampled"
    if not use_empirical_fisher:
        task = sampling.SeededTask(task, seed)
    total_examples = _length(data, "data") if (store or max_examples or data_partitions != 1 or group) else None

    def plan_for(names):
        return _fit_plan(names, total_examples, max_examples, data_partitions, module_partitions, group)

    store_arguments = {"use_empirical_fisher": use_empirical_fisher, "precision": precision.as_dict(),
                       "seed": None if use_empirical_fisher else int(seed)}
    if store is not None and not overwrite and passes is None and group is None:
        reused = factors_store.reuse_complete(  # a complete store: no data is read, not even for discovery
            Path(store), model=model, task=task, data=data, resolve=lambda specs: resolve_strategies(strategy, specs),
            plan_for=plan_for, arguments=store_arguments)
        if reused is not None:
            return reused
    engine = _discover(model, task, data, batch_size, objective, precision.amp_dtype, per_example=per_example_vmap)
    specs = dict(engine.specs)
    estimators = resolve_strategies(strategy, specs)
    check_parameter_layers(estimators, specs)
    pass_names = pass_order(estimators)
    fitting = precision.fitting(estimators, engine.dtype)  # their outputs in the dtypes asked for
    layer_passes = {name: {layer: p for layer, e in fitting.items() for p in e.passes if p.name == name}
                    for name in pass_names}
    label = _strategy_label(estimators)
    wanted = pass_names if passes is None else list(passes)
    unknown = [p for p in wanted if p not in pass_names]
    if unknown:
        raise InfluenceError(f"Unknown passes {unknown} for strategy {label!r}: it has {pass_names}.")

    plan = plan_for(pass_names)

    saved = None
    if store is not None:
        saved = parallel.open_in_turn(group, lambda fresh: factors_store.open_fit(
            Path(store), model=model, data=data, estimators=fitting, specs=specs, plan=plan,
            arguments=store_arguments,
            state_dtypes={name: _state_dtype(precision, pass_declaration(layer_passes[name]), engine.dtype)
                          for name in pass_names},
            overwrite=fresh,
        ), overwrite)

    factors: Dict[str, Dict[str, torch.Tensor]] = {layer: {} for layer in specs}
    done_passes: List[str] = []
    examples_seen = 0
    for name in pass_names:
        if saved is not None and saved.pass_complete(name):
            factors = saved.merge_pass_outputs(name, factors)
            done_passes.append(name)
            continue
        if name not in wanted:
            if any(p in wanted for p in pass_names[pass_names.index(name) + 1:]):
                raise InfluenceError(
                    f"Pass {name!r} must be complete before the later passes {wanted}: run it first "
                    "(with the same store)."
                )
            continue
        fit_passes = layer_passes[name]  # the layers whose estimator has this pass
        examples, data_parts, module_parts = plan[name]
        pass_data = data if examples is None or examples == total_examples else _subset(data, range(examples))
        ranges = parts.data_ranges(examples, data_parts) if examples is not None else [None]
        groups = parts.module_groups(list(fit_passes), module_parts)
        targets_d = parts.targets(target_data_partitions, len(ranges), "data partitions")
        targets_m = parts.targets(target_module_partitions, len(groups), "module partitions")
        if saved is None and (len(targets_d) < len(ranges) or len(targets_m) < len(groups)):
            raise InfluenceError("target partitions need a store to keep the other cells: pass store=...")
        started = time.perf_counter()
        pending: Dict[str, List[Dict[str, torch.Tensor]]] = {}
        cells = [(m, d) for m in targets_m for d in targets_d]
        computed, pass_examples, engines = {}, 0, {}
        for m, d in (cells if group is None else group.mine(cells)):
            if m not in engines:
                every_layer = len(groups) == 1 and len(fit_passes) == len(specs)
                engines[m] = engine if every_layer else ModelTap(model, task, layers=groups[m],
                                                                 amp_dtype=precision.amp_dtype,
                                                                 per_example=per_example_vmap)
            cell = parts.cell_name(name, d, m)
            if saved is not None and saved.cell_done(cell):
                continue
            cell_data = pass_data if ranges[d] is None or len(ranges) == 1 else _subset(pass_data, ranges[d])
            with fingerprint.recording() as seen:  # the content of the cell's data, hashed as it is read
                if ranges[d] is not None and len(ranges[d]) == 0:
                    states, n = {layer: fit_passes[layer].init(specs[layer].shape, torch.float64, engine.device)
                                 for layer in groups[m]}, 0
                else:
                    states, n = _fit_cell(engines[m], name, fit_passes, objective, cell_data, batch_size, factors,
                                          precision, compile, progress, f"{label} {name} [{cell}]",
                                          first=ranges[d].start if ranges[d] is not None else 0, seed=seed)
            pass_examples += n if m == 0 else 0  # each example once, not once per module partition
            if saved is not None:
                saved.write_cell(name, d, states, cell, n, seen)
            elif group is not None:
                computed[(m, d)] = states
            else:
                for layer, state in states.items():
                    pending.setdefault(layer, []).append(state)
        examples_seen = pass_examples if group is None else group.total(pass_examples)  # this pass's, as the store's
        if saved is not None:
            if group is not None:
                group.barrier()  # every rank's cells are written
            if not saved.all_cells_done(name, len(ranges), len(groups)):
                logger.info("%s: pass %s has missing cells %s; rerun to complete it.", store, name,
                            saved.missing_cells(name, len(ranges), len(groups)))
                return None
        finalize_started = time.perf_counter()
        if group is not None:  # the eigendecompositions are spread over the ranks, layer by layer
            if saved is not None:
                parallel.finalize_stored_pass(group, saved, name, fit_passes, factors)
                stored = saved.merge_pass_outputs(name, {})
                outputs = {layer: {k: v.to(engine.device) for k, v in stored[layer].items()} for layer in fit_passes}
            else:
                outputs = parallel.finalize_pass(group, fit_passes, cells, groups, computed, factors, engine.device)
        else:
            if saved is not None:
                summed = saved.sum_partials(name)
            else:
                # the same reduction as the store's (stack, then sum), so both give identical bits
                summed = {layer: parallel.sum_in_order(states) for layer, states in pending.items()}
            outputs = {layer: fit_pass.finalize(summed[layer], factors[layer]) for layer, fit_pass in fit_passes.items()}
        outputs = {layer: canonical_layout(tensors) for layer, tensors in outputs.items()}
        finite.check_factors(outputs)  # before a store certifies them complete
        finalize_seconds = time.perf_counter() - finalize_started
        if group is None and saved is not None:
            saved.write_pass_outputs(name, outputs)
        factors = {layer: {**factors[layer], **outputs.get(layer, {})} for layer in specs}
        done_passes.append(name)
        log_phase(f"{label} {name} pass", examples_seen, started, engine.device, phase=name,
                  seconds=finalize_started - started, finalize_seconds=finalize_seconds)

    complete = len(done_passes) == len(pass_names)
    result = Factors(strategy=label, estimator=next(iter(estimators.values())), layers=specs, tensors=factors,
                     num_examples=saved.num_examples() if saved is not None else examples_seen,
                     use_empirical_fisher=use_empirical_fisher, passes_done=tuple(done_passes), estimators=estimators)
    if saved is not None and complete:
        saved.mark_complete()
    if passes is None and not complete:
        return None
    return result


# -- scoring ---------------------------------------------------------------------------------------

def _check_layers(factors: Factors, engine: ModelTap) -> None:
    fitted = {name: spec.shape for name, spec in factors.layers.items() if name in engine.specs}
    here = {name: spec.shape for name, spec in engine.specs.items()}
    if fitted != here or not set(engine.specs) <= set(factors.layers):
        raise InfluenceError(
            f"The factors were fitted on layers { {n: s.shape for n, s in factors.layers.items()} }, but this model "
            f"and task track {here}. Fit factors with the same model and Task.tracked_modules()."
        )
    if not factors.complete:
        missing = [name for name in factors.pass_names if name not in factors.passes_done]
        raise InfluenceError(f"The factors are incomplete (passes {missing} missing): finish fit_factors first.")


def _factors_on(factors: Factors, engine: ModelTap) -> Dict[str, Dict[str, torch.Tensor]]:
    """Factors on the model's device, fetched once per call rather than per batch."""
    return {layer: {k: v.to(engine.device) for k, v in factors.tensors[layer].items()} for layer in engine.specs}


def _query_gradients(engine: ModelTap, factors: Factors, query_data: Data, *, damping, batch_size, compile,
                     progress, precision: Precision, aggregate: bool, group=None) -> List[Dict[str, torch.Tensor]]:
    """Preconditioned measurement gradients ``{layer: [Q_b, G, out, in]}`` per query batch (one if aggregated).

    With ``group`` (several ranks) rank ``r`` computes every ``world``-th batch and the batches are then
    broadcast, so each query gradient is computed once and every rank holds them all.
    """
    if engine.specs is None:
        engine.probes_for("measurement", _first_batch(query_data, batch_size, engine.device, "query_data"))
    _check_layers(factors, engine)  # once: the layers do not change between batches (discovery checks that)
    on_device = _factors_on(factors, engine)
    grad_dtype = precision.compute(precision.per_sample_gradient_dtype, engine.dtype)
    precondition_dtype = precision.compute(precision.precondition_dtype, engine.dtype)

    def precondition(layer, layer_factors, grads):
        estimator = factors.estimator_for(layer)
        result = estimator.precondition(layer_factors, grads.to(precondition_dtype), damping)
        return _shaped(result, grads.shape, f"({estimator.name}) precondition", layer)

    def step(params, buffers, batch, probes, layer_factors):
        loss, stats = _gradient_stats(engine, "measurement", params, buffers, batch, probes)
        grads = {layer: per_example_grads(_cast_stats(s, grad_dtype), engine.specs[layer].in_features)
                 for layer, s in stats.items()}
        if aggregate:
            summed = {layer: g.sum(0, keepdim=True) for layer, g in grads.items()}
            return (loss, finite.finite_flags(loss, grads)), summed
        preconditioned = {layer: precondition(layer, layer_factors[layer], g) for layer, g in grads.items()}
        return (loss, finite.finite_flags(loss, grads, preconditioned)), preconditioned

    run = _maybe_compile(step, engine.compile_option(compile))
    chunks: List[Dict[str, torch.Tensor]] = []
    bar = _progress(query_data, batch_size, "query gradients", progress, "query_data")
    started, examples = time.perf_counter(), 0
    for index, batch in enumerate(batches(query_data, batch_size, engine.device, "query_data")):
        if group is not None and group.owner(index) != group.rank:
            chunks.append(None)  # another rank's batch
            continue
        with _on_batch("query gradients", index):
            probes = engine.probes_for("measurement", batch)
            (loss, flags), grads = run(engine.params, engine.buffers, batch, probes, on_device)
        finite.raise_not_finite(flags, loss, "measurement", index, [engine.specs, engine.specs],
                                [finite.GRADIENTS, finite.PRECONDITIONED], "The query gradients")
        chunks.append(grads)
        examples += batch_examples(batch)
        bar.update(1)
    bar.close()
    log_phase("query gradients", examples, started, engine.device)
    if not chunks:
        raise InfluenceError("query_data is empty: there is no query to score.")
    if group is not None:
        chunks = parallel.share_batches(group, chunks, list(engine.specs), engine.device)
    if aggregate:
        summed = {layer: sum(c[layer] for c in chunks) for layer in chunks[0]}
        chunks = [{layer: precondition(layer, on_device[layer], g) for layer, g in summed.items()}]
        bad = {layer: g for layer, g in chunks[0].items() if not bool(finite.all_finite(g))}
        if bad:
            raise InfluenceError(f"The summed query gradients of layers {sorted(bad)}: {finite.PRECONDITIONED}")
    return chunks


def query_gradients(
    model: nn.Module,
    task: Task,
    factors: Factors,
    query_data: Data,
    *,
    damping: Optional[float] = None,
    batch_size: Optional[int] = None,
    compile: CompileOption = False,
    progress: bool = True,
    aggregate: bool = False,
    precision: Optional[Precision] = None,
    per_example_vmap: bool = False,
) -> Dict[str, torch.Tensor]:
    """Preconditioned measurement gradients ``P(grad f(query))``: ``{layer: [Q, G, out, in]}``.

    With ``aggregate=True`` the gradients are summed over all queries first: ``{layer: [1, G, out, in]}``.
    """
    _check_damping(damping)
    precision = precision or Precision()
    model, task = parallel.unwrap(model, task)
    engine = ModelTap(model, task, amp_dtype=precision.amp_dtype, per_example=per_example_vmap)
    chunks = _query_gradients(engine, factors, query_data, damping=damping, batch_size=batch_size, compile=compile,
                              progress=progress, precision=precision, aggregate=aggregate)
    return {layer: torch.cat([c[layer] for c in chunks]) for layer in chunks[0]}


def _compress(chunks: List[Dict[str, torch.Tensor]], rank, full_svd, precision: Precision, dtype) -> List[Dict[str, Query]]:
    """Each chunk's low-rank queries. The randomised SVD draws from PyTorch's generators seeded by (layer, first
    query of the chunk), so every cell, partition, resume and rank gets the same approximation of a query (drawn
    from the global state, the data partitions of one call differed by 13 % from an unpartitioned call)."""
    svd_dtype = precision.compute(precision.svd_dtype, dtype)
    score_dtype = precision.score_compute(dtype)
    randomised = rank is not None and not full_svd
    compressed, first = [], 0
    for chunk in chunks:
        queries = {}
        for layer, g in chunk.items():
            with (sampling.seeded_generators(zlib.crc32(layer.encode()), first, g.device) if randomised
                  else contextlib.nullcontext()):
                queries[layer] = low_rank(g, rank, full_svd, svd_dtype, score_dtype)
        compressed.append(queries)
        first += next(iter(chunk.values())).shape[0] if chunk else 0
    return compressed


def _group_queries(chunks: List[Dict[str, Query]], per_pass: Optional[int]) -> List[List[Dict[str, Query]]]:
    """Query batches grouped so that each group holds at most ``per_pass`` queries (None: one group)."""
    if per_pass is None:
        return [chunks]
    groups, current, count = [], [], 0
    for chunk in chunks:
        size = _rows(next(iter(chunk.values())))
        if current and count + size > per_pass:
            groups.append(current)
            current, count = [], 0
        current.append(chunk)
        count += size
    return groups + [current]


def _rows(query: Query) -> int:
    return (query[0] if isinstance(query, tuple) else query).shape[0]


def _pairwise_cell(engine: ModelTap, factors: Factors, query_data: Data, train_data: Data, *, damping, batch_size,
                   query_batch_size, compile, progress, precision, per_token, rank, full_svd, aggregate_queries,
                   aggregate_train, queries_per_pass, label, chunks=None, conv_tokens=True,
                   tokens=None) -> Dict[str, torch.Tensor]:
    """Per-layer scores of every query against ``train_data``: ``{layer: [Q, N]}`` (or ``[Q, N, T]`` / ``[Q, 1]``).

    ``tokens``: with ``per_token``, the token count T of the whole model (:func:`_token_count`), which a module
    partition without any layer with tokens must spread its scores over as well.

    ``chunks``: the query gradients of :func:`_query_gradients`, when already computed."""
    if chunks is None:
        chunks = _query_gradients(engine, factors, query_data, damping=damping, batch_size=query_batch_size,
                                  compile=compile, progress=progress, precision=precision, aggregate=aggregate_queries)
    queries = _compress(chunks, rank, full_svd, precision, engine.dtype)
    score_dtype = precision.score_compute(engine.dtype)
    specs = engine.specs

    def step(params, buffers, batch, probes, group):
        loss, stats = _gradient_stats(engine, "train", params, buffers, batch, probes)
        stats = {layer: _cast_stats(s, score_dtype) for layer, s in stats.items()}
        columns = {}
        for layer, s in stats.items():
            if aggregate_train:
                columns[layer] = torch.cat([summed_train_scores(q[layer], s) for q in group])[:, None]
            else:
                with_tokens = per_token and _has_tokens(specs[layer], conv_tokens)
                block = torch.cat([pairwise_layer_scores(q[layer], s, with_tokens, specs[layer].calls)
                                   for q in group], dim=0)
                columns[layer] = block if with_tokens or not per_token else block[..., None]
        return (loss, finite.finite_flags(loss, stats, columns)), columns

    run = _maybe_compile(step, engine.compile_option(compile))
    results: Dict[str, List[torch.Tensor]] = {}
    for group in _group_queries(queries, queries_per_pass):
        columns: Dict[str, List[torch.Tensor]] = {layer: [] for layer in specs}
        bar = _progress(train_data, batch_size, label, progress, "train_data")
        started, examples = time.perf_counter(), 0
        for index, batch in enumerate(batches(train_data, batch_size, engine.device, "train_data")):
            with _on_batch(label, index):
                probes = engine.probes_for("train", batch)
                (loss, flags), block = run(engine.params, engine.buffers, batch, probes, group)
            finite.raise_not_finite(flags, loss, "train", index, [specs, specs], [finite.GRADIENTS, finite.SCORES],
                                    "The training gradients")
            for layer, value in block.items():
                columns[layer].append(value)
            examples += batch_examples(batch)
            bar.update(1)
        bar.close()
        log_phase(label, examples, started, engine.device)
        for layer, blocks in columns.items():
            if not blocks:
                continue
            joined = sum(blocks) if aggregate_train else torch.cat(blocks, dim=1)
            results.setdefault(layer, []).append(joined)
    if not results:
        rows = sum(_rows(next(iter(c.values()))) for c in queries)
        shape = (rows, 1) if aggregate_train else (rows, 0, tokens) if per_token else (rows, 0)
        return {layer: torch.zeros(shape, dtype=score_dtype, device=engine.device) for layer in specs}
    per_layer = {layer: torch.cat(blocks, dim=0) for layer, blocks in results.items()}
    if per_token:
        per_layer = _align_tokens(per_layer, tokens)
    return per_layer


CONV_OPS = ("conv1d", "conv2d")


def _has_tokens(spec: LayerSpec, conv_tokens: bool) -> bool:
    """Whether a layer's per-token scores keep its tokens: a conv layer's output positions count as tokens
    only with ``conv_tokens`` (else, as in Kronfluence, its scores are summed over them)."""
    return conv_tokens or spec.op not in CONV_OPS


def _token_count_error(lengths) -> InfluenceError:
    return InfluenceError(
        f"Per-token scores need one token count across layers, but the tracked layers have {sorted(lengths)} "
        "tokens (or output positions) per example. Track layers that share a sequence length, or pass "
        "conv_tokens=False (conv layers then give one score per example, summed over their positions, as in "
        "Kronfluence), or use per_module=True with per_token=False."
    )


def _token_count(engine: ModelTap, train_data: Data, batch_size, conv_tokens: bool) -> int:
    """The one token count T of per-token scores (1 when no layer has tokens), or an error naming the counts."""
    first = _first_batch(train_data, batch_size, engine.device, "train_data")
    lengths = {length for layer, length in engine.tokens_per_call("train", first).items()
               if length != 1 and _has_tokens(engine.specs[layer], conv_tokens)}
    if len(lengths) > 1:
        raise _token_count_error(lengths)
    return lengths.pop() if lengths else 1


def _align_tokens(per_layer: Dict[str, torch.Tensor], tokens: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Layers without a token dimension (T = 1) spread their scores evenly over the ``tokens`` of the model
    (by default, those of the other layers here)."""
    lengths = {v.shape[-1] for v in per_layer.values() if v.shape[-1] != 1} | ({tokens} - {None, 1})
    if len(lengths) > 1:
        raise _token_count_error(lengths)
    if not lengths:
        return per_layer
    tokens = lengths.pop()
    return {layer: spread_to_tokens(v[..., 0], tokens) if v.shape[-1] == 1 else v for layer, v in per_layer.items()}


def pairwise_scores(
    model: nn.Module,
    task: Task,
    factors: Factors,
    query_data: Data,
    train_data: Data,
    *,
    damping: Optional[float] = None,
    batch_size: Optional[int] = None,
    query_batch_size: Optional[int] = None,
    per_module: bool = False,
    compile: CompileOption = False,
    progress: bool = True,
    per_token: bool = False,
    conv_tokens: bool = True,
    query_rank: Optional[int] = None,
    full_svd: bool = False,
    aggregate_queries: bool = False,
    aggregate_train: bool = False,
    queries_per_pass: Optional[int] = None,
    store: Optional[Union[str, Path]] = None,
    overwrite: bool = False,
    data_partitions: int = 1,
    module_partitions: int = 1,
    target_data_partitions: Targets = None,
    target_module_partitions: Targets = None,
    precision: Optional[Precision] = None,
    per_example_vmap: bool = False,
    distributed: Optional[bool] = None,
) -> Optional[Union[torch.Tensor, Dict[str, torch.Tensor]]]:
    """Influence of every training example on every query: a ``[Q, N]`` tensor (per layer if ``per_module``).

    ``score[q, n] = sum_layers <P(grad f(query_q)), grad L(train_n)>`` where ``P`` is the damped inverse
    curvature of ``factors`` (damping ``None`` = 0.1 x mean eigenvalue per layer). The queries are
    preconditioned once, in batches of ``query_batch_size`` (default ``batch_size``), and kept; then one
    pass over the training data scores them all (``queries_per_pass`` splits them into groups of at most that
    many per pass over the training data, bounding the per-batch score tensors; every query is still
    preconditioned and kept for the whole call).

    Options: ``per_token`` gives ``[Q, N, T]`` (layers without tokens spread evenly over them; a conv layer's
    tokens are its output positions, or with ``conv_tokens=False`` it counts as a layer without tokens, its scores
    summed over positions, which is what Kronfluence's per-token scores do, so that a CNN whose conv layers see
    different numbers of positions gets ``[Q, N, 1]``);
    ``query_rank`` keeps a rank-r SVD of each preconditioned query gradient (``full_svd`` for an exact
    SVD instead of the randomised one); ``aggregate_queries`` / ``aggregate_train`` sum the gradients of
    all queries / all training examples (``[1, N]`` / ``[Q, 1]``). ``store``, partitions, targets and
    ``distributed`` work as in :func:`fit_factors`; the result is None while cells are missing. Under
    ``torchrun`` each rank scores its share of the training data and, with a store, writes its own chunks.
    """
    _check_damping(damping)
    precision = precision or Precision()
    for value, name in ((query_rank, "query_rank"), (batch_size, "batch_size"), (query_batch_size, "query_batch_size"),
                        (queries_per_pass, "queries_per_pass")):
        arguments.check_positive(value, name)
    if per_token and aggregate_train:
        raise InfluenceError("per_token scores need per-example training gradients; drop aggregate_train.")
    if per_token and postprocess.post_process_of(task) is not None:
        raise InfluenceError(
            "per_token scores are not defined with post_process_per_sample_gradient: a post-processed gradient "
            "has no tokens. Drop per_token, or set enable_post_process_per_sample_gradient = False."
        )
    model, task = parallel.unwrap(model, task)
    group = parallel.ranks(distributed)
    progress = progress and (group is None or group.leader)  # one set of progress bars, rank 0's
    if group is not None:
        parallel.check_data(train_data, "train_data")
        parallel.check_data(query_data, "query_data")
        data_partitions = parallel.enough_partitions(data_partitions, module_partitions, group)
    options = dict(damping=damping, batch_size=batch_size, query_batch_size=query_batch_size or batch_size,
                   compile=compile, progress=progress, precision=precision, per_token=per_token,
                   conv_tokens=conv_tokens, tokens=None, rank=query_rank,
                   full_svd=full_svd, aggregate_queries=aggregate_queries, aggregate_train=aggregate_train,
                   queries_per_pass=queries_per_pass)
    if store is not None and not overwrite and group is None:
        reused = _reuse_scores("pairwise", store, model, factors, train_data, query_data, data_partitions,
                               module_partitions, per_module, options)
        if reused is not None:
            return reused
    engine = _discover(model, task, train_data, batch_size, "train", precision.amp_dtype, "train_data",
                       per_example_vmap)
    specs = dict(engine.specs)
    if per_token:  # the model's token count, which layers without tokens are spread over
        options["tokens"] = _token_count(engine, train_data, batch_size, conv_tokens)
    if store is None and data_partitions == 1 and module_partitions == 1:
        if target_data_partitions is not None or target_module_partitions is not None:
            raise InfluenceError("target partitions need a store to keep the other cells: pass store=...")
        _check_layers(factors, engine)
        per_layer = _pairwise_cell(engine, factors, query_data, train_data, label="pairwise scores", **options)
        return precision.scores_out(per_layer if per_module else total(per_layer), engine.dtype)
    computed_queries: Dict[int, List[Dict[str, torch.Tensor]]] = {}
    query_seen: List[fingerprint.DataDigest] = []

    def queries_for(cell_engine: ModelTap) -> List[Dict[str, torch.Tensor]]:
        """The query gradients of a module partition's layers: computed once, not once per cell (and shared
        between the ranks, each computing its share of the query batches)."""
        if id(cell_engine) not in computed_queries:
            with fingerprint.recording() as seen:
                computed_queries[id(cell_engine)] = _query_gradients(
                    cell_engine, factors, query_data, damping=damping, batch_size=options["query_batch_size"],
                    compile=compile, progress=progress, precision=precision, aggregate=aggregate_queries, group=group)
            if group is None:  # under torchrun each rank reads only its share of the queries
                query_seen[:] = [seen]
        return computed_queries[id(cell_engine)]
    return _partitioned_scores(
        "pairwise", model, task, factors, engine, specs, train_data, query_data, store, overwrite, data_partitions,
        module_partitions, target_data_partitions, target_module_partitions, per_module, options,
        lambda cell_engine, cell_data, label: _pairwise_cell(cell_engine, factors, query_data, cell_data, label=label,
                                                             chunks=queries_for(cell_engine), **options),
        group, queries_for, lambda: query_seen[0] if query_seen else None,
    )


def _self_cell(engine: ModelTap, factors: Factors, data: Data, *, damping, batch_size, compile, progress,
               precision: Precision, use_measurement: bool, label: str) -> Dict[str, torch.Tensor]:
    if engine.specs is None:
        engine.probes_for("train", _first_batch(data, batch_size, engine.device, "data"))
    _check_layers(factors, engine)  # once: the layers do not change between batches (discovery checks that)
    on_device = _factors_on(factors, engine)
    grad_dtype = precision.compute(precision.per_sample_gradient_dtype, engine.dtype)
    precondition_dtype = precision.compute(precision.precondition_dtype, engine.dtype)
    score_dtype = precision.score_compute(engine.dtype)

    def step(params, buffers, batch, probes, measurement_probes, layer_factors):
        loss, stats = _gradient_stats(engine, "train", params, buffers, batch, probes)
        stats = {layer: _cast_stats(s, grad_dtype) for layer, s in stats.items()}
        if not use_measurement:
            scores = {layer: _shaped(factors.estimator_for(layer).self_score(
                          layer_factors[layer], _cast_stats(s, precondition_dtype), damping),
                          (batch_examples(batch),), f"({factors.estimator_for(layer).name}) self_score", layer
                          ).to(score_dtype)
                      for layer, s in stats.items()}
            return (loss, None, finite.finite_flags(loss, stats, scores)), scores
        measured, measured_stats = _gradient_stats(engine, "measurement", params, buffers, batch, measurement_probes)
        scores = {}
        for layer, s in stats.items():
            grads = per_example_grads(_cast_stats(measured_stats[layer], grad_dtype),
                                      engine.specs[layer].in_features).to(precondition_dtype)
            estimator = factors.estimator_for(layer)
            preconditioned = _shaped(estimator.precondition(layer_factors[layer], grads, damping), grads.shape,
                                     f"({estimator.name}) precondition", layer).to(score_dtype)
            scores[layer] = example_grad_dot(preconditioned, _cast_stats(s, score_dtype))
        return (loss, measured, finite.finite_flags(loss, stats, measured_stats, scores)), scores

    run = _maybe_compile(step, engine.compile_option(compile), batched=(2, 3, 4))
    blocks: Dict[str, List[torch.Tensor]] = {layer: [] for layer in engine.specs}
    bar = _progress(data, batch_size, label, progress, "data")
    started, examples = time.perf_counter(), 0
    for index, batch in enumerate(batches(data, batch_size, engine.device)):
        with _on_batch(label, index):
            probes = engine.probes_for("train", batch)
            measurement_probes = engine.probes_for("measurement", batch) if use_measurement else None
            (loss, measured, flags), scores = run(engine.params, engine.buffers, batch, probes,
                                                         measurement_probes, on_device)
        if measured is not None:
            check_finite(measured, "measurement", index)
        stages = [engine.specs] * (3 if measured is not None else 2)
        messages = [finite.GRADIENTS] * (len(stages) - 1) + [finite.PRECONDITIONED]
        finite.raise_not_finite(flags, loss, "train", index, stages, messages, "The self-influence")
        for layer, block in scores.items():
            blocks[layer].append(block)
        examples += batch_examples(batch)
        bar.update(1)
    bar.close()
    log_phase(label, examples, started, engine.device)
    return {layer: torch.cat(b) if b else torch.zeros(0, dtype=score_dtype, device=engine.device)
            for layer, b in blocks.items()}


def self_scores(
    model: nn.Module,
    task: Task,
    factors: Factors,
    data: Data,
    *,
    damping: Optional[float] = None,
    use_measurement: bool = False,
    batch_size: Optional[int] = None,
    per_module: bool = False,
    compile: CompileOption = False,
    progress: bool = True,
    store: Optional[Union[str, Path]] = None,
    overwrite: bool = False,
    data_partitions: int = 1,
    module_partitions: int = 1,
    target_data_partitions: Targets = None,
    target_module_partitions: Targets = None,
    precision: Optional[Precision] = None,
    per_example_vmap: bool = False,
    distributed: Optional[bool] = None,
) -> Optional[Union[torch.Tensor, Dict[str, torch.Tensor]]]:
    """Self-influence ``<P(grad L(z_n)), grad L(z_n)>`` of every example: a ``[N]`` tensor.

    With ``use_measurement=True`` the preconditioned side is the measurement's gradient:
    ``<P(grad f(z_n)), grad L(z_n)>``. ``store``, partitions, targets and ``distributed`` work as in
    :func:`fit_factors` and :func:`pairwise_scores`.
    """
    _check_damping(damping)
    arguments.check_positive(batch_size, "batch_size")
    precision = precision or Precision()
    model, task = parallel.unwrap(model, task)
    group = parallel.ranks(distributed)
    progress = progress and (group is None or group.leader)  # one set of progress bars, rank 0's
    if group is not None:
        parallel.check_data(data, "data")
        data_partitions = parallel.enough_partitions(data_partitions, module_partitions, group)
    options = dict(damping=damping, batch_size=batch_size, compile=compile, progress=progress, precision=precision,
                   use_measurement=use_measurement)
    if store is not None and not overwrite and group is None:
        reused = _reuse_scores("self", store, model, factors, data, None, data_partitions, module_partitions,
                               per_module, options)
        if reused is not None:
            return reused
    engine = _discover(model, task, data, batch_size, "train", precision.amp_dtype, per_example=per_example_vmap)
    specs = dict(engine.specs)
    if store is None and data_partitions == 1 and module_partitions == 1:
        if target_data_partitions is not None or target_module_partitions is not None:
            raise InfluenceError("target partitions need a store to keep the other cells: pass store=...")
        _check_layers(factors, engine)
        per_layer = _self_cell(engine, factors, data, label="self scores", **options)
        return precision.scores_out(per_layer if per_module else total(per_layer), engine.dtype)
    return _partitioned_scores(
        "self", model, task, factors, engine, specs, data, None, store, overwrite, data_partitions, module_partitions,
        target_data_partitions, target_module_partitions, per_module, options,
        lambda cell_engine, cell_data, label: _self_cell(cell_engine, factors, cell_data, label=label, **options),
        group,
    )


def _partitioned_scores(kind, model, task, factors, engine, specs, train_data, query_data, store, overwrite,
                        data_partitions, module_partitions, target_data_partitions, target_module_partitions,
                        per_module, options, compute_cell, group=None, prepare=None, query_digest=None):
    """Scores cell by cell (data x module partitions), in memory or through a store; with ``group`` (several
    ranks) each rank computes every ``world``-th cell, after every rank has run ``prepare`` (work shared by all
    ranks, such as the query gradients) on each module partition's engine."""
    _check_layers(factors, engine)
    examples = _length(train_data, "train_data" if kind == "pairwise" else "data")
    ranges = parts.data_ranges(examples, data_partitions)
    groups = parts.module_groups(list(specs), module_partitions)
    targets_d = parts.targets(target_data_partitions, len(ranges), "data partitions")
    targets_m = parts.targets(target_module_partitions, len(groups), "module partitions")
    amp_dtype = options["precision"].amp_dtype
    saved = None
    if store is not None:
        saved = parallel.open_in_turn(group, lambda fresh: scores_store.open_scores(
            Path(store), kind=kind, model=model, factors=factors, specs=specs, train_data=train_data,
            query_data=query_data, ranges=ranges, groups=groups, per_module=per_module,
            shape=_score_shape(kind, engine, query_data, train_data, options), arguments=_store_arguments(options),
            overwrite=fresh, dtype=options["precision"].score_output(engine.dtype),
        ), overwrite)
    elif sorted(targets_d) != list(range(len(ranges))) or sorted(targets_m) != list(range(len(groups))):
        raise InfluenceError("target partitions need a store to keep the other cells: pass store=...")
    cells: Dict[Tuple[int, int], Dict[str, torch.Tensor]] = {}
    work = [(m, d) for m in targets_m for d in targets_d]
    engines: Dict[int, ModelTap] = {}

    def engine_for(m: int) -> ModelTap:
        if m not in engines:
            engines[m] = engine if len(groups) == 1 else ModelTap(model, task, layers=groups[m], amp_dtype=amp_dtype,
                                                                  per_example=engine.per_example)
        return engines[m]

    if group is not None and prepare is not None:
        for m in targets_m:  # on every rank, in the same order: it holds collectives
            prepare(engine_for(m))
    for m, d in (work if group is None else group.mine(work)):
        cell = parts.cell_name(kind, d, m)
        if saved is not None and saved.cell_done(cell):
            continue
        with fingerprint.recording() as seen:  # the content of the cell's training data, hashed as it is read
            per_layer = compute_cell(engine_for(m), _subset(train_data, ranges[d]), f"{kind} scores [{cell}]")
        if saved is not None:
            saved.write_cell(d, m, per_layer, cell, seen, query_digest() if query_digest is not None else None)
        else:
            cells[(d, m)] = per_layer
    if group is not None and saved is None:
        shared = parallel.share_cells(group, work, groups, {(m, d): v for (d, m), v in cells.items()}, engine.device)
        cells = {(d, m): v for (m, d), v in shared.items()}
    if saved is not None:
        if group is not None:
            group.barrier()  # every rank's chunks and markers are written
        if not saved.all_cells_done():
            logger.info("%s: cells %s are missing; rerun to complete the scores.", store, saved.missing_cells())
            return None
        if group is None or group.leader:
            result = saved.aggregate()
        if group is not None:
            group.barrier()  # rank 0 has written the final arrays
            if not group.leader:
                result = scores_store.read_scores(Path(store))
        out = options["precision"].scores_out
        if per_module:
            return out({layer: result[layer] for layer in specs}, engine.dtype)
        return out(result["all_modules"], engine.dtype)
    aggregate_train = options.get("aggregate_train", False)
    per_layer = {}
    for layer in specs:
        m = next(i for i, g in enumerate(groups) if layer in g)
        blocks = [cells[(d, m)][layer] for d in range(len(ranges))]
        if kind == "pairwise":
            per_layer[layer] = sum(blocks) if aggregate_train else torch.cat(blocks, dim=1)
        else:
            per_layer[layer] = torch.cat(blocks)
    return options["precision"].scores_out(per_layer if per_module else total(per_layer), engine.dtype)


def _store_arguments(options: Dict[str, Any]) -> Dict[str, Any]:
    """The scoring options a store records (those that change the scores)."""
    return {k: v for k, v in options.items() if k not in ("batch_size", "query_batch_size", "compile", "progress",
                                                          "queries_per_pass", "precision", "tokens")} \
        | {"precision": options["precision"].as_dict()}


def _reuse_scores(kind, store, model, factors, train_data, query_data, data_partitions, module_partitions, per_module,
                  options):
    """The result of a complete store made by the same call, found without reading any data; else None."""
    try:
        ranges = parts.data_ranges(_length(train_data, "train_data"), data_partitions)
        shape = _score_shape(kind, None, query_data, train_data, {**options, "per_token": False})
    except InfluenceError:
        return None
    if options.get("per_token") and kind == "pairwise":
        shape = shape + (None,)
    result = scores_store.reuse_complete(
        Path(store), kind=kind, model=model, factors=factors, train_data=train_data, query_data=query_data,
        ranges=ranges, module_partitions=module_partitions, per_module=per_module, shape=shape,
        arguments=_store_arguments(options), dtype=None)
    if result is None:
        return None
    return {layer: value for layer, value in result.items() if layer != "all_modules"} if per_module \
        else result["all_modules"]


def _score_shape(kind, engine, query_data, train_data, options) -> Tuple[int, ...]:
    """The shape of the full score array, known before any cell is computed."""
    examples = _length(train_data, "train_data" if kind == "pairwise" else "data")
    if kind == "self":
        return (examples,)
    queries = 1 if options["aggregate_queries"] else _length(query_data, "query_data")
    if options["aggregate_train"]:
        return (queries, 1)
    if options["per_token"]:
        return (queries, examples, options["tokens"])
    return (queries, examples)
