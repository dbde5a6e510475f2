"""Curvature estimators: identity, diagonal, KFAC and EKFAC, each a :class:`CurvatureEstimator` value."""

from __future__ import annotations

from typing import Dict, Union

from ..errors import InfluenceError
from .base import CurvatureEstimator, FitPass, default_self_score, heuristic_damping, per_example_grads
from .diagonal import diagonal
from .identity import identity
from .kfac import ekfac, kfac

ESTIMATORS: Dict[str, CurvatureEstimator] = {e.name: e for e in (identity, diagonal, kfac, ekfac)}


def get_estimator(strategy: Union[str, CurvatureEstimator]) -> CurvatureEstimator:
    """The estimator for a strategy name, or the estimator itself if one is given."""
    if isinstance(strategy, CurvatureEstimator):
        return strategy
    estimator = ESTIMATORS.get(str(strategy).lower())
    if estimator is None:
        raise InfluenceError(
            f"Unknown strategy {strategy!r}: choose one of {sorted(ESTIMATORS)} or pass a CurvatureEstimator."
        )
    return estimator


__all__ = [
    "CurvatureEstimator", "FitPass", "ESTIMATORS", "get_estimator", "identity", "diagonal", "kfac", "ekfac",
    "default_self_score", "heuristic_damping", "per_example_grads",
]
