"""Curvature estimators as values: records of pure functions over dicts of tensors.

An estimator fits its factors in zero or more passes over the data. A pass is a triple of pure
functions, applied layer by layer:

* ``init(shape, dtype, device) -> state``: zeros of the right shapes,
* ``update(state, stats, factors) -> state``: fold one batch's layer statistics into the state,
* ``finalize(state, factors) -> factors``: turn the state into (more) factors,

States must be sums over examples: the states of data partitions, computed apart, are added up
before ``finalize``. Here ``stats = {"a": [B, T, G, in], "g": [B, T, G, out], "tokens": scalar}`` holds a batch's layer
inputs (with the bias column) and output gradients, and ``factors`` holds what earlier passes produced.

One-hot layers (``nn.Embedding``, ``in`` = the vocabulary V) never form ``a``: their stats hold
``"ids": [B, T]`` and ``"id_values": [B, T]`` instead, meaning ``a_t = id_values[t] e_{ids[t]}`` (G = 1;
the value is 0 for padding and masked tokens), and their ``shape`` is a :class:`OneHotShape`. The stats are
records, :class:`~fninfluence.core.algebra.DenseStats` or :class:`~fninfluence.core.algebra.OneHotStats`, that
read like those dicts; the formulas that differ between the two kinds live in :mod:`fninfluence.core.algebra`,
which tells them apart by type, so a compiled step stays one graph.

``precondition(factors, grads, damping)`` applies the damped inverse curvature to gradients laid out
as ``[N, G, out, in]``; ``self_score(factors, stats, damping)`` returns ``<P(G_n), G_n>`` per example.
Write your own estimator by building a :class:`CurvatureEstimator`; the pipeline and the property
tests in :mod:`fninfluence.testing` take it as they take the built-in ones.
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

from ..core.algebra import per_example_grads  # noqa: F401  (re-exported: the documented import path)

Tensors = Dict[str, torch.Tensor]
LayerShape = Tuple[int, int, int]  # (groups, out, in) with the bias column counted in ``in``
Damping = Optional[float]


class OneHotShape(tuple):
    """``(groups, out, in)`` of a layer whose inputs are one-hot rows: an embedding, ``in`` = vocabulary."""

    one_hot = True


def is_one_hot(shape: LayerShape) -> bool:
    return getattr(shape, "one_hot", False)


class FitPass(NamedTuple):
    name: str
    init: Callable[[LayerShape, torch.dtype, torch.device], Tensors]
    update: Callable[[Tensors, Tensors, Tensors], Tensors]
    finalize: Callable[[Tensors, Tensors], Tensors]


class CurvatureEstimator(NamedTuple):
    name: str
    passes: Tuple[FitPass, ...]
    precondition: Callable[[Tensors, torch.Tensor, Damping], torch.Tensor]
    self_score: Callable[[Tensors, Tensors, Damping], torch.Tensor]


def default_self_score(precondition: Callable[[Tensors, torch.Tensor, Damping], torch.Tensor]):
    """``<P(G_n), G_n>`` through per-example gradients; estimators with a closed form override it."""

    def self_score(factors: Tensors, stats: Tensors, damping: Damping) -> torch.Tensor:
        grads = per_example_grads(stats)
        return (precondition(factors, grads, damping) * grads).flatten(1).sum(1)

    return self_score


def heuristic_damping(eigenvalues: torch.Tensor, damping: Damping) -> torch.Tensor:
    """The damping actually used: ``damping`` itself, or ``0.1 * mean(eigenvalues)`` when it is None.

    A layer that no training gradient reaches has all-zero eigenvalues; the heuristic then falls back
    to 1 (any positive value gives the same, zero, scores against the fitted examples) instead of 0/0.
    """
    if damping is None:
        mean = eigenvalues.mean()
        return torch.where(mean > 0, 0.1 * mean, torch.ones_like(mean))
    return torch.as_tensor(damping, dtype=eigenvalues.dtype, device=eigenvalues.device)


def damped_reciprocal(eigenvalues: torch.Tensor, damping: Damping, dtype: torch.dtype) -> torch.Tensor:
    """``1 / (eigenvalues + damping)`` computed in float64 (at least), cast to ``dtype``."""
    wide = eigenvalues.to(torch.promote_types(eigenvalues.dtype, torch.float64))
    return (1.0 / (wide + heuristic_damping(wide, damping))).to(dtype)
