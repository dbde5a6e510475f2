"""The Linear Datamodeling Score (LDS; Park et al. 2023, "TRAK").

Draw ``M`` random subsets ``S_m`` of the training set (each a fraction, 50 % by default, of the examples),
retrain on each, and measure every query: ``f_q(S_m)``. Influence scores predict those measurements
additively. fninfluence's scores are positive when an example *helps*, i.e. when upweighting it lowers the
measurement, so the prediction for subset m is

    predicted_q(S_m) = - sum_{n in S_m} score[q, n]      (up to a constant, which ranks ignore)

and ``LDS_q = spearman_m(predicted_q(S_m), f_q(S_m))``. The result is the mean of ``LDS_q`` over queries and
its standard error ``std_q / sqrt(Q)``. A higher LDS is better; 1 is a perfect ranking of the subsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import InfluenceError
from .cache import RetrainCache

TrainFn = Callable[[torch.Tensor], Union[torch.Tensor, nn.Module]]


def random_subsets(num_examples: int, num_subsets: int, fraction: float = 0.5, seed: int = 0) -> torch.Tensor:
    """``[M, k]`` sorted training indices, ``k = round(fraction * num_examples)``, each row drawn without
    replacement from its own seeded permutation (reproducible for a given ``seed``)."""
    if not 0 < fraction < 1:
        raise InfluenceError(f"fraction must be strictly between 0 and 1, got {fraction!r}.")
    size = round(fraction * num_examples)
    if size < 1 or num_subsets < 2:
        raise InfluenceError(f"LDS needs at least 2 subsets of at least 1 example; got {num_subsets} subsets of "
                             f"{size} of {num_examples} examples. Raise num_subsets or fraction.")
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_examples, generator=generator)[:size].sort().values
                        for _ in range(num_subsets)])


def subset_predictions(scores: torch.Tensor, subsets: torch.Tensor) -> torch.Tensor:
    """``[M, Q]``: ``- sum_{n in S_m} scores[q, n]``, the predicted measurement of each subset (up to a constant)."""
    return -scores.to(torch.float64)[:, subsets].sum(-1).T


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 along the last dimension, tied values sharing the mean of their ranks."""
    order = values.argsort(dim=-1, stable=True)
    ranks = torch.empty_like(values, dtype=torch.float64)
    for row in range(values.shape[0]):
        ordered = values[row, order[row]]
        _, counts = torch.unique_consecutive(ordered, return_counts=True)
        ends = counts.cumsum(0).to(torch.float64)
        mean_rank = ends - (counts.to(torch.float64) + 1) / 2  # mean of the ranks end-count .. end-1
        ranks[row, order[row]] = mean_rank.repeat_interleave(counts)
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation along the last dimension (ties get average ranks): the Pearson correlation
    of the ranks. 1-D inputs give a scalar; ``[K, M]`` inputs give ``[K]``. NaN where either side is constant."""
    x2, y2 = torch.atleast_2d(x), torch.atleast_2d(y)
    if x2.shape != y2.shape:
        raise InfluenceError(f"spearman needs inputs of one shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
    rx, ry = _average_ranks(x2), _average_ranks(y2)
    rx, ry = rx - rx.mean(-1, keepdim=True), ry - ry.mean(-1, keepdim=True)
    correlation = (rx * ry).sum(-1) / (rx.square().sum(-1) * ry.square().sum(-1)).sqrt()
    return correlation[0] if x.dim() == 1 else correlation


@dataclass
class LDSResult:
    """``mean`` and ``stderr`` over the queries whose correlation is defined; ``per_query`` holds every
    query's LDS (NaN where the retrained or predicted measurements were all equal)."""

    mean: float
    stderr: float
    per_query: torch.Tensor
    subsets: torch.Tensor
    measurements: torch.Tensor  # [M, Q] retrained measurements
    predictions: torch.Tensor  # [M, Q] predicted, up to a constant

    def __str__(self) -> str:
        return f"LDS {self.mean:.3f} ± {self.stderr:.3f} ({self.per_query.numel()} queries, {len(self.subsets)} subsets)"


