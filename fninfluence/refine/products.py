"""Exact curvature-vector products over the tracked parameters, by ``torch.func`` on the user's model and task.

Each product maps ``{name: [K, *shape]}`` (K vectors, e.g. one per query) to ``H v`` with ``H`` the curvature
averaged over the examples of the curvature data (fninfluence's factors are means over examples too):

* ``"ggn"``: the Gauss-Newton matrix ``(1/N) sum_n J_n^T H_n J_n``, the noise-free limit of the true Fisher
  (the default factors, sampled labels) for the usual losses (cross-entropy on logits, squared error). The task
  only returns a loss, not the model's output, so the loss is taken of the model *linearised* in the tracked
  parameters, ``f(x; theta) + J delta`` (the task is handed a stand-in module whose call returns that); the
  Hessian in ``delta`` of that loss is exactly ``J^T H J``. The product is forward-over-reverse,
  ``jvp(grad(loss))``, vmapped over the K vectors. The task must compute its loss by calling ``model(...)``
  (not submodules of it); the stand-in passes other attribute reads through to the model.
* ``"empirical_fisher"``: ``(1/N) sum_n g_n g_n^T`` with ``g_n`` the gradient of example n's loss with the data's
  labels (what factors fitted with ``use_empirical_fisher=True`` estimate): per-example gradients by
  ``vmap(grad)`` over batches of one, then two matrix products. Kept in memory when they fit ``cache_bytes``.
* ``"hessian"``: the Hessian of the summed training loss (labels of the data), ``jvp(grad(loss))``. Not
  positive semi-definite away from a minimum: conjugate gradients stop a query on negative curvature.

Every product uses the data's labels (``sample=False``), so it is the same matrix at every call: an iterative
solver needs that. ``N`` is the number of examples in the curvature data.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..capture import batch_examples
from ..errors import InfluenceError

Tensors = Dict[str, torch.Tensor]
KINDS = ("ggn", "empirical_fisher", "hessian")


class CurvatureProduct(NamedTuple):
    """``H v`` for ``{name: [K, *shape]}``; ``kind`` one of :data:`KINDS`, ``examples`` the N it averages over."""

    kind: str
    examples: int
    product: Callable[[Tensors], Tensors]

    def __call__(self, vectors: Tensors) -> Tensors:
        return self.product(vectors)


class _TaskLoss(nn.Module):
    """``task.compute_train_loss(batch, model)`` as a module, so that ``functional_call`` swaps the parameters."""

    def __init__(self, model: nn.Module, task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch):
        return self.task.compute_train_loss(batch, self.model, sample=False)


class _StandIn(nn.Module):
    """What the task is handed in place of the model for the GGN: its ``i``-th call returns ``outputs[i]``, the
    model's output at that call, given from outside (recorded on the first call, then replayed).

    Attributes it does not have (``config``, custom methods) are read from the model.
    """

    def __init__(self, model: nn.Module, params: Tensors, outputs: Optional[List[Any]] = None):
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_state", (params, outputs, []))

    def forward(self, *args, **kwargs):
        params, outputs, calls = self._state
        calls.append((args, kwargs))
        if outputs is None:  # recording: the model's own output
            return torch.func.functional_call(self._model, params, args, kwargs)
        if len(calls) > len(outputs):
            raise InfluenceError("The task called the model more often than when its calls were recorded.")
        return outputs[len(calls) - 1]

    @property
    def calls(self) -> List[Tuple[tuple, dict]]:
        return self._state[2]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_model"), name)


def _summed(per_batch: Callable[[Any, Tensors], Tensors], batches: Sequence, examples: int) -> Callable:
    """``v -> (1/N) sum_batches per_batch(batch, v)``."""

    def product(vectors: Tensors) -> Tensors:
        total = None
        for batch in batches:
            part = per_batch(batch, vectors)
            total = part if total is None else {n: total[n] + part[n] for n in total}
        return {n: value / examples for n, value in total.items()}

    return product


def _ggn(model: nn.Module, task, params: Tensors, names: List[str]) -> Callable[[Any, Tensors], Tensors]:
    """``J^T H J v`` per batch: the task's calls of the model are recorded once per batch (arguments and outputs
    ``f``); then ``J v`` by ``jvp`` of those calls in the tracked parameters, ``H u`` by ``jvp(grad)`` of the task's
    loss in the outputs (the model is not run again for it), and ``J^T`` by ``vjp``; all vmapped over the K vectors.
    The arguments of the task's calls must not depend on the outputs of its earlier calls."""
    point = {n: params[n] for n in names}

    def per_batch(batch, vectors: Tensors) -> Tensors:
        with torch.no_grad():
            recorder = _StandIn(model, params)
            task.compute_train_loss(batch, recorder, sample=False)
        if not recorder.calls:
            raise InfluenceError("The GGN product needs the task to call model(...) in compute_train_loss; "
                                 "pass curvature='empirical_fisher' or 'hessian'.")
        calls = recorder.calls

        def outputs_of(tracked: Tensors) -> List[Any]:
            values = {**params, **tracked}
            return [torch.func.functional_call(model, values, args, kwargs) for args, kwargs in calls]

        def loss_of(outputs: List[Any]) -> torch.Tensor:
            return task.compute_train_loss(batch, _StandIn(model, params, outputs), sample=False)

        outputs, pullback = torch.func.vjp(outputs_of, point)
        outputs = tree_map(torch.Tensor.detach, outputs)
        output_gradient = torch.func.grad(loss_of)

        def product(v: Tensors) -> Tensors:
            _, jv = torch.func.jvp(outputs_of, (point,), (v,))
            _, hjv = torch.func.jvp(output_gradient, (outputs,), (jv,))
            return pullback(hjv)[0]

        return torch.func.vmap(product)(vectors)

    return per_batch


