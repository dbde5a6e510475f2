"""Oracles: slow, obviously-correct computations that the fast paths are checked against.

* :func:`per_example_gradients` — one ``torch.autograd.grad`` call per example, on a copy of the model;
* :func:`layer_gradients` — those gradients in the tap's ``[N, G, out, in]`` layout;
* :func:`dense_fisher` — the exact per-layer Fisher ``mean_n vec(G_n) vec(G_n)^T`` as a dense matrix;
* :func:`dense_influence` — scores through an explicit damped inverse of a dense curvature matrix;
* :func:`dense_ggn` / :func:`exact_ggn_influence` — the exact Gauss-Newton matrix over any parameters (via
  ``torch.func`` on the linearised model) and the scores through its damped inverse;
* :func:`ridge_solution`, :func:`ridge_leverages`, :func:`ridge_influence`, :func:`ridge_leave_one_out` —
  ridge regression, where influence divided by ``1 - leverage`` is exactly the leave-one-out change.
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


# -- exact dense GGN -------------------------------------------------------------------------------

class _Linearized(nn.Module):
    """``model`` linearised in its parameters around ``params``: ``f(x; p + delta) ~ f(x; p) + J delta``.

    ``delta`` is set before each call. The task sees this module in place of the model, so the loss it
    computes is a function of ``delta`` through a map that is exactly linear in ``delta``.
    """

    def __init__(self, model: nn.Module, params: Dict[str, torch.Tensor]):
        super().__init__()
        self.inner = [model]  # a list, so that the model is not registered as a submodule
        self.params = params
        self.delta: Dict[str, torch.Tensor] = {}

    def forward(self, *args, **kwargs):
        model = self.inner[0]
        names = list(self.delta)

        def call(*values):
            return torch.func.functional_call(model, {**self.params, **dict(zip(names, values))}, args, kwargs)

        output, tangent = torch.func.jvp(call, tuple(self.params[n] for n in names),
                                         tuple(self.delta[n] for n in names))
        return torch.utils._pytree.tree_map(torch.add, output, tangent)


def dense_ggn(model: nn.Module, task, data: Dataset, *, param_names: Optional[Iterable[str]] = None) -> torch.Tensor:
    """The exact Gauss-Newton matrix of the training loss, averaged over examples: ``[P, P]``.

    ``GGN = (1/N) sum_n J_n^T H_n J_n`` with ``J_n`` the Jacobian of the model's output on example n
    with respect to the parameters ``param_names`` (all by default, flattened and concatenated in that
    order) and ``H_n`` the Hessian of the loss with respect to that output. It is computed as the Hessian
    in ``delta`` of ``Task.compute_train_loss`` (with the data's labels) evaluated on the model linearised
    around its parameters, which is exactly ``J^T H J``. The same ``1/N`` scale as :func:`dense_fisher`
    and as fninfluence's factors. Small models only: it forms ``P x P``.
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params) if param_names is None else list(param_names)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    linearized = _Linearized(model, params)
    examples = list(_single_examples(data))
    batch = _stack_examples(examples)

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(flat, sizes)
        linearized.delta = {n: piece.reshape(shape) for n, piece, shape in zip(names, pieces, shapes)}
        return task.compute_train_loss(batch, linearized, sample=False)

    zero = torch.zeros(sum(sizes), dtype=params[names[0]].dtype, device=params[names[0]].device)
    return torch.func.hessian(loss_of)(zero) / len(examples)


def _stack_examples(examples) -> object:
    first = examples[0]
    if isinstance(first, (list, tuple)):
        return type(first)(torch.cat([e[i] for e in examples]) for i in range(len(first)))
    return torch.cat(examples)


def flat_gradients(grads: Dict[str, torch.Tensor], param_names: Optional[Iterable[str]] = None) -> torch.Tensor:
    """Per-example gradients ``{name: [N, ...]}`` flattened and concatenated in ``param_names`` order: ``[N, P]``."""
    names = list(grads) if param_names is None else list(param_names)
    return torch.cat([grads[n].flatten(1) for n in names], dim=1)


def exact_ggn_influence(model: nn.Module, task, query_data: Dataset, train_data: Dataset, *, damping: float,
                        param_names: Optional[Iterable[str]] = None) -> torch.Tensor:
    """``[Q, N]`` scores ``grad f(q)^T (GGN + damping I)^{-1} grad L(z_n)`` with the exact dense GGN of
    :func:`dense_ggn` over ``param_names`` (all parameters by default), in float64."""
    names = [n for n, _ in model.named_parameters()] if param_names is None else list(param_names)
    train = flat_gradients(per_example_gradients(model, task, train_data, param_names=names), names)
    queries = flat_gradients(per_example_gradients(model, task, query_data, objective="measurement",
                                                   param_names=names), names)
    return dense_influence(queries, train, dense_ggn(model, task, train_data, param_names=names), damping)


# -- ridge regression: exact leave-one-out ---------------------------------------------------------

def ridge_solution(x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """``theta = argmin sum_n (x_n^T theta - y_n)^2 / 2 + l2 |theta|^2 / 2 = (X^T X + l2 I)^{-1} X^T y``.

    ``x`` is ``[N, D]`` (append a column of ones for an intercept; it is penalised like the rest), ``y`` ``[N]``.
    """
    x, y = x.to(torch.float64), y.to(torch.float64)
    hessian = x.T @ x + l2 * torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.solve(hessian, x.T @ y)


def ridge_leverages(x: torch.Tensor, l2: float) -> torch.Tensor:
    """``h_n = x_n^T (X^T X + l2 I)^{-1} x_n``: ``[N]``, each in ``[0, 1)`` for ``l2 > 0``."""
    x = x.to(torch.float64)
    hessian = x.T @ x + l2 * torch.eye(x.shape[1], dtype=x.dtype)
    return (x * torch.linalg.solve(hessian, x.T).T).sum(1)


def ridge_influence(x: torch.Tensor, y: torch.Tensor, l2: float, x_query: torch.Tensor) -> torch.Tensor:
    """``[Q, N]`` exact-Hessian influence on the query predictions ``x_q^T theta``:
    ``x_q^T H^{-1} grad L_n`` with ``H = X^T X + l2 I`` and ``grad L_n = x_n (x_n^T theta - y_n)``.

    fninfluence's sign: positive when upweighting example n lowers the prediction.
    """
    x, y, x_query = x.to(torch.float64), y.to(torch.float64), x_query.to(torch.float64)
    theta = ridge_solution(x, y, l2)
    hessian = x.T @ x + l2 * torch.eye(x.shape[1], dtype=x.dtype)
    train_grads = x * (x @ theta - y)[:, None]
    return torch.linalg.solve(hessian, x_query.T).T @ train_grads.T


def ridge_leave_one_out(x: torch.Tensor, y: torch.Tensor, l2: float, x_query: torch.Tensor) -> torch.Tensor:
    """``[Q, N]``: the exact change ``x_q^T (theta_{-n} - theta)`` of each query prediction when example n is
    removed and the ridge regression is solved again from scratch (N + 1 solves, no approximation).

    It equals ``ridge_influence / (1 - ridge_leverages)`` (Sherman-Morrison): removing a point moves the
    optimum by exactly one Newton step of the remaining, quadratic, objective.
    """
    x, y, x_query = x.to(torch.float64), y.to(torch.float64), x_query.to(torch.float64)
    full = x_query @ ridge_solution(x, y, l2)
    keep = ~torch.eye(x.shape[0], dtype=torch.bool)
    return torch.stack([x_query @ ridge_solution(x[k], y[k], l2) - full for k in keep], dim=1)
