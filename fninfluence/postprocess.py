"""``Task.post_process_per_sample_gradient``: a user function applied to every per-example gradient.

Kronfluence's tasks may set ``enable_post_process_per_sample_gradient = True`` and define
``post_process_per_sample_gradient(module_name, gradient)``; multiple-choice tasks use it to sum the
gradients of an example's choices, which the model folds into the batch dimension. fninfluence applies it
with the same meaning:

- ``gradient`` is the layer's per-row gradient ``G_r = sum_t g_{r,t} a_{r,t}^T``, shaped
  ``[R, out, in]`` (``[R, groups, out, in]`` for a grouped convolution; ``in`` includes the bias column;
  an embedding's is ``[R, dim, vocabulary]``, a parameter layer's ``[R, 1, parameters]``), where ``R`` is
  the layer input's leading dimension: the examples, or more rows when the model folds several rows per
  example into the batch (its choices, say). The function must return ``[B, ...]``: one gradient per
  example of the batch, with the same trailing shape.
- It applies wherever a per-example gradient is formed or implied: the lambda pass of EKFAC and the diagonal
  estimator (and any pass that does not declare ``FitPass.raw_statistics``), the query gradients, the
  training side of pairwise scores (also with ``aggregate_train``), and self-influence.
- It does not apply to the covariance pass: ``A = sum a a^T`` and ``S = sum g g^T`` are sums over the layer's
  raw inputs and output gradients, in which no per-example gradient exists (as in Kronfluence).
- Per-token scores are refused: a post-processed gradient has no tokens.

A processed gradient ``P_n`` is handed on as statistics in the usual ``(a, g)`` form, with one pseudo-token
per row or column of ``P_n``, whichever side is smaller: ``a_t = e_t`` and ``g_t = P_n[:, t]`` (so
``sum_t g_t a_t^T = P_n``), or ``g_t = e_t`` and ``a_t = P_n[t, :]``. Every estimator and contraction that
reads per-example gradients off ``(a, g)`` then gives exactly the results of ``P_n``; an embedding's
pseudo-tokens are one-hot rows ``ids = 0..V-1`` (:func:`fninfluence.core.algebra.pseudo_token_stats`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

import torch

from .capture import batch_examples
from .core.algebra import LayerStats, per_example_grads, pseudo_token_stats
from .errors import InfluenceError

PostProcess = Callable[[str, torch.Tensor], torch.Tensor]


def post_process_of(task: Any) -> Optional[PostProcess]:
    """The task's ``post_process_per_sample_gradient`` when it is enabled, else None."""
    if not getattr(task, "enable_post_process_per_sample_gradient", False):
        return None
    function = getattr(task, "post_process_per_sample_gradient", None)
    if not callable(function):
        raise InfluenceError(
            f"{type(task).__name__}.enable_post_process_per_sample_gradient is True but it has no callable "
            "post_process_per_sample_gradient(module_name, gradient). Define it, or set the flag to False."
        )
    return function


def _user_view(grads: torch.Tensor, spec) -> torch.Tensor:
    """``[R, G, out, in]`` as the user sees it: ``[R, out, in]`` unless the layer is grouped."""
    return grads[:, 0] if spec.groups == 1 else grads


def post_processed_stats(post_process: PostProcess, specs, stats: Mapping[str, LayerStats],
                         batch: Any) -> Dict[str, LayerStats]:
    """Every layer's statistics replaced by those of its post-processed per-example gradients."""
    examples = batch_examples(batch)
    result = {}
    for layer, layer_stats in stats.items():
        spec = specs[layer]
        grads = per_example_grads(layer_stats, spec.in_features)  # [R, G, out, in]
        view = _user_view(grads, spec)
        processed = post_process(layer, view)
        expected = (examples,) + tuple(view.shape[1:])
        if not isinstance(processed, torch.Tensor) or tuple(processed.shape) != expected:
            got = tuple(processed.shape) if isinstance(processed, torch.Tensor) else type(processed).__name__
            raise InfluenceError(
                f"post_process_per_sample_gradient({layer!r}, gradient of shape {tuple(view.shape)}) returned "
                f"{got}; it must return one gradient per example of the batch: shape {expected}."
            )
        if spec.groups == 1:
            processed = processed[:, None]
        result[layer] = pseudo_token_stats(processed.to(grads.dtype), layer_stats)
    return result
