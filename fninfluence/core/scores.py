"""Score contractions: pure functions of preconditioned query gradients and training-layer statistics.

For one layer, with ``P_q`` the preconditioned gradient of query ``q`` (``[G, out, in]``) and training
example ``n``'s inputs ``a_{n,t}`` and output gradients ``g_{n,t}``:

    score[q, n] = <P_q, G_n> = sum_t g_{n,t}^T P_q a_{n,t}

The per-example training gradient ``G_n = sum_t g_{n,t} a_{n,t}^T`` is not formed unless opt_einsum
finds that cheapest for the shapes at hand. A low-rank query ``P_q ~ L_q R_q`` (``L: [G, out, r]``,
``R: [G, r, in]``) is contracted as ``sum_t (g^T L)(R a)``. Per-token scores keep ``t``; a layer called
several times per forward contributes its calls to the same token positions. Scores add up over
layers; a positive score means that upweighting the training example lowers the query's measurement.
Scores are not divided by N.

For an embedding (:class:`~fninfluence.core.algebra.OneHotStats`) ``a_{n,t}`` is the one-hot ``w_t e_{i_t}``,
so ``g^T P_q a = w_t g_t . P_q[:, i_t]``: the query's columns at the training ids are gathered
(``[Q, G, D, N, T]``) instead of forming one-hot vectors. The contractions of both kinds are in
:mod:`fninfluence.core.algebra`.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

from .algebra import Query, example_grad_dot, per_example_grads, score_contraction
from .statistics import LayerStatistic, of_stats
from ..errors import InfluenceError

__all__ = ["Query", "pairwise_layer_scores", "summed_train_scores", "example_grad_dot", "low_rank",
           "spread_to_tokens", "total"]


def _fold_calls(per_token: torch.Tensor, tokens: Optional[int]) -> torch.Tensor:
    """``[Q, N, calls * T] -> [Q, N, T]`` (``tokens`` = T): a reused layer's calls share token positions."""
    q, n, total = per_token.shape
    if tokens is None or total == tokens:
        return per_token
    return per_token.reshape(q, n, total // tokens, tokens).sum(2)


def pairwise_layer_scores(query: Query, stats: Mapping[str, torch.Tensor], per_token: bool = False,
                          tokens: Optional[int] = None) -> torch.Tensor:
    """``[Q, N]`` (or ``[Q, N, T]``, the calls of a layer called several times summed per position when ``tokens``
    = T is given) scores of one layer against a training batch's stats."""
    if not per_token:
        return score_contraction(query, stats, "qn")
    return _fold_calls(score_contraction(query, stats, "qnt"), tokens)


def example_gradients(spec, dtype: torch.dtype, device: torch.device) -> LayerStatistic:
    """The statistic ``{"grads": G_n}``, a layer's per-example gradients ``[N, G, out, in]`` (additive over calls)."""
    return of_stats(lambda stats: {"grads": per_example_grads(stats, spec.in_features)},
                    lambda examples, tokens: {"grads": torch.zeros(examples, *spec.shape, dtype=dtype, device=device)},
                    additive=True)


def summed_train_scores(query: Query, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[Q]``: the scores against the sum of the batch's training gradients."""
    return score_contraction(query, stats, "q")


def low_rank(preconditioned: torch.Tensor, rank: Optional[int], full_svd: bool, svd_dtype: torch.dtype,
             out_dtype: torch.dtype) -> Query:
    """``P ~ L R`` by a rank-``rank`` SVD per query and group, when the rank is below both matrix sides.

    With ``full_svd=False`` the randomised ``torch.svd_lowrank`` is used (as in Kronfluence); its result
    depends on PyTorch's random state, which the pipeline seeds per (layer, query chunk) so that it is reproducible.
    """
    out, inp = preconditioned.shape[-2:]
    if rank is None or min(out, inp) <= rank:
        return preconditioned.to(out_dtype)
    matrix = preconditioned.to(svd_dtype).contiguous()
    if full_svd:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        left, right = u[..., :rank] * s[..., None, :rank], vh[..., :rank, :]
    else:
        u, s, v = torch.svd_lowrank(matrix.flatten(0, 1), q=rank)
        left = (u * s[..., None, :]).reshape(*matrix.shape[:2], out, rank)
        right = v.transpose(-1, -2).reshape(*matrix.shape[:2], rank, inp)
    return left.to(out_dtype), right.to(out_dtype)


def spread_to_tokens(scores: torch.Tensor, tokens: int) -> torch.Tensor:
    """Per-token scores of a layer without a token dimension: its ``[Q, N]`` scores spread evenly over tokens."""
    return (scores / tokens).unsqueeze(-1).expand(*scores.shape, tokens)


class ModuleScores(dict):
    """Per-layer scores, ``{layer name: scores}``, that also answer ``["all_modules"]`` (and ``.total``) with their
    sum over layers, as :func:`~fninfluence.store.scores_store.read_scores` does for a store.

    ``"all_modules"`` is not one of the keys: iterating, ``len`` and ``sum(scores.values())`` see the layers only, so
    code that adds the layers up does not count them twice.
    """

    TOTAL = "all_modules"

    def __missing__(self, key):
        if key == self.TOTAL:
            return self.total
        raise KeyError(key)

    @property
    def total(self) -> torch.Tensor:
        """The scores summed over layers."""
        return total(self)


def total(per_layer: Dict[str, torch.Tensor]) -> torch.Tensor:
    values = list(per_layer.values())
    if len({tuple(v.shape) for v in values}) > 1:
        raise InfluenceError(f"Per-layer scores of different shapes cannot be added: { {k: tuple(v.shape) for k, v in per_layer.items()} }.")
    return sum(values[1:], values[0])
