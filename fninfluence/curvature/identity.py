"""Identity curvature: scores are plain gradient inner products, ``P(G) = G``."""

from __future__ import annotations

import torch

from . import one_hot
from .base import CurvatureEstimator, Damping, ScoreMemory, Tensors, Workspace


def _precondition(factors: Tensors, grads: torch.Tensor, damping: Damping) -> torch.Tensor:
    return grads


def _self_score(factors: Tensors, stats: Tensors, damping: Damping) -> torch.Tensor:
    """``|G_n|^2``; for an embedding ``sum_t x_t . P_t`` with same-token sums (no ``[N, D, V]``)."""
    if "ids" in stats:
        return one_hot.weighted_self_products(stats["ids"], one_hot.scaled_grads(stats, stats["g"]))
    a, g = stats["a"], stats["g"]
    if a.shape[1] == 1:  # rank one: |g a^T|^2 = |g|^2 |a|^2
        return (g.square().sum(-1) * a.square().sum(-1)).sum((1, 2))
    grads = torch.einsum("btgo,btgi->bgoi", g, a)
    return grads.square().flatten(1).sum(1)


def _memory(workspace: Workspace) -> ScoreMemory:
    """``precondition`` returns its input; ``self_score`` forms the per-example gradients and their squares only
    when there are several tokens per example."""
    block = workspace.rows * workspace.gradient_elements * workspace.itemsize
    return ScoreMemory(precondition=0, self_score=2 * block if workspace.tokens > 1 else 0)


identity = CurvatureEstimator("identity", (), _precondition, _self_score, _memory)
