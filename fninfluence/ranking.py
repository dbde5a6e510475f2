"""Ranking training examples by their scores: top proponents and opponents, ignoring missing entries."""

from __future__ import annotations

from typing import Tuple

import torch

from .errors import InfluenceError


def as_score_matrix(scores, name: str = "scores") -> torch.Tensor:
    """``scores`` as a float64 ``[queries, training examples]`` matrix on the CPU (a clear error otherwise)."""
    scores = torch.as_tensor(scores).detach().to("cpu", torch.float64)
    if scores.dim() != 2:
        raise InfluenceError(f"{name} must be a [queries, training examples] matrix, got shape {tuple(scores.shape)}; "
                             "for per-token scores sum over the last dimension first.")
    return scores


def top_indices(scores, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(proponents, opponents)``, each ``[Q, k]``: per query, the training indices with the largest and the
    most negative scores, strongest first. NaN entries (not yet computed) are never chosen."""
    scores = as_score_matrix(scores)
    written = int(torch.isfinite(scores).sum(1).min()) if scores.numel() else 0
    if not isinstance(k, int) or not 1 <= k <= written:
        raise InfluenceError(
            f"k must be between 1 and the number of scored training examples ({written} for every query), got {k!r}."
        )
    missing = torch.isnan(scores)
    proponents = scores.masked_fill(missing, float("-inf")).topk(k, dim=1).indices
    opponents = (-scores).masked_fill(missing, float("-inf")).topk(k, dim=1).indices
    return proponents, opponents
