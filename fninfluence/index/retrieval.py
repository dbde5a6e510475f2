"""Top proponents and opponents of new queries from a training-gradient index, exact or approximate.

The exact search (:func:`exact_top_k`) streams the index in blocks, as :func:`~fninfluence.index.index_scores`
does, and keeps a running top ``k`` of the scores and of their negatives: no ``[Q, N]`` matrix is kept.

The approximate search needs no pass over the index per query. A *sketch* of the index, built once and kept
next to it, maps every training example's gradient (all layers) to ``dim`` numbers,

    s_n[r] = dim^{-1/2} sum_layers a_{l,r}^T G_{n,l} b_{l,r}        (a, b: fixed Gaussian vectors),

a random projection whose rows are rank one per layer, so that it is computed from the stored factors without
forming ``G_n`` and applied to a query without a projection matrix in memory. For the eigenbasis estimators
(diagonal, KFAC, EKFAC) the vectors are whitened: ``a = Q_S (m_o * z)``, ``b = Q_A (m_i * z')`` for the training
side and ``Q_S (z / m_o)``, ``Q_A (z' / m_i)`` for the query, with ``m_o m_i^T`` the separable approximation of
``(Lambda + damping)^{-1/2}``, so the estimate stays unbiased, ``E[<s(P_q), s_n>] = <P_q, G_n>``, while its
error scales with the whitened norms ``|P^{1/2} q| |P^{1/2} g_n|`` instead of ``|P q| |g_n|``, far smaller for a
preconditioner that amplifies low-curvature directions.

A query's sketch is compared with every training sketch (a matrix product, or FAISS when installed:
``pip install "fninfluence[retrieval]"``), the ``candidates`` best examples in each direction are scored
exactly against the index (rows read by index), and the top ``k`` of those are returned with their exact
scores. Recall against the exact search is measured in docs/gradient-index.md.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import nn

from ..core.algebra import ExampleGrads
from ..curvature.base import damped_reciprocal
from ..curvature.eigenbasis import precondition_in_basis
from ..core.contract import contract
from ..errors import InfluenceError
from ..factors import Factors
from ..precision import Precision
from ..run.data import Data
from ..run.loop import CompileOption
from ..store.index_store import IndexStore, load_index
from ..task import Task
from .reading import CONTRACTION_BYTES, blocks_of, prepared_queries, scores_against, streamed_scores

__all__ = ["TopInfluences", "top_influences", "index_sketch", "exact_top_k", "approximate_top_k", "sketch_queries"]

BACKENDS = ("auto", "torch", "faiss", "faiss-hnsw")


class TopInfluences(NamedTuple):
    """Per query, the ``k`` training examples with the largest scores (proponents) and the most negative ones
    (opponents), strongest first: indices ``[Q, k]`` and their exact index scores ``[Q, k]``."""

    proponents: torch.Tensor
    proponent_scores: torch.Tensor
    opponents: torch.Tensor
    opponent_scores: torch.Tensor


# -- the sketch ------------------------------------------------------------------------------------

def _projections(index: IndexStore, dim: int, seed: int) -> Dict[str, tuple]:
    """``{layer: (a [dim, G, out], b [dim, G, in])}``: standard normal, from ``seed`` and the layer's position."""
    result = {}
    for position, (name, record) in enumerate(index.layers.items()):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + position)
        a = torch.randn(dim, record["groups"], record["out"], generator=generator, dtype=torch.float64)
        b = torch.randn(dim, record["groups"], record["in"], generator=generator, dtype=torch.float64)
        result[name] = (a, b)
    return result


class Whitening(NamedTuple):
    """A layer's eigenbasis (``Q_S``, ``Q_A``, either may be None) and the separable approximation
    ``row[o] * column[i]`` of ``(Lambda + damping)^{-1/2}`` (least squares on the logarithms)."""

    gradient_eigenvectors: Optional[torch.Tensor]
    activation_eigenvectors: Optional[torch.Tensor]
    row: torch.Tensor
    column: torch.Tensor

    def vectors(self, a: torch.Tensor, b: torch.Tensor, inverse: bool) -> tuple:
        """Projection vectors ``(Q_S (m_o * a), Q_A (m_i * b))`` for the training side, or with ``1 / m`` for the
        query side (``inverse``): ``(a'^T G b')`` is then ``a^T`` of the whitened ``G`` times ``b``."""
        power = -1.0 if inverse else 1.0
        a = a * self.row.to(a.dtype).pow(power)
        b = b * self.column.to(b.dtype).pow(power)
        qs, qa = self.gradient_eigenvectors, self.activation_eigenvectors
        if qs is not None:
            a = torch.einsum("gop,rgp->rgo", qs.to(a.dtype), a)
        if qa is not None:
            b = torch.einsum("gij,rgj->rgi", qa.to(b.dtype), b)
        return a, b


