"""Scores a user sees are finite, or the call fails saying why.

A NaN or Inf enters an influence computation in one of a few places, and each needs a different fix:

- the loss itself (bad inputs or weights): :func:`fninfluence.capture.check_finite`'s message;
- the gradients, while the loss is finite (``sqrt`` or ``norm`` at 0, an Inf input under a layer whose output
  saturates, a custom autograd function): the batch's inputs or the model's forward need fixing;
- the preconditioning, while the gradients are finite (damping 0 on a singular curvature divides by 0): use
  a positive damping or ``None`` (the heuristic);
- the contraction, while both sides are finite (an overflow in a low-precision score dtype).

Each per-batch step returns :func:`finite_flags` of its stages, one small bool tensor (one flag per stage
and layer) computed inside the (possibly compiled) step, so a batch costs one device sync however many
stages are checked, and no checked tensor outlives the step; :func:`raise_not_finite` names the first stage
that failed and its layers.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch.utils._pytree import tree_leaves

from ..capture import check_finite
from ..capture.stream import all_finite_values
from ..errors import InfluenceError

GRADIENTS = (
    "Their gradients hold NaN or Inf although the loss is finite: look for an operation whose derivative is "
    "infinite or undefined where it is used (sqrt or norm at 0, log of 0, pow with a negative base), or Inf/NaN "
    "values in the batch's inputs."
)
PRECONDITIONED = (
    "Their preconditioned gradients hold NaN or Inf although the gradients are finite: the curvature is singular "
    "(some eigenvalues are 0) and the damping is 0 or too small to invert it. Pass a positive damping=, or "
    "damping=None (0.1 x the mean eigenvalue per layer)."
)
STATISTICS = (
    "The layer inputs or output gradients hold NaN or Inf although the loss is finite: look for Inf/NaN values in "
    "the batch's inputs, or an operation whose derivative is infinite or undefined where it is used (sqrt or norm "
    "at 0, log of 0)."
)
SCORES = (
    "The scores overflowed although both gradients are finite: compute scores in a wider dtype "
    "(Precision(score_dtype=torch.float32) or float64)."
)
FACTORS = (
    "The fitted factors hold NaN or Inf: the training data's layer inputs or output gradients overflowed. Check "
    "the inputs for very large or infinite values, or fit in a wider dtype (Precision(covariance_dtype=torch.float64))."
)


def all_finite(tree: Any) -> torch.Tensor:
    """A 0-dim bool tensor: is every floating-point tensor in ``tree`` finite? A bool tensor in ``tree`` is a
    flag checked already (e.g. a streamed layer's, see :meth:`fninfluence.capture.ModelTap.layer_values`)."""
    checks = [t.all() if t.dtype == torch.bool else all_finite_values(t) for t in tree_leaves(tree)
              if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.dtype == torch.bool)]
    if not checks:
        raise ValueError("all_finite needs at least one floating-point tensor")
    return torch.stack(checks).all()


def finite_flags(loss: torch.Tensor, *stages: Mapping[str, Any]) -> torch.Tensor:
    """``[1 + sum_k len(stages[k])]`` bools: is the loss finite, then is each layer of each stage finite
    (layers in sorted order). Only these flags leave the step, not the stages' tensors, so checking keeps
    no batch-sized tensor alive."""
    return torch.stack([torch.isfinite(loss).all()] + [all_finite(stage[layer]) for stage in stages
                                                        for layer in sorted(stage)])


def raise_not_finite(flags: torch.Tensor, loss: torch.Tensor, objective: str, batch_index: int,
                     stages: Sequence[Sequence[str]], messages: Sequence[str], what: str) -> None:
    """Raise for the first stage with a layer whose flag is False, naming those layers; nothing if all are True.

    ``stages[k]`` holds the layer names of stage ``k`` (as given to :func:`finite_flags`), ``messages[k]`` its
    explanation.
    """
    flags = flags.tolist()  # the one device sync of this batch
    if all(flags):
        return
    check_finite(loss, objective, batch_index)
    position = 1
    for layers, message in zip(stages, messages):
        layers = sorted(layers)
        bad = [layer for layer, ok in zip(layers, flags[position:position + len(layers)]) if not ok]
        position += len(layers)
        if bad:
            raise InfluenceError(f"{what} of layers {bad} on batch {batch_index}: {message}")


def check_factors(tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Refuse fitted factors that hold NaN or Inf (they would make every score NaN)."""
    bad = sorted(layer for layer, value in tensors.items()
                 if any(t.is_floating_point() for t in value.values()) and not bool(all_finite(value)))
    if bad:
        raise InfluenceError(f"Factors of layers {bad}: {FACTORS}")
