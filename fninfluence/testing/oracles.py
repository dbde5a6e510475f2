"""Oracles: slow, obviously-correct computations that the fast paths are checked against.

* :func:`per_example_gradients` — one ``torch.autograd.grad`` call per example, on a copy of the model;
* :func:`layer_gradients` — those gradients in the tap's ``[N, G, out, in]`` layout;
* :func:`dense_fisher` — the exact per-layer Fisher ``mean_n vec(G_n) vec(G_n)^T`` as a dense matrix;
* :func:`dense_influence` — scores through an explicit damped inverse of a dense curvature matrix.
"""

from __future__ import annotations

import copy
from typing import Dict, Iterable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..capture import LayerSpec, weight_as_matrix


def _single_examples(data: Dataset) -> Iterable:
    return DataLoader(data, batch_size=1, shuffle=False)


def per_example_gradients(
    model: nn.Module, task, data: Dataset, *, objective: str = "train", param_names: Optional[Iterable[str]] = None,
) -> Dict[str, torch.Tensor]:
    """``{param name: [N, *param shape]}``: the gradient of each example's loss (or measurement), one at a time."""
    model = copy.deepcopy(model)
    named = dict(model.named_parameters())
    names = list(named) if param_names is None else list(param_names)
    params = [named[n] for n in names]
    device = params[0].device
    rows = {n: [] for n in names}
    for example in _single_examples(data):
        example = [x.to(device) if isinstance(x, torch.Tensor) else x for x in example] if isinstance(example, (list, tuple)) else example
        if objective == "train":
            value = task.compute_train_loss(example, model, sample=False)
        elif objective == "measurement":
            value = task.compute_measurement(example, model)
        else:
            raise ValueError(f"objective must be 'train' or 'measurement', got {objective!r}")
        grads = torch.autograd.grad(value, params, allow_unused=True)
        for n, p, g in zip(names, params, grads):
            rows[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(r) for n, r in rows.items()}


def layer_gradients(grads: Dict[str, torch.Tensor], specs: Dict[str, LayerSpec]) -> Dict[str, torch.Tensor]:
    """Per-example parameter gradients of each tracked layer in the tap's ``[N, G, out, in]`` layout."""
    out = {}
    for layer, spec in specs.items():
        if spec.op == "parameters":  # a rank-one "layer": the flattened, concatenated parameter gradients
            flat = torch.cat([grads[name].flatten(1) for name in spec.parameters], dim=1)
            out[layer] = flat[:, None, None, :]
            continue
        w = grads[spec.weight]
        b = grads[spec.bias] if spec.has_bias else None
        out[layer] = torch.stack([weight_as_matrix(w[n], None if b is None else b[n], spec.groups, spec.op)
                                  for n in range(w.shape[0])])
    return out


def dense_fisher(layer_grads: torch.Tensor) -> torch.Tensor:
    """``mean_n vec(G_n) vec(G_n)^T`` for per-example gradients ``[N, ...]``."""
    flat = layer_grads.flatten(1)
    return flat.T @ flat / flat.shape[0]


def dense_influence(query_grads: torch.Tensor, train_grads: torch.Tensor, curvature: torch.Tensor,
                    damping: float) -> torch.Tensor:
    """``[Q, N]`` scores ``vec(q)^T (C + damping I)^{-1} vec(g)`` with an explicit dense solve."""
    q = query_grads.flatten(1).to(torch.float64)
    g = train_grads.flatten(1).to(torch.float64)
    c = curvature.to(torch.float64)
    solved = torch.linalg.solve(c + damping * torch.eye(c.shape[0], dtype=c.dtype, device=c.device), q.T)
    return solved.T @ g.T
