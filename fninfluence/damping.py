"""Choosing the damping from data, without retraining: the stationarity (Newton-decrement) criterion.

Influence functions need the curvature of the objective the model was *trained* on. The task only returns the
data loss, so whatever else shaped the trained parameters (an L2 penalty / weight decay, a proximity to a
starting point) is missing from the fitted curvature, and the damping stands in for it: with the damped
objective

    J_lambda(theta) = mean_n L(z_n; theta) + lambda/2 |theta - theta_0|^2

the scores ``<P_lambda(grad f), grad L(z_n)>`` (``P_lambda = (H + lambda I)^{-1}`` as the factors approximate it)
are the influence for ``J_lambda``. That is only the right objective if the trained ``theta`` is (close to) a
stationary point of ``J_lambda``. The criterion measures exactly that, per candidate, with the factors' own damped
inverse, as the squared Newton decrement of ``J_lambda`` at ``theta``::

    r_lambda = mean_n grad L(z_n; theta) + lambda (theta - theta_0),     c(lambda) = <r_lambda, P_lambda r_lambda>

``c(lambda)`` is twice the decrease a damped Newton step from ``theta`` would predict; it is 0 exactly when
``theta`` minimises the damped quadratic model. On ridge regression trained with ``l2/2 |theta|^2`` on a summed loss,
``r_lambda = 0`` at ``lambda = l2 / N`` (the factors are means over examples), so the criterion recovers the true
penalty. Cost: one gradient pass over ``train_data`` (no per-example gradients) plus one preconditioning per
candidate: a fraction of one :func:`fninfluence.pairwise_scores` call.

:func:`choose_damping` returns a :class:`DampingChoice`; pass ``choice.damping`` as ``damping=`` to the scoring
functions. See docs/evaluation.md ("Choosing the damping from data") for what it buys on LDS.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from numbers import Real
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .curvature.base import heuristic_damping
from .errors import InfluenceError
from .factors import Factors
from .refine import layout
from .run.data import Data, as_loader

Tensors = Dict[str, torch.Tensor]
CRITERIA = ("stationarity",)

__all__ = ["choose_damping", "DampingChoice", "default_candidates", "stationarity_estimate", "CRITERIA"]


@dataclass
class DampingChoice:
    """The chosen ``damping`` (one of ``candidates``; ``None`` is the per-layer heuristic) and the criterion's value
    for every candidate (``values[i]`` for ``candidates[i]``; lower is better). ``estimate`` is the continuous
    least-squares stationarity damping ``-<theta - theta_0, g> / |theta - theta_0|^2`` (may be <= 0, e.g. for a model
    trained without a penalty: then the smallest candidates win). ``seconds``: the wall time of the choice."""

    damping: Optional[float]
    candidates: List[Optional[float]]
    values: List[float]
    criterion: str
    estimate: float
    seconds: float

    def table(self) -> str:
        rows = ["| damping | criterion |", "|---|---|"]
        for candidate, value in zip(self.candidates, self.values):
            mark = " (chosen)" if candidate == self.damping else ""
            label = "None (0.1 x mean eigenvalue)" if candidate is None else f"{candidate:.3g}"
            rows.append(f"| {label}{mark} | {value:.4g} |")
        return "\n".join(rows)


def _check_candidates(candidates: Sequence) -> List[Optional[float]]:
    if isinstance(candidates, (str, bytes)) or not hasattr(candidates, "__iter__"):
        raise InfluenceError(f"candidates must be a sequence of dampings (numbers >= 0, or None), got {candidates!r}.")
    out = []
    for c in candidates:
        if c is None:
            out.append(None)
            continue
        if isinstance(c, bool) or not isinstance(c, Real) or not math.isfinite(c) or c < 0:
            raise InfluenceError(f"Each damping candidate must be a finite number >= 0 or None (the heuristic); "
                                 f"got {c!r}.")
        out.append(float(c))
    if not out:
        raise InfluenceError("candidates is empty: give at least one damping to choose from.")
    if len(set(out)) != len(out):
        raise InfluenceError(f"candidates has duplicates: {out}.")
    return out


def default_candidates(factors: Factors, decades: Tuple[int, int] = (-4, 1), per_decade: int = 2
                       ) -> List[Optional[float]]:
    """``None`` (the heuristic) and a log grid ``m x 10^k``, ``k`` from ``decades[0]`` to ``decades[1]`` in steps of
    ``1/per_decade``, with ``m`` the mean over layers of each layer's mean eigenvalue (``lambda``)."""
    means = [t["lambda"].to(torch.float64).mean().item() for t in factors.tensors.values() if "lambda" in t]
    means = [m for m in means if m > 0]
    if not means:
        raise InfluenceError("The factors have no positive fitted eigenvalues ('lambda') to scale default damping "
                             "candidates by (identity curvature?): pass candidates= explicitly.")
    scale = sum(means) / len(means)
    steps = range(decades[0] * per_decade, decades[1] * per_decade + 1)
    return [None] + [scale * 10 ** (k / per_decade) for k in steps]