def _loss_of(model: nn.Module, task, params: Tensors) -> Callable[[Tensors, Any], torch.Tensor]:
    """``(tracked parameters, batch) -> summed training loss`` with the data's labels."""
    wrapper = _TaskLoss(model, task)

    def loss(tracked: Tensors, batch) -> torch.Tensor:
        values = {"model." + n: v for n, v in {**params, **tracked}.items()}
        return torch.func.functional_call(wrapper, values, (batch,))

    return loss


def _hessian(model: nn.Module, task, params: Tensors, names: List[str]) -> Callable[[Any, Tensors], Tensors]:
    loss = _loss_of(model, task, params)
    point = {n: params[n] for n in names}

    def per_batch(batch, vectors: Tensors) -> Tensors:
        gradient = torch.func.grad(lambda tracked: loss(tracked, batch))
        return torch.func.vmap(lambda v: torch.func.jvp(gradient, (point,), (v,))[1])(vectors)

    return per_batch


def example_gradients(model: nn.Module, task, params: Tensors, names: List[str]) -> Callable[[Any], Tensors]:
    """``batch -> {name: [B, *shape]}``: each example's training-loss gradient, by ``vmap(grad)`` over batches
    of one (dimension 0 of every tensor of the batch is the example)."""
    loss = _loss_of(model, task, params)
    point = {n: params[n] for n in names}

    def one(tracked, example):
        return loss(tracked, tree_map(lambda x: x.unsqueeze(0) if isinstance(x, torch.Tensor) else x, example))

    def gradients(batch) -> Tensors:
        in_dims = tree_map(lambda x: 0 if isinstance(x, torch.Tensor) else None, batch)
        return torch.func.vmap(torch.func.grad(one), in_dims=(None, in_dims))(point, batch)

    return gradients


def _outer_products(grads: Tensors, vectors: Tensors) -> Tensors:
    """``sum_n g_n <g_n, v_k>`` for every k: ``[K, *shape]``."""
    coefficients = sum(vectors[n].flatten(1) @ grads[n].flatten(1).T for n in grads)  # [K, B]
    return {n: (coefficients @ g.flatten(1)).reshape(vectors[n].shape) for n, g in grads.items()}


def _empirical_fisher(gradients: Callable[[Any], Tensors], batches: Sequence, per_example_bytes: int,
                      cache_bytes: int) -> Callable[[Any, Tensors], Tensors]:
    """Per batch ``sum_n g_n g_n^T v``; the per-example gradients are kept (keyed by batch) when all of them fit
    in ``cache_bytes``."""
    keep = per_example_bytes * sum(batch_examples(b) for b in batches) <= cache_bytes
    kept: Dict[int, Tensors] = {}

    def per_batch(batch, vectors: Tensors) -> Tensors:
        grads = kept.get(id(batch)) if keep else None
        if grads is None:
            grads = gradients(batch)
            if keep:
                kept[id(batch)] = grads
        return _outer_products(grads, vectors)

    return per_batch


def curvature_product(kind: str, model: nn.Module, task, names: List[str], batches: Sequence,
                      cache_bytes: int = 2 ** 29) -> CurvatureProduct:
    """The product of ``kind`` (one of :data:`KINDS`) over the tracked parameters ``names``, averaged over the
    examples of ``batches`` (a list of batches on the model's device, read at every product)."""
    if kind not in KINDS:
        raise InfluenceError(f"curvature must be one of {KINDS}, got {kind!r}.")
    params = {n: p.detach() for n, p in model.named_parameters()}
    examples = sum(batch_examples(b) for b in batches)
    if examples == 0:
        raise InfluenceError("curvature_data is empty: the curvature products need examples.")
    if kind == "ggn":
        per_batch = _ggn(model, task, params, names)
    elif kind == "hessian":
        per_batch = _hessian(model, task, params, names)
    else:
        size = sum(params[n].numel() * params[n].element_size() for n in names)
        per_batch = _empirical_fisher(example_gradients(model, task, params, names), batches, size, cache_bytes)
    return CurvatureProduct(kind, examples, _summed(per_batch, batches, examples))
