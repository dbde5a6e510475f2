"""A training-gradient index: score new queries without a pass over the training data.

:func:`build_index` runs one forward and backward pass over the training data and stores, per example
and tracked layer, its gradient in factored form (exact rank-one pairs for layers without a token
dimension, the tokens themselves when there are at most ``rank`` of them, else a rank-``rank``
truncated SVD; see :mod:`.factorize`). :func:`index_scores` then scores a query set by
contracting the preconditioned query gradients with the index:

    score[q, n] = sum_layers sum_k u_{n,k}^T P_q v_{n,k}

(the same sign and scale as :func:`fninfluence.pairwise_scores`, exactly equal to it where the index is
exact), with no forward or backward pass over the training data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import partitions as parts
from ..capture import ModelTap, check_finite
from ..run.data import Data
from ..errors import InfluenceError
from ..factors import Factors
from ..run.arguments import check_damping
from ..core.statistics import LayerStatistic, in_dtype, of_stats
from ..run.discovery import check_layers, discover
from ..run.loop import BatchStep, CompileOption, PassSettings, run_pass
from ..run.options import Execution, Targets
from ..run.queries import query_gradients
from ..run.slices import first_batch, length, subset
from ..precision import Precision
from ..core.scores import ModuleScores, pairwise_layer_scores, total
from ..store.fingerprint import model_fingerprint
from ..store.index_store import IndexStore, load_index, open_index
from ..task import Task
from .factorize import factorize, index_width, relative_residual

__all__ = ["build_index", "index_scores", "load_index", "IndexStore", "factorize"]


def _layer_plan(engine: ModelTap, first_batch, rank) -> Dict[str, Dict[str, int]]:
    embeddings = [name for name, spec in engine.specs.items() if spec.one_hot]
    if embeddings:
        raise InfluenceError(
            f"The training-gradient index does not hold embedding layers yet ({embeddings}): leave them out of "
            "Task.tracked_modules() for the index, or score them with pairwise_scores."
        )
    tokens = engine.tokens_per_call("train", first_batch)
    return {name: {"width": index_width(tokens.get(name, 1) * spec.calls, spec.out_features, spec.in_features, rank),
                   "groups": spec.groups, "out": spec.out_features, "in": spec.in_features}
            for name, spec in engine.specs.items()}


def build_index(
    model: nn.Module,
    task: Task,
    train_data: Data,
    store: Union[str, Path],
    *,
    rank: Optional[int] = 32,
    dtype: torch.dtype = torch.float32,
    batch_size: Optional[int] = None,
    data_partitions: int = 1,
    target_data_partitions: Targets = None,
    overwrite: bool = False,
    compile: CompileOption = False,
    progress: bool = True,
    precision: Optional[Precision] = None,
) -> Optional[IndexStore]:
    """Store every training example's per-layer gradient, factored, in the Zarr store ``store``.

    ``rank`` bounds the pseudo-tokens kept per example for layers with a token dimension (``None``: keep
    ``min(out, in)``, which is exact). Layers without a token dimension are always exact (rank one).
    ``dtype`` is the stored precision (float16 halves the disk size). Data partitions are resumable cells
    as in :func:`fninfluence.fit_factors`. Returns the index once complete, else None.

    Disk size per example: ``sum_layers K * G * (out + in) * bytes(dtype)``.
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InfluenceError(f"rank must be a positive integer or None (exact), got {rank!r}.")
    precision = precision or Precision()
    engine = discover(model, task, train_data, batch_size, "train", precision.amp_dtype, "train_data")
    layers = _layer_plan(engine, first_batch(train_data, batch_size, engine.device, "train_data"), rank)
    examples = length(train_data, "train_data")
    ranges = parts.data_ranges(examples, data_partitions)
    index = open_index(Path(store), model=model, train_data=train_data, layers=layers, rank=rank, dtype=dtype,
                       ranges=ranges, arguments={"precision": precision.as_dict()}, overwrite=overwrite)
    step = index_step(engine, layers, precision, dtype)
    for d in parts.targets(target_data_partitions, len(ranges), "data partitions"):
        if index.cell_done(d):
            continue
        cell = subset(train_data, ranges[d]) if len(ranges) > 1 else train_data
        settings = PassSettings(f"training-gradient index [{d + 1}/{len(ranges)}]", batch_size, compile, progress,
                                "train_data", log=False)
        run_pass(engine, cell, step, (index, ranges[d].start), settings)
        index.mark_cell(d)
    return None if index.missing_cells() else index