def whitenings(factors: Optional[Factors], layers, damping) -> Dict[str, Optional[Whitening]]:
    """Per layer, the whitening of a built-in eigenbasis estimator (diagonal, KFAC, EKFAC), whose preconditioner
    is ``P(G) = Q_S ((Q_S^T G Q_A) / (Lambda + damping)) Q_A^T``; None for any other (identity, user estimators)."""

    result = {}
    for layer in layers:
        tensors = None if factors is None else factors.tensors.get(layer)
        eigenbasis = tensors is not None and factors.estimator_for(layer).precondition is precondition_in_basis
        if not eigenbasis or "lambda" not in tensors:
            result[layer] = None
            continue
        root = damped_reciprocal(tensors["lambda"], damping, torch.float64).sqrt()
        logs = root.clamp_min(torch.finfo(torch.float64).tiny).log()
        row = logs.mean(-1)
        column = logs.mean(-2) - logs.mean((-1, -2))[..., None]
        result[layer] = Whitening(tensors.get("gradient_eigenvectors"), tensors.get("activation_eigenvectors"),
                                  row.exp(), column.exp())
    return result


def _whitening_digest(whitened: Dict[str, Optional[Whitening]]) -> str:
    """A short digest of the whitening (the sketch depends on it): sums of the scales and eigenvectors per layer.
    A stale sketch would only lower recall (the scores returned are exact), so summaries suffice."""
    import hashlib

    summary = []
    for layer, w in whitened.items():
        if w is None:
            summary.append([layer, None])
            continue
        summary.append([layer, list(w.row.shape), list(w.column.shape), float(w.row.sum()), float(w.column.sum())]
                       + [None if q is None else [float(q.double().abs().sum()), float(q.double().sum())]
                          for q in (w.gradient_eigenvectors, w.activation_eigenvectors)])
    return hashlib.sha256(json.dumps(summary).encode()).hexdigest()[:16]


def _side_projections(index: IndexStore, dim: int, seed: int, whitened, inverse: bool, device,
                      dtype) -> Dict[str, tuple]:
    """Per layer, the projection vectors of the training side (``inverse=False``) or of the queries."""
    key = ("side projections", dim, seed, _whitening_digest(whitened), inverse, str(device), dtype)
    if key not in index.cache:
        result = {}
        for layer, (a, b) in _projections(index, dim, seed).items():
            w = whitened.get(layer)
            if w is not None:
                a, b = w.vectors(a, b, inverse)
            result[layer] = (a.to(device, dtype), b.to(device, dtype))
        index.cache[key] = result
    return index.cache[key]


