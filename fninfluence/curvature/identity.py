"""Identity curvature: scores are plain gradient inner products, ``P(G) = G``."""

from __future__ import annotations

import torch

from ..core import algebra
from .base import CurvatureEstimator, Damping, Tensors


def _precondition(factors: Tensors, grads: torch.Tensor, damping: Damping) -> torch.Tensor:
    return grads


def _self_score(factors: Tensors, stats, damping: Damping) -> torch.Tensor:
    """``|G_n|^2``, without forming ``G_n`` where a closed form exists (:func:`fninfluence.core.algebra.self_products`)."""
    return algebra.self_products(stats)


identity = CurvatureEstimator("identity", (), _precondition, _self_score)
