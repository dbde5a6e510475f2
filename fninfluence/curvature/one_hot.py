"""Algebra of one-hot layers (``nn.Embedding``) that never forms a one-hot vector.

An embedding with vocabulary V and width D is the linear layer ``W^T`` (``[D, V]``, G = 1) applied to
one-hot inputs ``a_t = w_t e_{i_t}``, with ``i_t = ids[t]`` and ``w_t = id_values[t]`` (1, or 0 for
padding and masked tokens). With ``S_v = {t : i_t = v}`` (the positions of token v in one example):

* per-example gradient: column v of ``G_n`` is ``sum_{t in S_v} x_t`` with ``x_t = w_t g_t``;
* ``A = sum_t a_t a_t^T / #tokens = diag(f)``, ``f_v = sum_t w_t^2 [i_t = v] / #tokens``, the token
  frequencies: ``Q_A = I`` and the eigenvalues of A are f (in vocabulary order), kept as a ``[G, V]``
  vector; ``S`` is as for any layer;
* the squared gradient of one example in the basis ``(Q_S, I)``, with ``x'_t = Q_S^T x_t``, uses

      (sum_{t in S_v} x'_t)^2 = sum_{t in S_v} x'_t * P_t,    P_t = sum_s [i_s = i_t] x'_s,

  i.e. a ``[B, T, T]`` same-token mask and a batched matmul, then an index_add of ``x'_t * P_t`` into
  column ``i_t``: ``[B, T, D]`` and ``[B, T, T]`` tensors only, never ``[B, D, V]``;
* scores against a dense preconditioned query ``P_q`` (``[Q, G, D, V]``):
  ``<P_q, G_n> = sum_t x_t . P_q[:, i_t]``, gathering the query's columns at the example's ids.
"""

from __future__ import annotations

import torch

from .base import Tensors


def scaled_grads(stats: Tensors, g: torch.Tensor) -> torch.Tensor:
    """``x_t = w_t g_t``: ``[B, T, G, D]``; zero at padding and masked tokens."""
    return g * stats["id_values"][:, :, None, None].to(g.dtype)


def same_token_sums(ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``P_t = sum_s [i_s = i_t] x_s`` within each example: ``[B, T, G, D]`` from ``[B, T]`` ids and ``x``."""
    same = (ids[:, :, None] == ids[:, None, :]).to(x.dtype)  # [B, T, T]
    return torch.bmm(same, x.flatten(2)).view(x.shape)


def token_frequency_sum(stats: Tensors, vocabulary: int, dtype: torch.dtype) -> torch.Tensor:
    """``sum_t w_t^2 [i_t = v]`` over the batch, as ``[1, V]``: the diagonal of ``sum_t a_t a_t^T``."""
    values = stats["id_values"].to(dtype).flatten()
    return values.new_zeros(vocabulary).index_add(0, stats["ids"].flatten(), values.square())[None]


def squared_column_sums(ids: torch.Tensor, x: torch.Tensor, vocabulary: int) -> torch.Tensor:
    """``sum_n (G_n)^2`` elementwise, ``G_n[:, v] = sum_{t in S_v} x_t``: ``[G, D, V]`` via ``x_t * P_t``."""
    per_token = (x * same_token_sums(ids, x)).flatten(0, 1)  # [B*T, G, D]
    return per_token.new_zeros(per_token.shape[1:] + (vocabulary,)).index_add(
        -1, ids.flatten(), per_token.permute(1, 2, 0))


def weighted_self_products(ids: torch.Tensor, x: torch.Tensor, weights: torch.Tensor = None) -> torch.Tensor:
    """``sum_{d, v} weights[d, v] (G_n[d, v])^2`` per example (``weights = 1`` when None): ``[B]``.

    ``= sum_t sum_d x_t[d] P_t[d] weights[d, i_t]``; ``weights`` is ``[G, D, V]``, read at the ids only.
    """
    products = x * same_token_sums(ids, x)  # [B, T, G, D]
    if weights is None:
        return products.flatten(1).sum(1)
    return torch.einsum("btgd,gdbt->b", products, weights[..., ids])


def columns_at_ids(matrix: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``matrix[..., ids]``: the columns of ``[..., V]`` at every (example, token): ``[..., N, T]``."""
    return matrix[..., ids]


def own_columns(matrices: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Row-aligned: the columns of ``matrices[n]`` (``[N, G, D, V]``) at example n's ids: ``[N, G, D, T]``."""
    n, groups, out, _ = matrices.shape
    return matrices.gather(-1, ids[:, None, None, :].expand(n, groups, out, ids.shape[1]))
