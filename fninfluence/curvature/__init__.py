"""Curvature estimators: identity, diagonal, KFAC and EKFAC, each a :class:`CurvatureEstimator` value."""

from __future__ import annotations

from typing import Dict, List, Mapping, Union

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


def resolve_strategies(strategy, layers) -> Dict[str, CurvatureEstimator]:
    """One estimator per layer: ``strategy`` for all of them, or a mapping ``{layer name: strategy}`` in which
    the key ``"*"`` (if present) covers every layer not named."""
    layers = list(layers)
    if not isinstance(strategy, Mapping):
        estimator = get_estimator(strategy)
        return {layer: estimator for layer in layers}
    unknown = sorted(set(strategy) - set(layers) - {"*"})
    if unknown:
        raise InfluenceError(f"strategy names layers {unknown} that are not tracked; tracked layers: {layers}.")
    missing = [layer for layer in layers if layer not in strategy and "*" not in strategy]
    if missing:
        raise InfluenceError(f"strategy gives no strategy for layers {missing}: name them or add a '*' default.")
    return {layer: get_estimator(strategy.get(layer, strategy.get("*"))) for layer in layers}


def pass_order(estimators: Mapping[str, CurvatureEstimator]) -> List[str]:
    """The names of all passes of the layers' estimators, each once, in the order they first appear."""
    order: List[str] = []
    for estimator in estimators.values():
        for fit_pass in estimator.passes:
            if fit_pass.name not in order:
                order.append(fit_pass.name)
    return order


__all__ = ["resolve_strategies", "pass_order", 
    "CurvatureEstimator", "FitPass", "ESTIMATORS", "get_estimator", "identity", "diagonal", "kfac", "ekfac",
    "default_self_score", "heuristic_damping", "per_example_grads",
]
