"""Scoring: pairwise and self-influence scores, cell by cell, through the place the cells go.

A score kind (:class:`~.options.PairwiseKind`, :class:`~.options.SelfKind`) says what a cell computes and
how its blocks join; :func:`score` runs the cells of any kind: in one pass when there is one cell and no store,
else cell by cell through :func:`fninfluence.run.cells.score_cells`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from . import ranks as parallel
from . import finite
from .. import partitions as parts
from ..capture import ModelTap, batch_examples, check_finite
from .data import Data
from ..errors import InfluenceError
from ..factors import Factors
from ..core.scores import (ModuleScores, example_grad_dot, example_gradients, pairwise_layer_scores,
                           summed_train_scores, total)
from ..core.statistics import LayerStatistic, in_dtype, of_stats
from ..store import fingerprint, scores_store
from . import cells as places
from ..core.algebra import cast as cast_stats
from .discovery import check_layers, check_sharded_layout, discover, factors_on, statistic_values
from .estimator_calls import preconditioned, shaped
from .loop import BatchStep, PassSettings, run_pass
from .options import Execution, Layout, PairwiseKind, SelfKind
from .queries import compress, query_gradients, query_blocks, rows
from .slices import length, subset
from .tokens import align_tokens, has_tokens

PerLayer = Dict[str, torch.Tensor]
Kind = Union[PairwiseKind, SelfKind]


@dataclass
class ScoreCall:
    """One scoring call: the model and task, the factors, the data, and the parsed options."""

    model: Any
    task: Any
    factors: Factors
    train_data: Data
    query_data: Optional[Data]
    kind: Kind
    execution: Execution
    layout: Layout
    per_module: bool


def score(call: ScoreCall) -> Optional[Union[torch.Tensor, PerLayer]]:
    """Scores of any kind: ``[Q, N]`` / ``[N]`` (per layer if ``per_module``), or None while cells are missing."""
    ranks, precision = call.execution.ranks, call.execution.precision
    if ranks is not None:
        parallel.check_data(call.train_data, call.kind.train_argument)
        if call.query_data is not None:
            parallel.check_data(call.query_data, "query_data")
    if call.layout.store is not None and not call.layout.overwrite and ranks is None:
        reused = _reuse(call)
        if reused is not None:
            return reused
    tap = discover(call.model, call.task, call.train_data, call.execution.batch_size, "train", precision.amp_dtype,
                   call.kind.train_argument, call.execution.per_example_vmap)
    check_sharded_layout(tap, call.layout, ranks)
    call = replace(call, layout=call.layout.with_ranks(ranks, tap.sharded))
    call = replace(call, kind=call.kind.seen(tap, call.train_data, call.execution.batch_size))
    check_layers(call.factors, tap)
    if call.layout.single_cell:
        if call.layout.targeted:
            raise InfluenceError("target partitions need a store to keep the other cells: pass store=...")
        per_layer = ScoreCell(call, tap).compute(call.train_data, f"{call.kind.name} scores")
        return _output(call, tap, places.Scores(per_layer))
    return _output(call, tap, _cells(call, tap))


def _output(call: ScoreCall, tap: ModelTap, result: Optional[places.Scores]):
    """The scores as returned: per layer or summed over layers (a store's own sum where it has one), in the dtype
    asked for; None while cells are missing."""
    if result is None:
        return None
    if call.per_module:
        scores = ModuleScores((layer, result.per_layer[layer]) for layer in tap.specs)
    else:
        scores = total(result.per_layer) if result.summed is None else result.summed
    return call.execution.precision.scores_out(scores, tap.dtype)


def _cells(call: ScoreCall, tap: ModelTap) -> Optional[places.Scores]:
    """Scores cell by cell (data x module partitions) through the place the cells go."""
    ranges = parts.data_ranges(length(call.train_data, call.kind.train_argument), call.layout.data_partitions)
    partition_layers = parts.module_groups(list(tap.specs), call.layout.module_partitions)
    data_indices, module_indices = call.layout.cells(len(ranges), len(partition_layers))
    work = [parts.Cell(call.kind.name, d, m) for m in module_indices for d in data_indices]
    place = places.score_cells(_store_opener(call, tap, ranges, partition_layers), call.layout.overwrite,
                               call.execution.ranks, tap.device, call.kind.join, work, partition_layers)
    taps = {m: tap if len(partition_layers) == 1 else tap.restricted(partition_layers[m]) for m in module_indices}
    scorers = {m: ScoreCell(call, taps[m]) for m in module_indices}
    if call.execution.ranks is not None:
        for m in module_indices:  # on every rank, in the same order: the shared query gradients hold collectives
            scorers[m].prepare()
    for cell in place.todo(work):
        with fingerprint.recording() as seen:  # the content of the cell's training data, hashed as it is read
            per_layer = scorers[cell.module_partition].compute(subset(call.train_data, ranges[cell.data_partition]),
                                                               f"{call.kind.name} scores [{cell.name}]")
        place.keep(cell, per_layer, seen, scorers[cell.module_partition].query_digest)
    return place.result()


def _store_opener(call: ScoreCall, tap: ModelTap, ranges, partition_layers):
    if call.layout.store is None:
        return None
    precision = call.execution.precision
    return lambda fresh: scores_store.open_scores(
        call.layout.store, kind=call.kind.name, model=call.model, factors=call.factors, specs=dict(tap.specs),
        train_data=call.train_data, query_data=call.query_data, ranges=ranges, groups=partition_layers,
        per_module=call.per_module, shape=score_shape(call), arguments=call.kind.recorded(precision),
        overwrite=fresh, dtype=precision.score_output(tap.dtype))


def _reuse(call: ScoreCall) -> Optional[Union[torch.Tensor, PerLayer]]:
    """The result of a complete store made by the same call, found without reading any data; else None."""
    kind = call.kind
    try:
        ranges = parts.data_ranges(length(call.train_data, "train_data"), call.layout.data_partitions)
        shape = kind.shape(*_sizes(call), known=False)
    except InfluenceError:
        return None
    result = scores_store.reuse_complete(
        call.layout.store, kind=kind.name, model=call.model, factors=call.factors, train_data=call.train_data,
        query_data=call.query_data, ranges=ranges, module_partitions=call.layout.module_partitions,
        per_module=call.per_module, shape=shape, arguments=kind.recorded(call.execution.precision), dtype=None)
    if result is None:
        return None
    if call.per_module:
        return ModuleScores((layer, value) for layer, value in result.items() if layer != "all_modules")
    return result["all_modules"]


def _sizes(call: ScoreCall) -> Tuple[int, Callable[[], int]]:
    """``(training examples, () -> queries)``: the query count is read only by kinds that need it."""
    return length(call.train_data, call.kind.train_argument), lambda: length(call.query_data, "query_data")


def score_shape(call: ScoreCall) -> Tuple[int, ...]:
    """The shape of the full score array, known before any cell is computed."""
    return call.kind.shape(*_sizes(call))


# -- pairwise ---------------------------------------------------------------------------------------

class PairwiseCell:
    """Scores of every query against a slice of the training data, for the layers of one tap. The query
    gradients are computed once per tap (module partition), when first needed, and kept for every cell."""

    def __init__(self, call: ScoreCall, tap: ModelTap):
        self.call, self.tap = call, tap
        self.queries: Optional[List[PerLayer]] = None
        self.query_digest: Optional[fingerprint.DataDigest] = None

    def prepare(self) -> None:
        """The preconditioned query gradients (shared between the ranks, each computing its share)."""
        if self.queries is not None:
            return
        call, kind = self.call, self.call.kind
        with fingerprint.recording() as seen:
            self.queries = query_gradients(self.tap, call.factors, call.query_data, kind.damping,
                                           kind.aggregate_queries, call.execution,
                                           kind.query_batch_size or call.execution.batch_size)
        if call.execution.ranks is None:  # under torchrun each rank reads only its share of the queries
            self.query_digest = seen

    def compute(self, train_data: Data, label: str) -> PerLayer:
        """``{layer: [Q, N]}`` (``[Q, N, T]`` per token, ``[Q, 1]`` with ``aggregate_train``) on ``train_data``."""
        self.prepare()
        kind, execution, tap = self.call.kind, self.call.execution, self.tap
        queries = compress(self.queries, kind.rank, kind.full_svd, execution.precision, tap.dtype)
        results: Dict[str, List[torch.Tensor]] = {}
        step = pairwise_step(tap, kind, execution.precision)
        query_passes = query_blocks(queries, kind.queries_per_pass)
        total_queries, first = sum(_block_rows(block) for block in query_passes), 0
        for queries_block in query_passes:
            count = _block_rows(queries_block)
            block_label = label if len(query_passes) == 1 else \
                f"{label} queries {first}-{first + count - 1} of {total_queries}"  # which pass of several this is
            first += count
            settings = PassSettings(block_label, execution.batch_size, execution.compile, execution.progress,
                                    "train_data")
            (columns, _), _ = run_pass(tap, train_data, step, ({layer: [] for layer in tap.specs}, queries_block),
                                       settings)
            for layer, blocks in columns.items():
                if blocks:
                    results.setdefault(layer, []).append(kind.join(blocks))
        if not results:
            count = sum(rows(next(iter(c.values()))) for c in queries)
            shape = (count, 1) if kind.aggregate_train else (count, 0, kind.tokens) if kind.per_token else (count, 0)
            dtype = execution.precision.score_compute(tap.dtype)
            return {layer: torch.zeros(shape, dtype=dtype, device=tap.device) for layer in tap.specs}
        per_layer = {layer: torch.cat(blocks, dim=0) for layer, blocks in results.items()}
        return align_tokens(per_layer, kind.tokens) if kind.per_token else per_layer


def _block_rows(block) -> int:
    """The number of queries in a block of query batches."""
    return sum(rows(next(iter(chunk.values()))) for chunk in block)


def pairwise_step(tap: ModelTap, kind: PairwiseKind, precision) -> BatchStep:
    """Per training batch: the score columns of every query of a block of queries against the batch's examples.
    The carry is ``(columns so far, the block of queries)``."""
    score_dtype = precision.score_compute(tap.dtype)
    specs = tap.specs

    def columns_of(layer: str, stats, queries_block, tokens: int) -> torch.Tensor:
        if kind.aggregate_train:
            return torch.cat([summed_train_scores(q[layer], stats) for q in queries_block])[:, None]
        with_tokens = kind.per_token and has_tokens(specs[layer], kind.conv_tokens)
        block = torch.cat([pairwise_layer_scores(q[layer], stats, with_tokens, tokens) for q in queries_block], dim=0)
        return block if with_tokens or not kind.per_token else block[..., None]

    def statistic(layer: str, queries_block, tokens: int) -> LayerStatistic:
        """A layer's score columns: ``[Q, N]``, ``[Q, N, T]`` per token (``[Q, N, 1]`` for a layer without
        tokens), ``[Q, 1]`` against the batch's summed gradients. Linear in ``G_n``, so additive over calls."""
        queries = sum(rows(q[layer]) for q in queries_block)

        def zeros(examples: int, call_tokens: int):
            with_tokens = kind.per_token and has_tokens(specs[layer], kind.conv_tokens)
            shape = ((queries, 1) if kind.aggregate_train else (queries, examples, tokens) if with_tokens
                     else (queries, examples, 1) if kind.per_token else (queries, examples))
            return {"columns": torch.zeros(shape, dtype=score_dtype, device=tap.device)}

        return in_dtype(of_stats(lambda stats: {"columns": columns_of(layer, stats, queries_block, tokens)}, zeros,
                                 additive=True), score_dtype)

    def compute(params, buffers, batch, probes, queries_block):
        examples = batch_examples(batch)
        statistics = {layer: statistic(layer, queries_block, tap.call_tokens(layer, probes[0], examples))
                      for layer in specs}
        loss, values, flags = statistic_values(tap, "train", params, buffers, batch, probes[0], statistics)
        columns = {layer: value["columns"] for layer, value in values.items()}
        return (loss, finite.finite_flags(loss, flags, columns)), columns

    def check(checked, index):
        loss, flags = checked
        finite.raise_not_finite(flags, loss, "train", index, [specs, specs], [finite.GRADIENTS, finite.SCORES],
                                "The training gradients")

    def fold(carry, new_columns):
        columns, queries_block = carry
        for layer, value in new_columns.items():
            columns[layer].append(value)
        return columns, queries_block

    return BatchStep(compute=compute, objectives=("train",), fold=fold, check=check, inputs=lambda carry: carry[1])