def _sketch_rows(index: IndexStore, rows: slice, projections, dtype) -> torch.Tensor:
    """``[n, dim]`` sketches of ``rows`` (unscaled), from the stored pairs or dense gradients as they are (the
    whitening is in the projection vectors), dense layers in row slices that bound the intermediate."""

    total = None
    for layer, (a, b) in projections.items():
        stats = index.read_rows(layer, rows)
        if isinstance(stats, ExampleGrads):
            grads = stats.grads
            n, groups, out, _ = grads.shape
            step = max(1, CONTRACTION_BYTES // max(1, groups * out * a.shape[0] * grads.element_size()))
            part = torch.cat([contract("ngoi,rgo,rgi->nr", grads[i:i + step].to(dtype), a, b)
                              for i in range(0, n, step)])
        else:
            part = contract("nkgo,rgo,nkgi,rgi->nr", stats.g.to(dtype), a, stats.a.to(dtype), b)
        total = part if total is None else total + part
    return total


def _sketch_files(index: IndexStore, dim: int, seed: int, digest: str):
    folder = index.path / "retrieval"
    name = f"sketch-d{dim}-seed{seed}-{digest}"
    return folder, folder / f"{name}.npy", folder / f"{name}.json"


def index_sketch(index: Union[str, Path, IndexStore], factors: Optional[Factors] = None, dim: int = 512,
                 seed: int = 0, *, damping: Optional[float] = None, examples_per_read: int = 4096,
                 save: bool = True) -> torch.Tensor:
    """``[N, dim]`` float32 sketches of the index's training gradients (see the module), built once.

    With ``factors`` (diagonal, KFAC or EKFAC layers), each gradient is whitened first (rotated into the
    eigenbasis and scaled by ``(Lambda + damping)^{-1/2}``, the query by the inverse), which keeps the
    estimate unbiased and makes its error far smaller (see docs/gradient-index.md). Built by one read of the
    index; kept in ``<index>/retrieval/`` (unless ``save=False`` or the folder is read-only) with the digest of
    the index's identity, and in memory on the ``IndexStore``.
    """

    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise InfluenceError(f"dim must be a positive integer, got {dim!r}.")
    index = index if isinstance(index, IndexStore) else load_index(Path(index))
    whitened = whitenings(factors, index.layers, damping)
    return _sketch(index, whitened, _whitening_digest(whitened), dim, seed, examples_per_read, save)


def _sketch(index: IndexStore, whitened, digest: str, dim: int, seed: int, examples_per_read: int = 4096,
            save: bool = True) -> torch.Tensor:

    key = ("sketch", dim, seed, digest)
    if key in index.cache:
        return index.cache[key]
    folder, array_file, meta_file = _sketch_files(index, dim, seed, digest)
    record = {"identity": index.identity, "dim": dim, "seed": seed, "whitening": digest, "examples": index.examples}
    sketch = None
    try:
        if json.loads(meta_file.read_text()) == record:
            loaded = np.load(array_file, allow_pickle=False)
            if loaded.shape == (index.examples, dim) and loaded.dtype == np.float32:
                sketch = torch.from_numpy(loaded)
    except (OSError, ValueError):
        sketch = None
    if sketch is None:
        dtype = torch.float32
        projections = _side_projections(index, dim, seed, whitened, False, "cpu", dtype)
        sketch = torch.cat([_sketch_rows(index, rows, projections, dtype)
                            for rows in blocks_of(index, examples_per_read)]).div_(math.sqrt(dim)).float()
        if save:
            try:
                folder.mkdir(exist_ok=True)
                tag = uuid.uuid4().hex
                tmp_array, tmp_meta = folder / f".{tag}.npy", folder / f".{tag}.json"
                np.save(tmp_array, sketch.numpy(), allow_pickle=False)
                tmp_meta.write_text(json.dumps(record))
                os.replace(tmp_array, array_file)
                os.replace(tmp_meta, meta_file)  # last: a sketch without its record is never read
            except OSError:
                pass
    index.cache[key] = sketch
    return sketch


def sketch_queries(index: IndexStore, queries: Dict[str, torch.Tensor], dim: int, seed: int,
                   whitened: Optional[Dict[str, Optional[Whitening]]] = None) -> torch.Tensor:
    """``[Q, dim]`` sketches of preconditioned queries ``{layer: [Q, G, out, in]}``: the index's projection with the
    inverse whitening, so that ``<sketch(P_q), sketch(G_n)>`` estimates ``<P_q, G_n>`` without bias."""
    some = next(iter(queries.values()))
    projections = _side_projections(index, dim, seed, whitened or {}, True, some.device, some.dtype)
    total = sum(contract("qgoi,rgo,rgi->qr", queries[layer], a, b) for layer, (a, b) in projections.items())
    return (total / math.sqrt(dim)).float()


# -- searches --------------------------------------------------------------------------------------

def _merge(best_values, best_indices, values, indices, k):
    if best_values is not None:
        values, indices = torch.cat([best_values, values], 1), torch.cat([best_indices, indices], 1)
    top = values.topk(min(k, values.shape[1]), dim=1)
    return top.values, indices.gather(1, top.indices)


def exact_top_k(index: IndexStore, queries: Dict[str, torch.Tensor], k: int, device, dtype,
                examples_per_read: int = 4096) -> TopInfluences:
    """The exact top ``k`` in both directions, streaming the index in blocks (a running top-k, no ``[Q, N]``)."""

    up = down = up_i = down_i = None
    for rows, per_layer in streamed_scores(index, queries, blocks_of(index, examples_per_read), device, dtype):
        scores = sum(per_layer.values())
        columns = torch.arange(rows.start, rows.stop, device=scores.device).expand(scores.shape[0], -1)
        up, up_i = _merge(up, up_i, scores, columns, k)
        down, down_i = _merge(down, down_i, -scores, columns, k)
    return TopInfluences(up_i.cpu(), up.cpu(), down_i.cpu(), -down.cpu())


def _backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise InfluenceError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "auto":
        try:
            import faiss  # noqa: F401
        except ImportError:
            return "torch"
        return "faiss"
    if backend.startswith("faiss"):
        try:
            import faiss  # noqa: F401
        except ImportError as error:
            raise InfluenceError(f"backend={backend!r} needs FAISS: pip install 'fninfluence[retrieval]' "
                                 "(faiss-cpu), or use backend='torch'.") from error
    return backend


def _faiss_index(index: IndexStore, sketch: torch.Tensor, kind: str, key):
    import faiss

    cached = index.cache.get(("faiss", kind) + key)
    if cached is None:
        dim = sketch.shape[1]
        if kind == "faiss-hnsw":
            cached = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            cached.hnsw.efSearch = 128
        else:
            cached = faiss.IndexFlatIP(dim)
        cached.add(np.ascontiguousarray(sketch.numpy(), dtype=np.float32))
        index.cache[("faiss", kind) + key] = cached
    return cached


def sketch_candidates(index: IndexStore, sketch: torch.Tensor, query_sketch: torch.Tensor, count: int,
                      backend: str, key=()) -> tuple:
    """``(up [Q, count], down [Q, count])``: the training rows whose sketch scores are largest / most negative."""
    backend = _backend(backend)
    if backend == "torch":
        approx = query_sketch.cpu() @ sketch.T
        return approx.topk(count, dim=1).indices, (-approx).topk(count, dim=1).indices
    search = _faiss_index(index, sketch, backend, key)
    q = np.ascontiguousarray(query_sketch.cpu().numpy(), dtype=np.float32)
    _, up = search.search(q, count)
    _, down = search.search(-q, count)
    return torch.from_numpy(up).long(), torch.from_numpy(down).long()


def approximate_top_k(index: IndexStore, queries: Dict[str, torch.Tensor], k: int, candidates: int, device, dtype,
                      dim: int = 512, seed: int = 0, backend: str = "auto", factors: Optional[Factors] = None,
                      damping: Optional[float] = None) -> TopInfluences:
    """The top ``k`` among each query's ``candidates`` best rows by sketch (in each direction), scored exactly."""

    whitened = whitenings(factors, index.layers, damping)
    digest = _whitening_digest(whitened)
    sketch = _sketch(index, whitened, digest, dim, seed)
    query_sketch = sketch_queries(index, queries, dim, seed, whitened)
    up, down = sketch_candidates(index, sketch, query_sketch, candidates, backend, (dim, seed, digest))
    rows = torch.unique(torch.cat([up, down], 1).clamp_min(0))  # FAISS marks missing results -1
    exact = sum(scores_against(index, queries, rows, device, dtype).values()).cpu()  # [Q, |rows|]
    position = torch.full((index.examples,), -1, dtype=torch.long)
    position[rows] = torch.arange(len(rows))
    result = []
    for picked, sign in ((up, 1.0), (down, -1.0)):
        valid = picked >= 0
        values = (sign * exact.gather(1, position[picked.clamp_min(0)])).masked_fill(~valid, float("-inf"))
        top = values.topk(k, dim=1)
        result += [picked.gather(1, top.indices), sign * top.values]
    return TopInfluences(*result)


def top_influences(
    model: nn.Module,
    task: Task,
    factors: Factors,
    query_data: Data,
    index: Union[str, Path, IndexStore],
    *,
    k: int = 10,
    approximate: bool = True,
    candidates: Optional[int] = None,
    sketch_dim: int = 512,
    seed: int = 0,
    backend: str = "auto",
    damping: Optional[float] = None,
    batch_size: Optional[int] = None,
    examples_per_read: int = 4096,
    compile: CompileOption = False,
    progress: bool = False,
    precision: Optional[Precision] = None,
) -> TopInfluences:
    """The top ``k`` proponents and opponents of each query of ``query_data`` in the indexed training set.

    ``approximate=False``: exact, one streamed read of the index (the scores of :func:`index_scores`).
    ``approximate=True``: the ``candidates`` (default ``max(10 k, 100)``) best examples per query and direction
    by the index's sketch (``sketch_dim`` numbers per example, built on the first call and kept next to the
    index), scored exactly; the scores returned are exact, the sets may miss examples the sketch ranked low.
    ``backend``: ``"faiss"`` (a flat inner-product index), ``"faiss-hnsw"`` (a graph index, sublinear in N),
    ``"torch"`` (one matrix product), or ``"auto"`` (FAISS when installed). Where ``candidates`` covers half the
    training set or more, the exact search runs instead. Keep one ``IndexStore`` (``load_index``) for many calls:
    it caches the sketch and the search structure; ``IndexStore.load_into_memory()`` also keeps the rows that the
    rerank reads in memory.
    """

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InfluenceError(f"k must be a positive integer, got {k!r}.")
    index, engine, queries, dtype = prepared_queries(model, task, factors, query_data, index, damping, batch_size,
                                                     compile, progress, precision)
    if k > index.examples:
        raise InfluenceError(f"k={k} exceeds the {index.examples} examples of the index.")
    candidates = max(10 * k, 100) if candidates is None else candidates
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < k:
        raise InfluenceError(f"candidates must be an integer of at least k={k}, got {candidates!r}.")
    if not approximate or 2 * candidates >= index.examples:
        return exact_top_k(index, queries, k, engine.device, dtype, examples_per_read)
    return approximate_top_k(index, queries, k, candidates, engine.device, dtype, sketch_dim, seed, backend, factors,
                             damping)
