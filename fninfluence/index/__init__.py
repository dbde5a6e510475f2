"""A training-gradient index: score new queries without a pass over the training data.

:func:`build_index` runs one forward and backward pass over the training data and stores, per example
and tracked layer, its gradient in whichever form is smaller: dense (``G x out x in`` numbers, exact),
or factored (``K x G x (out + in)``: exact rank-one pairs for layers without a token dimension, the tokens
themselves when there are at most ``rank`` of them, else a rank-``rank`` truncated SVD; see
:mod:`.factorize`). :func:`index_scores` then scores a query set by contracting the preconditioned query
gradients with the index:

    score[q, n] = sum_layers <P_q, G_n>     (G_n = sum_k u_{n,k} v_{n,k}^T where factored)

(the same sign and scale as :func:`fninfluence.pairwise_scores`, exactly equal to it where the index is
exact), with no forward or backward pass over the training data. :func:`top_influences` returns the top
proponents and opponents of new queries, exactly or through a random sketch of the index and an exact
rerank of its candidates (:mod:`.retrieval`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import partitions as parts
from ..capture import ModelTap, check_finite
from ..run.data import Data
from ..errors import InfluenceError
from ..factors import Factors
from ..core.statistics import LayerStatistic, in_dtype, of_stats
from ..run.discovery import discover
from ..run.loop import BatchStep, CompileOption, PassSettings, run_pass
from ..run.options import Targets
from ..run.slices import first_batch, length, subset
from ..precision import Precision
from ..core.scores import ModuleScores, example_gradients, total
from ..store.index_store import DENSE, FACTORED, IndexStore, example_bytes, load_index, open_index
from ..task import Task
from .factorize import factorize, index_width, relative_residual
from .reading import blocks_of, prepared_queries, streamed_scores

__all__ = ["build_index", "index_scores", "top_influences", "TopInfluences", "index_sketch", "load_index", "IndexStore",
           "factorize", "choose_form"]

# Rows per chunk: about this many bytes of every layer's arrays together (also the memory that the rows
# waiting for a whole chunk take during a build).
CHUNK_BYTES = 16 << 20

Form = Union[str, Mapping[str, str]]


def choose_form(out_features: int, in_features: int, width: int) -> str:
    """``"dense"`` when the gradient ``out x in`` (per group) takes no more numbers than its factors
    ``width x (out + in)``, else ``"factored"``. A dense layer is exact whatever the rank."""
    return DENSE if out_features * in_features <= width * (out_features + in_features) else FACTORED


def _forced(form: Form, layer: str) -> str:
    choice = form.get(layer, "auto") if isinstance(form, Mapping) else form
    if choice not in ("auto", DENSE, FACTORED):
        raise InfluenceError(f"form must be 'auto', 'dense' or 'factored' (or a dict of them per layer), got {choice!r}.")
    return choice


def _layer_plan(engine: ModelTap, first_batch, rank, form: Form = "auto") -> Dict[str, Dict[str, object]]:
    embeddings = [name for name, spec in engine.specs.items() if spec.one_hot]
    if embeddings:
        raise InfluenceError(
            f"The training-gradient index does not hold embedding layers yet ({embeddings}): leave them out of "
            "Task.tracked_modules() for the index, or score them with pairwise_scores."
        )
    if isinstance(form, Mapping):
        unknown = sorted(set(form) - set(engine.specs))
        if unknown:
            raise InfluenceError(f"form names layers the task does not track: {unknown} (tracked: {sorted(engine.specs)}).")
    tokens = engine.tokens_per_call("train", first_batch)
    plan = {}
    for name, spec in engine.specs.items():
        width = index_width(tokens.get(name, 1) * spec.calls, spec.out_features, spec.in_features, rank)
        chosen = _forced(form, name)
        plan[name] = {"form": choose_form(spec.out_features, spec.in_features, width) if chosen == "auto" else chosen,
                      "width": width, "groups": spec.groups, "out": spec.out_features, "in": spec.in_features}
    return plan


def _aligned_ranges(examples: int, partitions: int, layers, dtype: torch.dtype) -> Tuple[list, int]:
    """``(data partitions, rows per chunk)``: chunks of about :data:`CHUNK_BYTES`, and partitions made of whole
    chunks (each partition is rounded up to a multiple of the chunk; the last one ends at ``examples``)."""
    ranges = parts.data_ranges(examples, partitions)
    size = parts.partition_size(examples, partitions)
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_example = sum(example_bytes(layer, itemsize) for layer in layers.values())
    rows = max(1, CHUNK_BYTES // max(1, per_example))
    if size <= rows:
        return ranges, size
    chunks = math.ceil(size / rows)
    rows = math.ceil(size / chunks)
    size = chunks * rows
    return [range(min(i * size, examples), min((i + 1) * size, examples)) for i in range(partitions)], rows


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
    form: Form = "auto",
) -> Optional[IndexStore]:
    """Store every training example's per-layer gradient in the Zarr store ``store``, dense or factored.

    ``rank`` bounds the pseudo-tokens kept per example for layers with a token dimension (``None``: keep
    ``min(out, in)``, which is exact). Layers without a token dimension are always exact (rank one).
    ``form="auto"`` stores a layer's dense gradient where it takes no more numbers than its ``K`` pairs
    (``out * in <= K * (out + in)``, see :func:`choose_form`), which is then exact; ``"dense"`` or
    ``"factored"`` (or a dict of them per layer name) force a form.
    ``dtype`` is the stored precision (float16 halves the disk size). Data partitions are resumable cells
    as in :func:`fninfluence.fit_factors` (rounded to whole chunks of the arrays). Returns the index once
    complete, else None.

    Disk size per example: ``sum_layers min(G * out * in, K * G * (out + in)) * bytes(dtype)`` (before
    compression). Each chunk of the arrays is written once, so the build is linear in the data.
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InfluenceError(f"rank must be a positive integer or None (exact), got {rank!r}.")
    precision = precision or Precision()
    engine = discover(model, task, train_data, batch_size, "train", precision.amp_dtype, "train_data")
    layers = _layer_plan(engine, first_batch(train_data, batch_size, engine.device, "train_data"), rank, form)
    examples = length(train_data, "train_data")
    parts.check_count(data_partitions, "data partitions")
    ranges, chunk_rows = _aligned_ranges(examples, data_partitions, layers, dtype)
    index = open_index(Path(store), model=model, train_data=train_data, layers=layers, rank=rank, dtype=dtype,
                       ranges=ranges, arguments={"precision": precision.as_dict()}, overwrite=overwrite,
                       chunk_rows=chunk_rows)
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