def index_step(engine: ModelTap, layers: Dict[str, Dict[str, int]], precision: Precision,
               dtype: torch.dtype) -> BatchStep:
    """Per training batch: each layer's per-example gradients, factored; written to the index as they come.
    The carry is ``(index, first example of the next batch)``."""
    grad_dtype = precision.compute(precision.per_sample_gradient_dtype, engine.dtype)

    def factored(layer: str) -> LayerStatistic:
        """The layer's per-example gradients as ``width`` pseudo-tokens and the energy the truncation drops."""
        plan = layers[layer]

        def value(stats):
            kept = factorize(stats, plan["width"])
            return {"g": kept.g, "a": kept.a, "residual": relative_residual(stats, kept)}

        def zeros(examples: int, tokens: int):
            shape = (examples, plan["width"], plan["groups"])
            return {"g": torch.zeros(*shape, plan["out"], dtype=grad_dtype, device=engine.device),
                    "a": torch.zeros(*shape, plan["in"], dtype=grad_dtype, device=engine.device),
                    "residual": torch.zeros(examples, dtype=grad_dtype, device=engine.device)}

        return in_dtype(of_stats(value, zeros), grad_dtype)

    statistics = {layer: factored(layer) for layer in engine.specs}

    def compute(params, buffers, batch, probes, _):
        loss, values, _ = engine.layer_values("train", params, buffers, batch, probes[0], statistics)
        return loss, ({layer: {"g": v["g"], "a": v["a"]} for layer, v in values.items()},
                      {layer: v["residual"] for layer, v in values.items()})

    def fold(carry, output):
        index, start = carry
        factored, residuals = output
        index.write_rows(start, {layer: {k: v.to(dtype) for k, v in f.items()} for layer, f in factored.items()},
                         residuals)
        return index, start + next(iter(factored.values()))["g"].shape[0]

    return BatchStep(compute=compute, objectives=("train",), fold=fold,
                     check=lambda loss, index: check_finite(loss, "train", index))


def index_scores(
    model: nn.Module,
    task: Task,
    factors: Factors,
    query_data: Data,
    index: Union[str, Path, IndexStore],
    *,
    damping: Optional[float] = None,
    batch_size: Optional[int] = None,
    examples_per_read: int = 4096,
    per_module: bool = False,
    compile: CompileOption = False,
    progress: bool = True,
    precision: Optional[Precision] = None,
) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
    """``[Q, N]`` scores of ``query_data`` against the indexed training set (per layer if ``per_module``).

    Only the queries pass through the model; the training side is read from ``index`` in blocks of
    ``examples_per_read`` examples. Equal to :func:`fninfluence.pairwise_scores` (up to the stored dtype)
    wherever the index is exact; truncated layers are approximate (see ``IndexStore.residuals``).
    The model must be the one the index was built from.
    """
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
    per_layer: Dict[str, list] = {layer: [] for layer in engine.specs}
    bar = tqdm(total=-(-index.examples // examples_per_read), desc="index scores", unit="block", disable=not progress,
               leave=False)
    for start in range(0, index.examples, examples_per_read):
        rows = slice(start, min(start + examples_per_read, index.examples))
        for layer in engine.specs:
            stats = {k: v.to(engine.device, score_dtype) for k, v in index.read_rows(layer, rows).items()}
            per_layer[layer].append(pairwise_layer_scores(queries[layer], stats))
        bar.update(1)
    bar.close()
    result = {layer: torch.cat(blocks, dim=1) for layer, blocks in per_layer.items()}
    return ModuleScores(result) if per_module else total(result)
