"""Is the objective a sum over the batch's examples? A cheap check, run once per (model, task, objective).

Per-example gradients are read off the gradient of the objective on a batch, so the training loss and the
measurement must be **sums** over examples (and tokens): a mean divides every example's gradient, and so every
score, by the batch size (or the number of tokens), silently. :func:`check_summed` compares the objective on a batch
with its values on the batch's two halves, computed with one extra forward pass (the halves together) and no
gradients:

* a sum gives ``f(batch) = f(first half) + f(second half)``: accepted;
* a mean over the examples gives ``f(batch) = (n1 f(first) + n2 f(second)) / n``, and a mean over the tokens
  (``Task.get_attention_mask``) ``(t1 f(first) + t2 f(second)) / t``: refused with an :class:`InfluenceError`
  when the batch tells a sum from that mean clearly (it is certain then);
* anything else (the examples of a batch interact: in-batch negatives, a batch-level normalisation, a mean with a
  mask the task does not report ...) gets an :class:`~fninfluence.errors.InfluenceWarning`, since per-example
  gradients then depend on which examples share a batch, but a loss may do that on purpose. Not for the training
  loss with sampled labels: labels drawn by a random function that is not answered per example (``randperm`` ...)
  differ between a batch and its halves, so only a mean is reported there.

Only batches that split safely are checked: at least two examples, and every leaf of the batch a tensor whose first
dimension is the batch (0-dim tensors and ``None`` are shared by both halves). A batch holding anything else
(strings, per-example lists, tensors of another length), or an objective that fails on the halves (a model built
for a fixed batch size), is not checked.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import InfluenceError, InfluenceWarning

#: how much clearer than the tolerance a mean must be told from a sum before it is refused
MARGIN = 4.0


def split_in_halves(batch: Any, examples: int) -> Optional[Tuple[Any, Any]]:
    """The batch's first ``examples // 2`` examples and the rest, or None when the batch does not split safely."""
    if examples < 2:
        return None
    leaves, spec = tree_flatten(batch)
    if not any(isinstance(leaf, torch.Tensor) and leaf.dim() > 0 for leaf in leaves):
        return None
    for leaf in leaves:
        if leaf is None or (isinstance(leaf, torch.Tensor) and (leaf.dim() == 0 or leaf.shape[0] == examples)):
            continue
        return None
    cut = examples // 2
    first = [leaf[:cut] if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 else leaf for leaf in leaves]
    second = [leaf[cut:] if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 else leaf for leaf in leaves]
    return tree_unflatten(first, spec), tree_unflatten(second, spec)


def _tokens(mask: Any, examples: int, cut: int) -> Optional[Tuple[float, float]]:
    """The tokens that count in each half, from a ``[batch, tokens]`` attention mask (None: no such mask)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() < 1 or mask.shape[0] != examples:
        return None
    counts = mask.detach().reshape(examples, -1).to(torch.float64).sum(1)
    first, second = float(counts[:cut].sum()), float(counts[cut:].sum())
    return (first, second) if first > 0 and second > 0 else None


def tolerance(*dtypes: torch.dtype, accelerator: bool = False) -> float:
    """The relative tolerance of ``f(batch) = f(half) + f(half)``: the square root of the widest rounding unit among
    ``dtypes`` (float32 on an accelerator may run matmuls in TF32)."""
    eps = max(torch.finfo(dtype).eps for dtype in dtypes if dtype is not None and dtype.is_floating_point)
    if accelerator and torch.float32 in dtypes:
        eps = max(eps, 2.0 ** -10)
    return math.sqrt(eps)


def check_summed(objective: Callable[[Any], torch.Tensor], batch: Any, examples: int, name: str, fix: str,
                 loss: Optional[torch.Tensor], mask: Any, tol: float, warn: bool = True) -> None:
    """Raise (a mean) or warn (not a sum) unless ``objective`` (``batch -> scalar``, run without gradients) is a sum
    over the examples of ``batch``. ``loss``: ``objective(batch)`` when the caller has it already (None: computed
    here). ``name`` names the objective in messages, ``fix`` is the clause that says how to return a sum.
    ``warn=False``: only a mean is reported (sampled labels may differ between the batch and its halves)."""
    halves = split_in_halves(batch, examples)
    if halves is None:
        return
    try:
        with torch.no_grad():
            whole = objective(batch) if loss is None else loss
            parts = [objective(half) for half in halves]
    except Exception:  # noqa: BLE001 - a model that cannot run half a batch is not checked
        return
    if not all(isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point() for v in [whole, *parts]):
        return
    total, first, second = (float(v.detach().to(torch.float64)) for v in (whole, *parts))
    scale = abs(first) + abs(second)
    if not (math.isfinite(total) and math.isfinite(scale)) or scale == 0.0:
        return
    summed = first + second
    if abs(total - summed) <= tol * scale:
        return
    cut = examples // 2
    means = {"over the batch's examples": (cut * first + (examples - cut) * second) / examples}
    tokens = _tokens(mask, examples, cut)
    if tokens is not None:
        means["over the batch's tokens"] = (tokens[0] * first + tokens[1] * second) / (tokens[0] + tokens[1])
    values = f"it is {total:.6g} on a batch of {examples} examples but {first:.6g} and {second:.6g} on its two halves"
    for how, mean in means.items():
        if abs(total - mean) <= tol * scale and abs(summed - mean) > MARGIN * tol * scale:
            raise InfluenceError(
                f"The {name} is a mean {how}, not a sum: {values}. A mean divides every example's gradient, and every "
                f"score, by the batch size. {fix}"
            )
    if warn:
        warnings.warn(
            f"The {name} is not a sum over the batch's examples: {values} (sum {summed:.6g}). Per-example "
            "gradients and scores then depend on which examples share a batch (a mean over tokens without "
            f"Task.get_attention_mask, in-batch negatives, batch statistics ...). {fix}", InfluenceWarning,
            stacklevel=2)