def index_step(engine: ModelTap, layers: Dict[str, Dict[str, object]], precision: Precision,
               dtype: torch.dtype) -> BatchStep:
    """Per training batch: each layer's per-example gradients, dense or factored; handed to the index as they
    come (it writes whole chunks). The carry is ``(index, first example of the next batch)``."""
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

    def dense(layer: str) -> LayerStatistic:
        """The layer's per-example gradients ``[N, G, out, in]`` (exact; a convolution's from its own kernel)."""
        return in_dtype(example_gradients(engine.specs[layer], grad_dtype, engine.device), grad_dtype)

    statistics = {layer: dense(layer) if layers[layer]["form"] == DENSE else factored(layer) for layer in engine.specs}

    def compute(params, buffers, batch, probes, _):
        loss, values, _ = engine.layer_values("train", params, buffers, batch, probes[0], statistics)
        stored = {layer: {k: v[k] for k in (("grads",) if layers[layer]["form"] == DENSE else ("g", "a"))}
                  for layer, v in values.items()}
        residuals = {layer: v["residual"] if "residual" in v else v["grads"].new_zeros(v["grads"].shape[0])
                     for layer, v in values.items()}
        return loss, (stored, residuals)

    def fold(carry, output):
        index, start = carry
        stored, residuals = output
        index.write_rows(start, {layer: {k: v.to(dtype) for k, v in f.items()} for layer, f in stored.items()},
                         residuals)
        return index, start + next(iter(residuals.values())).shape[0]

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

    Only the queries pass through the model; the training side is read from ``index`` in blocks of about
    ``examples_per_read`` examples (whole chunks), one matrix product per dense layer and block. Equal to
    :func:`fninfluence.pairwise_scores` (up to the stored dtype) wherever the index is exact; truncated layers
    are approximate (see ``IndexStore.residuals``). The model must be the one the index was built from.
    """
    index, engine, queries, score_dtype = prepared_queries(model, task, factors, query_data, index, damping,
                                                           batch_size, compile, progress, precision)
    blocks = blocks_of(index, examples_per_read)
    per_layer: Dict[str, list] = {layer: [] for layer in engine.specs}
    bar = tqdm(total=len(blocks), desc="index scores", unit="block", disable=not progress, leave=False)
    for _, scores in streamed_scores(index, queries, blocks, engine.device, score_dtype):
        for layer, block in scores.items():
            per_layer[layer].append(block)
        bar.update(1)
    bar.close()
    result = {layer: torch.cat(blocks, dim=1) for layer, blocks in per_layer.items()}
    return ModuleScores(result) if per_module else total(result)


from .retrieval import TopInfluences, index_sketch, top_influences  # noqa: E402  (uses the functions above)
