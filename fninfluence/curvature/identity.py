"""Identity curvature: scores are plain gradient inner products, ``P(G) = G``."""

from __future__ import annotations

import torch

from ..core import algebra
from .base import CurvatureEstimator, Damping, ScoreMemory, Tensors, Workspace


def _precondition(factors: Tensors, grads: torch.Tensor, damping: Damping) -> torch.Tensor:
    return grads


def _self_score(factors: Tensors, stats, damping: Damping) -> torch.Tensor:
    """``|G_n|^2``, without forming ``G_n`` where a closed form exists (:func:`fninfluence.core.algebra.self_products`)."""
    return algebra.self_products(stats)


def _memory(workspace: Workspace) -> ScoreMemory:
    """``precondition`` returns its input; ``self_score`` forms the per-example gradients and their squares only
    when there are several tokens per example."""
    block = workspace.rows * workspace.gradient_elements * workspace.itemsize
    return ScoreMemory(precondition=0, self_score=2 * block if workspace.tokens > 1 else 0)


identity = CurvatureEstimator("identity", (), _precondition, _self_score, _memory)
