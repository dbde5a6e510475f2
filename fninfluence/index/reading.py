"""Reading a training-gradient index back: blocks of stored rows, contracted with preconditioned queries.

Shared by :func:`fninfluence.index.index_scores` (every row) and :mod:`fninfluence.index.retrieval` (the rows of a
search's candidates).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import nn

from ..capture import ModelTap
from ..core.algebra import ExampleGrads, as_stats
from ..core.contract import contract
from ..errors import InfluenceError
from ..factors import Factors
from ..precision import Precision
from ..run.arguments import check_damping
from ..run.data import Data
from ..run.discovery import check_layers
from ..run.loop import CompileOption
from ..run.options import Execution
from ..run.queries import query_gradients
from ..run.slices import first_batch
from ..store.fingerprint import model_fingerprint
from ..store.index_store import IndexStore, load_index
from ..task import Task

# Bound on the intermediate a factored layer's block contraction forms (rows are split to stay under it).
CONTRACTION_BYTES = 256 << 20
# A factored layer is contracted query-first when queries x pairs is at most this (see _block_scores).
DIRECT_PRODUCTS = 96


def _block_scores(query: torch.Tensor, stats, budget: int = CONTRACTION_BYTES) -> torch.Tensor:
    """``[Q, n]`` scores of dense preconditioned queries ``[Q, G, out, in]`` against a block of stored rows.

    A dense block is one matrix product. A factored block (``K`` pairs per example) is contracted in row slices
    whose intermediate stays under ``budget`` bytes, in the faster order: for ``Q * K <= DIRECT_PRODUCTS`` the
    queries against the pairs' larger side first (``Q * K`` multiply-adds per gradient entry, in matrix products);
    otherwise the pairs multiplied out into the gradients, then one matrix product (``K + Q`` per entry, but
    forming the gradients is bound by memory traffic: measured on 2 CPU cores, it costs about as much as the
    direct order at ``Q * K`` of 60 to 130)."""
    stats = as_stats(stats)
    queries = query.shape[0]
    flat = query.reshape(queries, -1)
    if isinstance(stats, ExampleGrads):
        return flat @ stats.grads.reshape(stats.grads.shape[0], -1).T
    g, a = stats.g, stats.a  # [n, K, G, out], [n, K, G, in]
    n, width, groups, out = g.shape
    inp = a.shape[-1]
    item = query.element_size()
    if queries * width <= DIRECT_PRODUCTS:
        # [n, K, G, in] x [Q, G, out, in] -> [n, K, G, Q, out] (or over out first), then against the other side
        per_row = width * groups * queries * min(out, inp) * item
        step = max(1, budget // max(1, per_row))
        blocks = []
        for i in range(0, n, step):
            if inp >= out:
                x = contract("nkgi,qgoi->nkgqo", a[i:i + step], query)
                blocks.append(contract("nkgqo,nkgo->qn", x, g[i:i + step]))
            else:
                x = contract("nkgo,qgoi->nkgqi", g[i:i + step], query)
                blocks.append(contract("nkgqi,nkgi->qn", x, a[i:i + step]))
        return torch.cat(blocks, dim=1)
    per_row = groups * out * inp * item
    step = max(1, budget // max(1, per_row))
    return torch.cat([flat @ torch.einsum("nkgo,nkgi->ngoi", g[i:i + step], a[i:i + step]).reshape(-1, flat.shape[1]).T
                      for i in range(0, n, step)], dim=1)


def read_block(index: IndexStore, layer: str, rows, device, dtype):
    """Stats of ``rows`` of a layer, on ``device`` in ``dtype`` (a dense layer's as ``ExampleGrads``)."""
    stats = index.read_rows(layer, rows)
    if isinstance(stats, ExampleGrads):
        return ExampleGrads(stats.grads.to(device, dtype))
    return type(stats)(stats.a.to(device, dtype), stats.g.to(device, dtype))


def blocks_of(index: IndexStore, examples_per_read: int):
    """Row slices of about ``examples_per_read`` examples, made of whole chunks."""
    step = max(1, examples_per_read // index.chunk_rows) * index.chunk_rows
    return [slice(start, min(start + step, index.examples)) for start in range(0, index.examples, step)]


def prepared_queries(model: nn.Module, task: Task, factors: Factors, query_data: Data,
                     index: Union[str, Path, IndexStore], damping: Optional[float], batch_size: Optional[int],
                     compile: CompileOption, progress: bool, precision: Optional[Precision]):
    """``(index, engine, {layer: [Q, G, out, in]} preconditioned query gradients, score dtype)``, after checking
    that the index was built from ``model`` and holds the task's layers."""
    check_damping(damping)
    precision = precision or Precision()
    index = index if isinstance(index, IndexStore) else load_index(Path(index))
    if index.header["model"] != model_fingerprint(model):
        raise InfluenceError(
            f"The index at {index.path} was built from a model with other parameters (names, shapes or values). "
            "Training gradients depend on the weights: rebuild the index with build_index for this model."
        )
    engine = ModelTap(model, task, layers=list(index.layers), amp_dtype=precision.amp_dtype)
    engine.discover("measurement", first_batch(query_data, batch_size, engine.device, "query_data"))
    if set(engine.specs) != set(index.layers):
        raise InfluenceError(f"The index holds layers {sorted(index.layers)} but the task tracks {sorted(engine.specs)}.")
    check_layers(factors, engine)
    execution = Execution(batch_size, compile, progress, precision, False, None)
    chunks = query_gradients(engine, factors, query_data, damping, False, execution, batch_size)
    score_dtype = precision.compute(precision.score_dtype, engine.dtype)
    queries = {layer: torch.cat([c[layer] for c in chunks]).to(score_dtype) for layer in engine.specs}
    return index, engine, queries, score_dtype


def scores_against(index: IndexStore, queries: Dict[str, torch.Tensor], rows, device, dtype) -> Dict[str, torch.Tensor]:
    """``{layer: [Q, n]}`` scores of prepared queries against ``rows`` of the index."""
    return {layer: _block_scores(queries[layer], read_block(index, layer, rows, device, dtype)) for layer in queries}


def streamed_scores(index: IndexStore, queries: Dict[str, torch.Tensor], blocks, device, dtype):
    """``(rows, {layer: [Q, n]})`` per block, the next (layer, block) read by a background thread while this one
    is contracted (reading and decompressing overlap the arithmetic)."""
    work = [(rows, layer) for rows in blocks for layer in queries]
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read_block, index, work[0][1], work[0][0], device, dtype) if work else None
        scores: Dict[str, torch.Tensor] = {}
        for position, (rows, layer) in enumerate(work):
            stats = pending.result()
            if position + 1 < len(work):
                nxt = work[position + 1]
                pending = reader.submit(read_block, index, nxt[1], nxt[0], device, dtype)
            scores[layer] = _block_scores(queries[layer], stats)
            if len(scores) == len(queries):
                yield rows, scores
                scores = {}
