"""Layer statistics as functions split at the layer's output, so that the tap can stream them.

A pass rarely needs a layer's inputs ``a`` and output gradients ``g`` themselves: it needs a small function of
them (the sums ``sum_t a_t a_t^T`` and ``sum_t g_t g_t^T``, the squared per-example gradients in an eigenbasis,
the scores ``<P_q, G_n>`` against preconditioned queries). A :class:`LayerStatistic` is such a function of one
layer's batch, written in two halves::

    kept, early = statistic.forward(inputs)    # inputs: the layer's input side (a or ids, tokens), g = None
    late = statistic.backward(kept, g)         # g: the layer's output gradients [B, T, G, out]
    value = {**early, **late}                   # what the pass receives

``forward`` runs when the layer is called, ``backward`` when the backward pass reaches the layer's output, so
only ``kept`` (often smaller than ``a``, e.g. nothing for a covariance) survives the forward pass, and ``g``
dies as soon as ``late`` is formed (:mod:`fninfluence.capture.stream`). :func:`evaluate` computes the same value
from the whole batch's statistics after the backward pass; the two routes run the same functions, so they agree
up to the order in which a layer's calls are summed.

``zeros(examples, tokens)`` gives ``late``'s zero value for a batch of ``examples`` examples with ``tokens``
tokens per call (the tap differentiates with respect to it). ``additive`` says that the value of a layer called
several times is the sum of its calls' values (sums of products over tokens, scores linear in ``G_n``); a layer
called several times by a statistic that is not additive (e.g. squared per-example gradients) is evaluated on
all its calls together, after the backward pass.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import torch

from .algebra import LayerStats, as_stats, cast, with_grads, without_grads

Tensors = Dict[str, torch.Tensor]


class LayerStatistic(NamedTuple):
    """What a pass keeps of one layer's batch, as a function split at the layer's output (see the module)."""

    forward: Callable[[LayerStats], Tuple[Any, Tensors]]
    backward: Callable[[Any, torch.Tensor], Tensors]
    zeros: Callable[[int, int], Tensors]
    additive: bool = False


def inputs_of(stats: LayerStats) -> LayerStats:
    """The input side of a layer's batch statistics: the same record with ``g = None``."""
    return without_grads(stats)


def evaluate(statistic: LayerStatistic, stats: LayerStats) -> Tensors:
    """The statistic's value on a whole batch's statistics (the route of a layer that is not streamed)."""
    stats = as_stats(stats)
    kept, early = statistic.forward(inputs_of(stats))
    return {**early, **statistic.backward(kept, stats.g)}


def of_stats(fn: Callable[[LayerStats], Tensors], zeros: Callable[[int, int], Tensors],
             additive: bool = False) -> LayerStatistic:
    """The statistic ``fn(stats)`` of a layer's whole batch: it keeps the input side until the backward pass.

    Every function of ``(a, g)`` is one of these; a split that keeps less (or nothing) is written by hand.
    """
    return LayerStatistic(lambda inputs: (inputs, {}), lambda kept, g: fn(with_grads(kept, g)), zeros, additive)


def in_dtype(statistic: LayerStatistic, dtype: Optional[torch.dtype]) -> LayerStatistic:
    """The statistic computed from ``a``, ``g`` cast to ``dtype`` (None: as they come)."""
    if dtype is None:
        return statistic
    return statistic._replace(forward=lambda inputs: statistic.forward(cast(inputs, dtype)),
                              backward=lambda kept, g: statistic.backward(kept, g.to(dtype)))
