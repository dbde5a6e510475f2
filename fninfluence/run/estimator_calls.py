"""An estimator's functions called with their results checked: a custom estimator whose output has another
shape or other keys would otherwise broadcast silently against the gradients or the scores."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import torch

from ..core.statistics import LayerStatistic, of_stats
from ..errors import InfluenceError


def shaped(value: Any, expected: Tuple[int, ...], what: str, layer: str) -> torch.Tensor:
    """``value`` if it is a tensor of shape ``expected``, else an error naming the estimator's function."""
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(expected):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise InfluenceError(
            f"The estimator's {what} returned {got} for layer {layer!r}; it must return shape "
            f"{tuple(expected)} (see fninfluence.curvature.base for each function's contract)."
        )
    return value


def updated(fit_pass, state: Dict[str, torch.Tensor], stats, earlier, layer: str) -> Dict[str, torch.Tensor]:
    """``fit_pass.update`` with its result checked against the state's keys and shapes."""
    new = fit_pass.update(state, stats, earlier)
    if not isinstance(new, Mapping) or set(new) != set(state):
        raise InfluenceError(
            f"The estimator's {fit_pass.name} update returned keys "
            f"{sorted(new) if isinstance(new, Mapping) else type(new).__name__} for layer {layer!r}; it must return "
            f"the state's keys {sorted(state)}."
        )
    return {key: shaped(value, state[key].shape, f"{fit_pass.name} update [{key!r}]", layer)
            for key, value in new.items()}


def preconditioned(estimator, layer: str, layer_factors, grads: torch.Tensor, damping) -> torch.Tensor:
    """``estimator.precondition`` of ``[N, G, out, in]`` gradients, checked to keep their shape."""
    result = estimator.precondition(layer_factors, grads, damping)
    return shaped(result, grads.shape, f"({estimator.name}) precondition", layer)


def pass_statistic(fit_pass, like: Dict[str, torch.Tensor], earlier, layer: str) -> LayerStatistic:
    """One batch's contribution to a layer's pass state, as a statistic the tap can stream: the pass's own split
    (``FitPass.statistic``), else ``update(zeros, stats, earlier)`` on the layer's whole batch statistics (states
    are sums over examples, so that is the contribution, and the state plus it is ``update(state, stats, ...)``).
    ``like`` is a state of the pass: only its keys, shapes and dtypes are read."""
    if fit_pass.statistic is not None:
        return fit_pass.statistic(like, earlier)
    zeros = lambda: {key: torch.zeros_like(value) for key, value in like.items()}  # noqa: E731
    return of_stats(lambda stats: updated(fit_pass, zeros(), stats, earlier, layer), lambda examples, tokens: zeros())


def checked_contribution(fit_pass, state: Dict[str, torch.Tensor], contribution, layer: str) -> Dict[str, torch.Tensor]:
    """A batch's contribution to a layer's pass state, checked to have the state's keys and shapes (the state is
    then ``state + contribution``)."""
    if set(contribution) != set(state):
        raise InfluenceError(
            f"The estimator's {fit_pass.name} statistic gave keys {sorted(contribution)} for layer {layer!r}; it must "
            f"give the state's keys {sorted(state)}.")
    return {key: shaped(contribution[key], value.shape, f"{fit_pass.name} statistic [{key!r}]", layer)
            for key, value in state.items()}