# -- self-influence ---------------------------------------------------------------------------------

class SelfCell:
    """Self-influence of a slice of the data, for the layers of one tap."""

    query_digest = None  # self-influence reads no queries

    def __init__(self, call: ScoreCall, tap: ModelTap):
        self.call, self.tap = call, tap

    def prepare(self) -> None:
        pass

    def compute(self, data: Data, label: str) -> PerLayer:
        """``{layer: [N]}`` on ``data``."""
        execution, tap = self.call.execution, self.tap
        settings = PassSettings(label, execution.batch_size, execution.compile, execution.progress, "data")
        step = self_step(tap, self.call.factors, self.call.kind, execution.precision)
        blocks, _ = run_pass(tap, data, step, {layer: [] for layer in tap.specs}, settings)
        dtype = execution.precision.score_compute(tap.dtype)
        return {layer: torch.cat(b) if b else torch.zeros(0, dtype=dtype, device=tap.device)
                for layer, b in blocks.items()}


@dataclass(frozen=True)
class SelfStatistics:
    """The per-layer statistics of a self-influence pass, with the call's dtypes."""

    factors: Factors
    damping: Optional[float]
    grad_dtype: torch.dtype
    precondition_dtype: torch.dtype
    score_dtype: torch.dtype
    device: torch.device

    def zeros(self, examples: int, tokens: int = 1) -> Dict[str, torch.Tensor]:
        return {"scores": torch.zeros(examples, dtype=self.score_dtype, device=self.device)}

    def own(self, layer: str, layer_factors) -> LayerStatistic:
        """``<P(G_n), G_n>`` by the estimator's ``self_score``: quadratic in ``G_n``, so not additive over calls."""
        estimator = self.factors.estimator_for(layer)

        def scores(stats):
            value = estimator.self_score(layer_factors, cast_stats(stats, self.precondition_dtype), self.damping)
            examples = stats["g"].shape[0]
            return {"scores": shaped(value, (examples,), f"({estimator.name}) self_score", layer).to(self.score_dtype)}

        return in_dtype(of_stats(scores, self.zeros), self.grad_dtype)

    def measured(self, preconditioned_rows: torch.Tensor) -> LayerStatistic:
        """``<P(grad f_n), G_n>`` against the batch's own preconditioned measurement gradients (additive)."""
        def scores(stats):
            return {"scores": example_grad_dot(preconditioned_rows, cast_stats(stats, self.score_dtype))}

        return in_dtype(of_stats(scores, self.zeros, additive=True), self.grad_dtype)