def _batch_length(batch) -> int:
    """The number of examples in a batch: the leading size of its first tensor."""
    leaves = [x for x in torch.utils._pytree.tree_leaves(batch) if isinstance(x, torch.Tensor)]
    if not leaves:
        raise InfluenceError("Could not count the examples of a train_data batch: it holds no tensor.")
    return leaves[0].shape[0]


def _mean_gradient(model: nn.Module, task, names: List[str], train_data: Data, batch_size: Optional[int]
                   ) -> Tuple[Tensors, int]:
    """``{name: mean_n grad L(z_n)}`` over the tracked parameters, with the data's labels (``sample=False``)."""
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    device = params[0].device
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in zip(names, params)}
    count = 0
    for batch in as_loader(train_data, batch_size, "train_data"):
        batch = tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, batch)
        loss = task.compute_train_loss(batch, model, sample=False)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                total[n] += g.detach().to(torch.float64)
        count += _batch_length(batch)
    if count == 0:
        raise InfluenceError("train_data is empty.")
    return {n: t / count for n, t in total.items()}, count


def _layered(tensors: Tensors, specs) -> Tensors:
    return layout.to_layout({n: t[None] for n, t in tensors.items()}, specs)


def stationarity_estimate(gradient: Tensors, offset: Tensors) -> float:
    """``-<offset, gradient> / |offset|^2``: the damping that makes ``gradient + damping * offset`` smallest."""
    dot = sum((offset[k] * gradient[k]).sum() for k in gradient).item()
    norm = sum(offset[k].square().sum() for k in gradient).item()
    return -dot / norm if norm > 0 else float("nan")


def choose_damping(model: nn.Module, task, factors: Factors, train_data: Data, *,
                   candidates: Optional[Sequence[Optional[float]]] = None, criterion: str = "stationarity",
                   anchor: Optional[Dict[str, torch.Tensor]] = None, batch_size: Optional[int] = None
                   ) -> DampingChoice:
    """Choose the damping among ``candidates`` by the stationarity criterion (module docstring): the candidate
    ``lambda`` with the smallest squared Newton decrement ``<r, P_lambda r>``, ``r = mean grad L + lambda (theta -
    theta_0)``, of the damped training objective at the trained parameters.

    ``candidates``: absolute dampings (as ``damping=`` of :func:`fninfluence.pairwise_scores` takes them: one number
    for every layer), ``None`` meaning the heuristic 0.1 x mean eigenvalue per layer; default
    :func:`default_candidates`. ``anchor``: ``{parameter name: theta_0}`` the penalty pulls toward (default zeros,
    i.e. weight decay; pass the initial weights for a model regularised toward its initialisation). The tracked
    parameters are those of ``factors``. Deterministic (no sampling); ties go to the earlier candidate.
    """
    started = time.perf_counter()
    if criterion not in CRITERIA:
        raise InfluenceError(f"criterion must be one of {CRITERIA}, got {criterion!r}.")
    candidates = _check_candidates(default_candidates(factors) if candidates is None else candidates)
    specs = dict(factors.layers)
    names = layout.parameter_names(specs)
    named = dict(model.named_parameters())
    missing = [n for n in names if n not in named]
    if missing:
        raise InfluenceError(f"The factors' layers name parameters {missing} that the model does not have.")
    gradient, _ = _mean_gradient(model, task, names, train_data, batch_size)
    anchor = anchor or {}
    offset = {n: named[n].detach().to(torch.float64) - (anchor[n].to(named[n].device, torch.float64)
                                                        if n in anchor else 0.0) for n in names}
    g_layers, d_layers = _layered(gradient, specs), _layered(offset, specs)
    device = next(iter(g_layers.values())).device
    values = []
    for candidate in candidates:
        total = 0.0
        for layer in specs:
            layer_factors = {k: v.to(device) for k, v in factors.tensors[layer].items()}
            if candidate is None and "lambda" not in layer_factors:
                raise InfluenceError(f"Layer {layer!r} has no fitted 'lambda' for the heuristic damping (None).")
            damp = (heuristic_damping(layer_factors["lambda"].to(torch.float64), None) if candidate is None
                    else torch.tensor(candidate, dtype=torch.float64, device=device))
            residual = g_layers[layer] + damp * d_layers[layer]
            dtype = next((v.dtype for v in layer_factors.values() if v.is_floating_point()), torch.float32)
            wide = {k: (v.to(torch.float64) if v.is_floating_point() else v) for k, v in layer_factors.items()}
            try:
                pre = factors.estimator_for(layer).precondition(wide, residual, candidate)
            except RuntimeError:  # an estimator that keeps its working dtype
                pre = factors.estimator_for(layer).precondition(layer_factors, residual.to(dtype), candidate)
            total += (pre.to(torch.float64) * residual).sum().item()
        values.append(total)
    finite = [(v, i) for i, v in enumerate(values) if math.isfinite(v)]
    if not finite:
        raise InfluenceError(f"The criterion is not finite for any candidate ({values}); add positive dampings.")
    best = min(finite)[1]
    return DampingChoice(candidates[best], candidates, values, criterion, stationarity_estimate(gradient, offset),
                         time.perf_counter() - started)
