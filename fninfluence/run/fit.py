"""Fitting: every pass of the layers' estimators over the data, cell by cell, into :class:`Factors`.

One call, from the user's ``Dataset`` to ``Factors``::

    discover the tap on the first batch            (run.discovery: layers, probe shapes, exactness check)
    resolve each layer's estimator, plan the passes (examples, data x module partitions per pass)
    pick where the cells go                         (run.cells: memory, store, ranks, ranks + store)
    for each pass (e.g. EKFAC: covariance, lambda):
        for each cell this process computes:        (run.loop: one pass over the cell's batches)
            state = sum over batches of update(state, layer stats, earlier factors)
        outputs = finalize(sum of the cells' states) per layer   (the place's reduction)
    Factors(outputs of every pass)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import torch

from . import arguments
from . import ranks as parallel
from . import finite
from .. import partitions as parts
from .. import sampling
from ..capture import ModelTap
from ..curvature import (CurvatureEstimator, check_parameter_layers, pass_declaration, pass_order,
                         resolve_strategies, strategy_label)
from .data import Data
from ..errors import InfluenceError
from ..factors import Factors, canonical_layout
from ..progress import log_phase
from ..store import factors_store, fingerprint
from . import cells as places
from ..core.statistics import in_dtype
from .discovery import check_sharded_layout, discover, statistic_values
from .estimator_calls import checked_contribution, pass_statistic
from .aside import set_aside
from .loop import BatchStep, PassSettings, run_pass
from .options import Execution, Layout, per_pass
from .slices import length, subset

States = Dict[str, Dict[str, torch.Tensor]]


class PassPlan(NamedTuple):
    """What one pass reads, known before any data is read: its examples (None: all, length unknown) and its
    data and module partition counts."""

    examples: Optional[int]
    data_partitions: int
    module_partitions: int


@dataclass(frozen=True)
class FitRequest:
    """What to fit: the strategy (one, or one per layer), which labels (sampled with ``seed`` for the true
    Fisher, ``fisher_samples`` draws per example whose statistics are averaged, or the data's own), which passes
    now, and on how many examples of each pass."""

    strategy: Any
    use_empirical_fisher: bool
    passes: Optional[Sequence[str]]
    max_examples: Any
    seed: int
    fisher_samples: int = 1

    def __post_init__(self):
        arguments.check_fisher_samples(self.fisher_samples, self.use_empirical_fisher)

    @property
    def objective(self) -> str:
        return "train" if self.use_empirical_fisher else "train_sampled"

    def recorded(self, execution: Execution) -> Dict[str, Any]:
        """The arguments a store records (those that change the factors). ``fisher_samples`` only when it is not
        1, so that stores fitted before it existed (one draw) are still found complete."""
        recorded = {"use_empirical_fisher": self.use_empirical_fisher, "precision": execution.precision.as_dict(),
                    "seed": None if self.use_empirical_fisher else int(self.seed)}
        if self.fisher_samples != 1:
            recorded["fisher_samples"] = int(self.fisher_samples)
        return recorded


@dataclass
class FitRun:
    """Everything one fit call's passes share once the tap is discovered."""

    request: FitRequest
    execution: Execution
    layout: Layout
    tap: ModelTap
    estimators: Dict[str, CurvatureEstimator]
    plan: Dict[str, PassPlan]
    data: Data
    total_examples: Optional[int]
    place: Any

    @property
    def label(self) -> str:
        return strategy_label(self.estimators)


def plan_passes(pass_names, total_examples, request: FitRequest, layout: Layout, ranks,
                sharded: bool = False) -> Dict[str, PassPlan]:
    """``{pass: PassPlan}``: each pass's examples and partitions (at least one data partition per rank; a
    multiple of the ranks for a model sharded by ``fully_shard``)."""
    plan = {}
    for name in pass_names:
        limit = per_pass(request.max_examples, name, None)
        examples = total_examples if limit is None or total_examples is None else min(limit, total_examples)
        module_parts = per_pass(layout.module_partitions, name, 1)
        data_parts = parallel.enough_partitions(per_pass(layout.data_partitions, name, 1), module_parts, ranks,
                                                sharded)
        parts.check_count(data_parts, "data partitions")
        parts.check_count(module_parts, "module partitions")
        plan[name] = PassPlan(examples, data_parts, module_parts)
    return plan


def fit(model, task, data: Data, request: FitRequest, execution: Execution, layout: Layout) -> Optional[Factors]:
    """:func:`fninfluence.fit_factors` on parsed arguments: the factors once every pass is complete, else None."""
    ranks = execution.ranks
    if ranks is not None:
        parallel.check_data(data, "data")
    if not request.use_empirical_fisher:
        task = sampling.SeededTask(task, request.seed)
    needs_length = layout.store or request.max_examples or layout.data_partitions != 1 or ranks
    total_examples = length(data, "data") if needs_length else None
    if layout.store is not None and not layout.overwrite and request.passes is None and ranks is None:
        reused = factors_store.reuse_complete(  # a complete store: no data is read, not even for discovery
            layout.store, model=model, task=task, data=data,
            resolve=lambda specs: resolve_strategies(request.strategy, specs),
            plan_for=lambda names: plan_passes(names, total_examples, request, layout, ranks),
            arguments=request.recorded(execution))
        if reused is not None:
            return Factors.from_stored(reused)
    tap = discover(model, task, data, execution.batch_size, request.objective, execution.precision.amp_dtype,
                   per_example=execution.per_example_vmap)
    check_sharded_layout(tap, layout, ranks)
    estimators = resolve_strategies(request.strategy, dict(tap.specs))
    check_parameter_layers(estimators, tap.specs)
    fitting = execution.precision.fitting(estimators, tap.dtype)  # their outputs in the dtypes asked for
    pass_names = pass_order(estimators)
    _check_passes(request, pass_names, strategy_label(estimators))
    plan = plan_passes(pass_names, total_examples, request, layout, ranks, tap.sharded)
    place = places.fit_cells(_store_opener(model, data, fitting, tap, plan, request, execution, layout),
                             layout.overwrite, ranks, tap.device)
    fit_run = FitRun(request, execution, layout, tap, fitting, plan, data, total_examples, place)
    return _fit_passes(fit_run, estimators)


def _check_passes(request: FitRequest, pass_names: List[str], label: str) -> None:
    unknown = [p for p in (request.passes or ()) if p not in pass_names]
    if unknown:
        raise InfluenceError(f"Unknown passes {unknown} for strategy {label!r}: it has {pass_names}.")


def _store_opener(model, data, fitting, tap: ModelTap, plan, request: FitRequest, execution: Execution,
                  layout: Layout):
    """``open(overwrite) -> FitStore`` for ``layout.store``, or None without a store."""
    if layout.store is None:
        return None
    state_dtypes = {name: execution.precision.fit_dtypes(pass_declaration(_layer_passes(fitting, name)), tap.dtype)[0]
                    for name in plan}
    return lambda fresh: factors_store.open_fit(
        layout.store, model=model, data=data, estimators=fitting, specs=dict(tap.specs), plan=plan,
        arguments=request.recorded(execution), state_dtypes=state_dtypes, overwrite=fresh)


def _fit_passes(fit_run: FitRun, estimators: Dict[str, CurvatureEstimator]) -> Optional[Factors]:
    """Every pass in order: resumed from the store, skipped (not asked for), or fitted."""
    pass_names = pass_order(fit_run.estimators)
    wanted = pass_names if fit_run.request.passes is None else list(fit_run.request.passes)
    factors: States = {layer: {} for layer in fit_run.tap.specs}
    done, examples = [], 0
    for name in pass_names:
        resumed = fit_run.place.resume(name, factors)
        if resumed is not None:
            factors, done = resumed, done + [name]
            continue
        if name not in wanted:
            if any(p in wanted for p in pass_names[pass_names.index(name) + 1:]):
                raise InfluenceError(f"Pass {name!r} must be complete before the later passes {wanted}: run it "
                                     "first (with the same store).")
            continue
        # the earlier factors the pass does not read (EKFAC's A and S in the lambda pass) are held off the device
        # meanwhile, not beside its accumulators and the model's forward and backward pass
        factors, aside = set_aside(factors, _layer_passes(fit_run.estimators, name))
        try:
            fitted = _fit_pass(fit_run, name, factors)
            if fitted is None:
                return None  # cells are missing: another job (or a rerun) completes them
            outputs, examples = fitted
            del fitted  # not kept beyond the merge: the set-aside factors come back beside these only
            factors = {layer: {**factors[layer], **outputs.get(layer, {})} for layer in fit_run.tap.specs}
            del outputs
            factors = aside.restore(factors)
        finally:
            aside.close()
        done.append(name)
    complete = len(done) == len(pass_names)
    result = Factors(strategy=fit_run.label, estimator=next(iter(estimators.values())), layers=dict(fit_run.tap.specs),
                     tensors=factors, num_examples=fit_run.place.num_examples(examples),
                     use_empirical_fisher=fit_run.request.use_empirical_fisher, passes_done=tuple(done),
                     estimators=estimators)
    if complete:
        fit_run.place.finish()
    return result if complete or fit_run.request.passes is not None else None


def _fit_pass(fit_run: FitRun, name: str, factors: States):
    """``(outputs, examples)`` of pass ``name``: its cells computed (those of this process), reduced by the place
    and finalized; None while cells are missing."""
    fit_passes = _layer_passes(fit_run.estimators, name)
    plan = fit_run.plan[name]
    ranges = parts.data_ranges(plan.examples, plan.data_partitions) if plan.examples is not None else [None]
    partition_layers = parts.module_groups(list(fit_passes), plan.module_partitions)
    data_indices, module_indices = fit_run.layout.cells(len(ranges), len(partition_layers))
    pass_cells = places.PassCells(name, [parts.Cell(name, d, m) for m in module_indices for d in data_indices],
                                  len(ranges), partition_layers)
    started, examples = time.perf_counter(), 0
    pass_data = _pass_data(fit_run, plan)
    every_layer = len(partition_layers) == 1 and len(fit_passes) == len(fit_run.tap.specs)
    for cell in fit_run.place.todo(pass_cells.cells):
        tap = fit_run.tap if every_layer else fit_run.tap.restricted(partition_layers[cell.module_partition])
        examples_range = ranges[cell.data_partition]
        cell_data = pass_data if examples_range is None or len(ranges) == 1 else subset(pass_data, examples_range)
        with fingerprint.recording() as seen:  # the content of the cell's data, hashed as it is read
            states, count = _fit_cell(fit_run, tap, cell, fit_passes, cell_data, examples_range, factors)
        examples += count if cell.module_partition == 0 else 0  # each example once, not once per module partition
        fit_run.place.keep(cell, states, count, seen)
    examples = fit_run.place.examples(examples)  # this pass's, as the store's
    finalize_started = time.perf_counter()
    outputs = fit_run.place.reduce(pass_cells, fit_passes, factors)
    if outputs is None:
        return None
    outputs = {layer: canonical_layout(tensors) for layer, tensors in outputs.items()}
    finite.check_factors(outputs)  # before a store certifies them complete
    fit_run.place.keep_outputs(name, outputs)
    log_phase(f"{fit_run.label} {name} pass", examples, started, fit_run.tap.device, phase=name,
              seconds=finalize_started - started, finalize_seconds=time.perf_counter() - finalize_started)
    return outputs, examples


def _layer_passes(estimators: Dict[str, CurvatureEstimator], name: str) -> Dict[str, Any]:
    """``{layer: its estimator's pass called name}`` for the layers whose estimator has that pass."""
    return {layer: p for layer, e in estimators.items() for p in e.passes if p.name == name}


def _pass_data(fit_run: FitRun, plan: PassPlan) -> Data:
    if plan.examples is None or plan.examples == fit_run.total_examples:
        return fit_run.data
    return subset(fit_run.data, range(plan.examples))


def _fit_cell(fit_run: FitRun, tap: ModelTap, cell: parts.Cell, fit_passes, data: Data, examples: Optional[range],
              earlier: States):
    """``(states, examples)``: the sums over the cell's examples (``examples`` of the dataset; None: all) of the
    pass state of each of the tap's layers."""
    if examples is not None and len(examples) == 0 and not tap.sharded:  # a sharded model's ranks run together
        return {layer: fit_passes[layer].init(tap.specs[layer].shape, torch.float64, tap.device)
                for layer in tap.specs}, 0
    settings = PassSettings(
        label=f"{fit_run.label} {cell.kind} [{cell.name}]", batch_size=fit_run.execution.batch_size,
        compile=fit_run.execution.compile, progress=fit_run.execution.progress,
        first_example=examples.start if examples is not None else 0,
        seed=fit_run.request.seed if fit_run.request.objective == "train_sampled" else None, log=False)
    draws = fit_run.request.fisher_samples
    step = fit_step(tap, cell.kind, fit_passes, fit_run.request.objective, fit_run.execution.precision,
                    {layer: earlier.get(layer, {}) for layer in tap.specs}, draws)
    states, count = run_pass(tap, data, step, None, settings)
    return (states if draws == 1 else mean_over_draws(states, draws)), count


def mean_over_draws(states: States, draws: int) -> States:
    """The states of a pass that ran every example ``draws`` times (sums over those copies, their counts too)
    divided by ``draws``: sums over the examples of the mean over draws, as a single-draw state is. In place."""
    for state in states.values():
        for key, value in state.items():
            state[key] = value.div_(draws) if value.is_floating_point() else value.floor_divide_(draws)
    return states


def fit_step(tap: ModelTap, pass_name: str, fit_passes, objective: str, precision, earlier: States,
             draws: int = 1) -> BatchStep:
    """The per-batch step of a fit pass: ``state + update(stats of the batch)`` for every layer of the tap. With
    ``draws > 1`` (sampled labels only) the objective runs once per draw of the labels and the batch's parts are
    summed over the draws (:func:`mean_over_draws` divides the pass's states by ``draws`` at the end)."""
    declared = pass_declaration(fit_passes)
    state_dtype, compute_dtype = precision.fit_dtypes(declared, tap.dtype)
    raw = declared.reads_raw_statistics  # e.g. sums of a a^T and g g^T: no per-example gradient to post-process

    def compute(params, buffers, batch, probes, inputs):
        state, earlier = inputs
        statistics = {layer: in_dtype(pass_statistic(fit_passes[layer], s, earlier[layer], layer), compute_dtype)
                      for layer, s in state.items()}
        outcome = None
        for draw in range(draws):  # unrolled when compiled: each draw index is a constant of the one graph
            if draws > 1:
                sampling.set_draw(tap.task, draw)
            # eager: streamed layers add their batch's part into the state as it is formed, and return nothing
            drawn = statistic_values(tap, objective, params, buffers, batch, probes[0], statistics,
                                     post_processed=not raw, into=state)
            outcome = drawn if outcome is None else added_draws(outcome, drawn)
        if draws > 1:
            sampling.set_draw(tap.task, 0)
        loss, contributions, flags = outcome
        checked = (loss, finite.finite_flags(loss, flags))
        return checked, {layer: checked_contribution(fit_passes[layer], s, contributions[layer], layer)
                         for layer, s in state.items() if contributions[layer]}

    def check(checked, index):
        loss, flags = checked
        finite.raise_not_finite(flags, loss, objective, index, [tap.specs], [finite.STATISTICS],
                                f"The {pass_name} statistics")

    def init():
        return {layer: fit_passes[layer].init(spec.shape, state_dtype, tap.device) for layer, spec in tap.specs.items()}

    def fold(state, contributions):  # in place: the old state, the batch's part and a new state are never all held
        for layer, contribution in (contributions or {}).items():
            for key, value in contribution.items():
                state[layer][key].add_(value)
        return state

    return BatchStep(compute=compute, objectives=(objective,), fold=fold, check=check,
                     inputs=lambda state: (state, earlier), init=init)


def added_draws(first, second):
    """Two draws' ``(loss, contributions, flags)`` for one batch as one: the losses and each layer's contributions
    added, a layer's flag true if it is for both."""
    (loss, contributions, flags), (more_loss, more, more_flags) = first, second
    summed = {layer: {key: value + more[layer][key] for key, value in part.items()}
              for layer, part in contributions.items()}
    return loss + more_loss, summed, {layer: flag & more_flags[layer] for layer, flag in flags.items()}
