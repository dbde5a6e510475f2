"""Curvature estimators: identity, diagonal, KFAC and EKFAC, each a :class:`CurvatureEstimator` value."""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, NamedTuple, Union

import torch

from ..errors import InfluenceError
from .base import (MAX_DENSE_PARAMETER_LAYER, CurvatureEstimator, FitPass, LayerShape, PassMemory, ScoreMemory,
                   Tensors, Workspace, default_pass_memory, default_score_memory, default_self_score,
                   heuristic_damping, per_example_grads)
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
            f"Unknown strategy {strategy!r}: choose one of {sorted(ESTIMATORS)} or pass a CurvatureEstimator as the "
            "strategy (e.g. fit_factors(..., strategy=my_estimator))."
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
    """The names of all passes of the layers' estimators, each once, in the order they first appear.

    Passes of one name run in one pass over the data, so they must agree on what they read."""
    order: List[str] = []
    reads: Dict[str, bool] = {}
    for estimator in estimators.values():
        for fit_pass in estimator.passes:
            if reads.setdefault(fit_pass.name, fit_pass.reads_raw_statistics) != fit_pass.reads_raw_statistics:
                raise InfluenceError(
                    f"Two estimators have a pass named {fit_pass.name!r}, one reading raw layer statistics and one "
                    "post-processed per-example gradients (FitPass.raw_statistics): they cannot share a pass over "
                    "the data. Give one of them another name (fit_pass._replace(name=...)).")
            if fit_pass.name not in order:
                order.append(fit_pass.name)
    return order


def pass_declaration(fit_passes: Mapping[str, FitPass]) -> FitPass:
    """The pass that speaks for the layers' passes of one name (``{layer: pass}``) in a data pass: what it reads
    (``reads_raw_statistics``), hence its dtypes (``Precision.fit_dtypes``); :func:`pass_order` checked they agree."""
    return next(iter(fit_passes.values()))


class MetaPass(NamedTuple):
    """One pass at one layer run on the meta device: its state, its outputs and the factors before it."""

    state: Tensors
    outputs: Tensors
    earlier: Tensors


def meta_passes(estimator: CurvatureEstimator, shape: LayerShape,
                state_dtype: Callable[[FitPass], torch.dtype]) -> Dict[str, MetaPass]:
    """``{pass name: MetaPass}`` of one layer: each pass's ``init`` and then ``finalize`` (fed the outputs of the
    passes before it) on the meta device, which gives every shape and dtype and allocates nothing."""
    meta, earlier, passes = torch.device("meta"), {}, {}
    for fit_pass in estimator.passes:
        state = fit_pass.init(shape, state_dtype(fit_pass), meta)
        outputs = fit_pass.finalize(state, earlier)
        passes[fit_pass.name] = MetaPass(state, outputs, earlier)
        earlier = {**earlier, **outputs}
    return passes


def strategy_label(estimators: Mapping[str, CurvatureEstimator]) -> str:
    """The estimators' name, or ``"mixed"`` when the layers have several."""
    names = sorted({e.name for e in estimators.values()})
    return names[0] if len(names) == 1 else "mixed"


def dense_parameter_layers(estimators: Mapping[str, CurvatureEstimator], specs: Mapping) -> Dict[str, int]:
    """``{layer: P}`` of the parameter layers (modules tracked through their own P parameters, e.g. norms) with
    P above :data:`MAX_DENSE_PARAMETER_LAYER` whose estimator has a pass forming a dense ``[P, P]`` block."""
    return {name: spec.in_features for name, spec in specs.items()
            if spec.op == "parameters" and spec.in_features > MAX_DENSE_PARAMETER_LAYER
            and any(p.forms_dense_block for p in estimators[name].passes)}


def check_parameter_layers(estimators: Mapping[str, CurvatureEstimator], specs: Mapping) -> None:
    """Refuse an exact ``[P, P]`` curvature block (KFAC/EKFAC's A) on a large parameter layer."""
    large = dense_parameter_layers(estimators, specs)
    if large:
        raise InfluenceError(
            f"Parameter layers {large} (modules tracked through their own parameters, e.g. norms) would need a "
            f"[P, P] curvature block with {strategy_label({n: estimators[n] for n in large})}; above "
            f"{MAX_DENSE_PARAMETER_LAYER} parameters use strategy='diagonal' or 'identity' for them (e.g. "
            "strategy={'*': 'ekfac', '<layer>': 'diagonal'}), or leave them out of Task.tracked_modules()."
        )


__all__ = [
    "resolve_strategies", "pass_order", "pass_declaration", "strategy_label", "dense_parameter_layers",
    "check_parameter_layers", "MAX_DENSE_PARAMETER_LAYER", "MetaPass", "meta_passes",
    "CurvatureEstimator", "FitPass", "PassMemory", "ScoreMemory", "Workspace", "ESTIMATORS", "get_estimator",
    "identity", "diagonal", "kfac", "ekfac", "default_pass_memory", "default_score_memory",
    "default_self_score", "heuristic_damping", "per_example_grads",
]