def self_step(tap: ModelTap, factors: Factors, kind: SelfKind, precision) -> BatchStep:
    """Per batch: ``<P(grad), grad>`` of every example (the estimator's ``self_score``), or with
    ``use_measurement`` ``<P(grad f), grad L>``."""
    grad_dtype = precision.compute(precision.per_sample_gradient_dtype, tap.dtype)
    precondition_dtype = precision.compute(precision.precondition_dtype, tap.dtype)
    on_device = factors_on(factors, tap)
    statistics = SelfStatistics(factors, kind.damping, grad_dtype, precondition_dtype,
                                precision.score_compute(tap.dtype), tap.device)
    gradients = {layer: in_dtype(example_gradients(spec, grad_dtype, tap.device), grad_dtype)
                 for layer, spec in tap.specs.items()}

    def compute(params, buffers, batch, probes, layer_factors):
        if not kind.use_measurement:
            own = {layer: statistics.own(layer, layer_factors[layer]) for layer in tap.specs}
            loss, values, flags = statistic_values(tap, "train", params, buffers, batch, probes[0], own)
            scores = {layer: value["scores"] for layer, value in values.items()}
            return (loss, None, finite.finite_flags(loss, flags, scores)), scores
        measured, values, measured_flags = statistic_values(tap, "measurement", params, buffers, batch, probes[1],
                                                            gradients)
        rows = {layer: preconditioned(factors.estimator_for(layer), layer, layer_factors[layer],
                                      value["grads"].to(precondition_dtype), kind.damping).to(statistics.score_dtype)
                for layer, value in values.items()}
        against = {layer: statistics.measured(rows[layer]) for layer in tap.specs}
        loss, values, flags = statistic_values(tap, "train", params, buffers, batch, probes[0], against)
        scores = {layer: value["scores"] for layer, value in values.items()}
        return (loss, measured, finite.finite_flags(loss, flags, measured_flags, scores)), scores

    def check(checked, index):
        loss, measured, flags = checked
        if measured is not None:
            check_finite(measured, "measurement", index)
        stages = [tap.specs] * (3 if measured is not None else 2)
        messages = [finite.GRADIENTS] * (len(stages) - 1) + [finite.PRECONDITIONED]
        finite.raise_not_finite(flags, loss, "train", index, stages, messages, "The self-influence")

    def fold(blocks, scores):
        for layer, block in scores.items():
            blocks[layer].append(block)
        return blocks

    objectives = ("train", "measurement") if kind.use_measurement else ("train",)
    return BatchStep(compute=compute, objectives=objectives, fold=fold, check=check, inputs=lambda _: on_device)


_CELL_OF_KIND = {PairwiseKind: PairwiseCell, SelfKind: SelfCell}


def ScoreCell(call: ScoreCall, tap: ModelTap):
    """The cell computation of ``call``'s score kind."""
    return _CELL_OF_KIND[type(call.kind)](call, tap)
