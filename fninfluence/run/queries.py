"""The query side of pairwise scores: preconditioned measurement gradients, their low-rank forms, and blocks of
queries scored per pass over the training data."""

from __future__ import annotations

import contextlib
import zlib
from typing import Dict, List, Optional

import torch

from . import ranks as parallel
from . import finite
from .. import sampling
from ..capture import ModelTap
from .data import Data
from ..errors import InfluenceError
from ..factors import Factors
from ..precision import Precision
from ..core.scores import Query, example_gradients, low_rank
from ..core.statistics import in_dtype
from .discovery import check_layers, factors_on, statistic_values
from .estimator_calls import preconditioned
from .loop import BatchStep, PassSettings, run_pass
from .options import Execution
from .slices import first_batch

PerLayer = Dict[str, torch.Tensor]


def query_gradients(tap: ModelTap, factors: Factors, query_data: Data, damping: Optional[float], aggregate: bool,
                    execution: Execution, batch_size: Optional[int]) -> List[PerLayer]:
    """Preconditioned measurement gradients ``{layer: [Q_b, G, out, in]}`` per query batch (one if aggregated).

    Under several ranks rank ``r`` computes every ``world``-th batch and the batches are then broadcast, so
    each query gradient is computed once and every rank holds them all.
    """
    if tap.specs is None:
        tap.discover("measurement", first_batch(query_data, batch_size, tap.device, "query_data"))
    check_layers(factors, tap)  # once: the layers do not change between batches (discovery checks that)
    ranks = None if tap.sharded else execution.ranks  # a sharded model's ranks run every pass together
    settings = PassSettings("query gradients", batch_size, execution.compile, execution.progress, "query_data",
                            owns=None if ranks is None else (lambda index: ranks.owner(index) == ranks.rank))
    on_device = factors_on(factors, tap)
    step = query_step(tap, factors, on_device, damping, aggregate, execution.precision)
    chunks, _ = run_pass(tap, query_data, step, [], settings)
    if not chunks:
        raise InfluenceError("query_data is empty: there is no query to score.")
    if ranks is not None:
        chunks = parallel.share_batches(ranks, chunks, list(tap.specs), tap.device)
    if aggregate:
        chunks = [_precondition_sum(tap, factors, on_device, chunks, damping, execution.precision)]
    return chunks


def query_step(tap: ModelTap, factors: Factors, on_device, damping, aggregate: bool, precision: Precision) -> BatchStep:
    """Per query batch: the measurement's per-example gradients, preconditioned with the factors ``on_device``
    (or summed, when aggregated: the sum is preconditioned once, after the last batch)."""
    grad_dtype = precision.compute(precision.per_sample_gradient_dtype, tap.dtype)
    precondition_dtype = precision.compute(precision.precondition_dtype, tap.dtype)

    statistics = {layer: in_dtype(example_gradients(spec, grad_dtype, tap.device), grad_dtype)
                  for layer, spec in tap.specs.items()}

    def compute(params, buffers, batch, probes, layer_factors):
        loss, values, flags = statistic_values(tap, "measurement", params, buffers, batch, probes[0], statistics)
        grads = {layer: value["grads"] for layer, value in values.items()}
        if aggregate:
            summed = {layer: g.sum(0, keepdim=True) for layer, g in grads.items()}
            return (loss, finite.finite_flags(loss, flags, grads)), summed
        result = {layer: preconditioned(factors.estimator_for(layer), layer, layer_factors[layer],
                                        g.to(precondition_dtype), damping)
                  for layer, g in grads.items()}
        return (loss, finite.finite_flags(loss, flags, grads, result)), result

    def check(checked, index):
        loss, flags = checked
        stages = [tap.specs] * (2 if aggregate else 3)
        finite.raise_not_finite(flags, loss, "measurement", index, stages,
                                [finite.GRADIENTS, finite.GRADIENTS, finite.PRECONDITIONED], "The query gradients")

    return BatchStep(compute=compute, objectives=("measurement",), fold=lambda chunks, grads: chunks + [grads],
                     check=check, inputs=lambda chunks: on_device)


def _precondition_sum(tap: ModelTap, factors: Factors, on_device, chunks: List[PerLayer], damping,
                      precision: Precision) -> PerLayer:
    """The summed query gradients of every batch, preconditioned once."""
    precondition_dtype = precision.compute(precision.precondition_dtype, tap.dtype)
    summed = {layer: sum(c[layer] for c in chunks) for layer in chunks[0]}
    result = {layer: preconditioned(factors.estimator_for(layer), layer, on_device[layer],
                                    g.to(precondition_dtype), damping)
              for layer, g in summed.items()}
    bad = {layer: g for layer, g in result.items() if not bool(finite.all_finite(g))}
    if bad:
        raise InfluenceError(f"The summed query gradients of layers {sorted(bad)}: {finite.PRECONDITIONED}")
    return result


def compress(chunks: List[PerLayer], rank: Optional[int], full_svd: bool, precision: Precision,
             dtype: torch.dtype) -> List[Dict[str, Query]]:
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


def rows(query: Query) -> int:
    """The number of queries held by a (possibly low-rank) query gradient."""
    return (query[0] if isinstance(query, tuple) else query).shape[0]


def query_blocks(chunks: List[Dict[str, Query]], per_pass: Optional[int]) -> List[List[Dict[str, Query]]]:
    """Query batches in blocks of at most ``per_pass`` queries, each scored in its own pass over the training
    data (None: one block)."""
    if per_pass is None:
        return [chunks]
    blocks, current, count = [], [], 0
    for chunk in chunks:
        size = rows(next(iter(chunk.values())))
        if current and count + size > per_pass:
            blocks.append(current)
            current, count = [], 0
        current.append(chunk)
        count += size
    return blocks + [current]