def lds_from_measurements(scores: torch.Tensor, subsets: torch.Tensor, measurements: torch.Tensor) -> LDSResult:
    """The LDS of ``scores`` (``[Q, N]``) given retrained ``measurements`` (``[M, Q]``) on ``subsets`` (``[M, k]``)."""
    if scores.dim() != 2:
        raise InfluenceError(f"scores must be a [queries, training examples] tensor, got shape {tuple(scores.shape)}.")
    if measurements.shape != (subsets.shape[0], scores.shape[0]):
        raise InfluenceError(f"measurements must be [subsets, queries] = {(subsets.shape[0], scores.shape[0])}, got "
                             f"{tuple(measurements.shape)}: train_fn must return one value per query.")
    predictions = subset_predictions(scores, subsets)
    per_query = spearman(predictions.T, measurements.to(torch.float64).T)
    defined = per_query[torch.isfinite(per_query)]
    if defined.numel() == 0:
        raise InfluenceError("The LDS is undefined for every query: the retrained (or predicted) measurements do not "
                             "vary across subsets. Check that train_fn really trains on the indices it is given.")
    stderr = float(defined.std() / defined.numel() ** 0.5) if defined.numel() > 1 else float("nan")
    return LDSResult(float(defined.mean()), stderr, per_query, subsets, measurements.to(torch.float64), predictions)


def _measure(model: nn.Module, task: Any, query_data: Dataset) -> torch.Tensor:
    """``[Q]``: ``task.compute_measurement`` of each query alone."""
    device = next(model.parameters()).device
    values = []
    with torch.no_grad():
        for batch in DataLoader(query_data, batch_size=1, shuffle=False):
            batch = [x.to(device) if isinstance(x, torch.Tensor) else x for x in batch] \
                if isinstance(batch, (list, tuple)) else batch.to(device)
            values.append(float(task.compute_measurement(batch, model)))
    return torch.tensor(values, dtype=torch.float64)


def retrain_measurements(train_fn: TrainFn, subsets: torch.Tensor, *, task: Any = None,
                         query_data: Optional[Dataset] = None, cache_dir: Optional[Union[str, Path]] = None,
                         cache_key: Optional[str] = None, progress: bool = False) -> torch.Tensor:
    """``[M, Q]``: the query measurements after retraining on each subset.

    ``train_fn(indices)`` gets a sorted ``LongTensor`` of training indices and returns either the ``[Q]``
    measurements itself or the trained model, which is then measured with ``task.compute_measurement`` on each
    query of ``query_data``. With ``cache_dir`` (and a ``cache_key`` naming the setup) results are stored as JSON
    and a later call, e.g. for another strategy, retrains only the subsets not seen before.
    """
    cache = RetrainCache(cache_dir, cache_key) if cache_dir is not None else None
    rows = []
    for m, indices in enumerate(subsets):
        stored = cache.get(indices.tolist()) if cache is not None else None
        if stored is None:
            result = train_fn(indices.clone())
            if isinstance(result, nn.Module):
                if task is None or query_data is None:
                    raise InfluenceError("train_fn returned a model: pass task= and query_data= to measure it, or "
                                         "return the [queries] measurements from train_fn.")
                result = _measure(result, task, query_data)
            result = torch.as_tensor(result, dtype=torch.float64).detach().cpu().flatten()
            if cache is not None:
                cache.put(indices.tolist(), result.tolist())
            stored = result.tolist()
        if progress:
            print(f"retrained {m + 1}/{len(subsets)}", end="\r", flush=True)
        rows.append(torch.tensor(stored, dtype=torch.float64))
    if len({r.numel() for r in rows}) != 1:
        raise InfluenceError(f"train_fn returned different numbers of measurements: {sorted({r.numel() for r in rows})}.")
    return torch.stack(rows)


def linear_datamodeling_score(scores: torch.Tensor, train_fn: TrainFn, *, num_subsets: int = 50,
                              fraction: float = 0.5, seed: int = 0, task: Any = None,
                              query_data: Optional[Dataset] = None, cache_dir: Optional[Union[str, Path]] = None,
                              cache_key: Optional[str] = None, progress: bool = False) -> LDSResult:
    """The LDS of ``scores`` (``[Q, N]``, e.g. from :func:`fninfluence.pairwise_scores`).

    Retrains through ``train_fn`` on ``num_subsets`` random subsets of ``fraction`` of the ``N`` training examples
    (seeded by ``seed``; the same seed gives the same subsets, so several strategies share one cache) and
    correlates each query's retrained measurements with the predictions ``-sum_{n in S} scores[q, n]``.
    See :func:`retrain_measurements` for ``train_fn``, ``task``, ``query_data`` and the cache.
    """
    subsets = random_subsets(scores.shape[1], num_subsets, fraction, seed)
    measurements = retrain_measurements(train_fn, subsets, task=task, query_data=query_data, cache_dir=cache_dir,
                                        cache_key=cache_key, progress=progress)
    return lds_from_measurements(scores, subsets, measurements)
