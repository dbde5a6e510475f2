"""Per-example layer gradients in factored form: pure functions of a batch's ``(a, g)`` stats.

For one layer and example ``n`` the gradient is ``G_n = sum_t g_t a_t^T`` (``[G, out, in]`` per group).
The index keeps ``K`` "pseudo-tokens" ``(u_k, v_k)`` with ``G_n ~ sum_k u_k v_k^T``, laid out like the
stats themselves (``g: [N, K, G, out]``, ``a: [N, K, G, in]``), so the score contraction of
:func:`fninfluence.core.scores.pairwise_layer_scores` applies to the index unchanged:

* ``T <= K`` (including every layer without a token dimension, where ``G_n = g a^T`` is rank one):
  the tokens themselves, zero-padded to ``K``: exact;
* ``T > K``: the rank-``K`` truncated SVD ``G_n ~ sum_k s_k u_k v_k^T`` (the best rank-``K``
  approximation in Frobenius norm), stored as ``(sqrt(s_k) u_k, sqrt(s_k) v_k)``. When
  ``T < min(out, in)`` it is found from thin QRs of the token factors (``g^T = Q_g R_g``,
  ``a^T = Q_a R_a``, then the SVD of the small ``R_g R_a^T``) without forming ``G_n``.
"""

from __future__ import annotations

from typing import Mapping, Tuple

import torch
import torch.nn.functional as F

from ..core.contract import contract
from ..core.algebra import DenseStats, require_dense


def index_width(tokens: int, out_features: int, in_features: int, rank) -> int:
    """Pseudo-tokens kept per example: 1 without a token dimension, else ``min(rank, out, in)``
    (``rank=None``: ``min(out, in)``, which is exact)."""
    if tokens == 1:
        return 1
    full = min(out_features, in_features)
    return full if rank is None else min(rank, full)


def _pad_tokens(x: torch.Tensor, width: int) -> torch.Tensor:
    """``[N, T, G, F] -> [N, width, G, F]`` with zero tokens appended (T <= width)."""
    return F.pad(x, (0, 0, 0, 0, 0, width - x.shape[1]))


def _top_singular(g: torch.Tensor, a: torch.Tensor, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sqrt(s) U_K, sqrt(s) V_K)`` of ``G = g^T a`` per example and group, ``[N, G, out|in, K]``."""
    gt, at = g.permute(0, 2, 3, 1), a.permute(0, 2, 3, 1)  # [N, G, out, T], [N, G, in, T]
    tokens, out_features, in_features = g.shape[1], g.shape[-1], a.shape[-1]
    if tokens < min(out_features, in_features):
        q_g, r_g = torch.linalg.qr(gt)
        q_a, r_a = torch.linalg.qr(at)
        u, s, vh = torch.linalg.svd(r_g @ r_a.transpose(-1, -2))
        left, right = q_g @ u[..., :width], q_a @ vh[..., :width, :].transpose(-1, -2)
    else:
        u, s, vh = torch.linalg.svd(gt @ at.transpose(-1, -2), full_matrices=False)
        left, right = u[..., :width], vh[..., :width, :].transpose(-1, -2)
    root = s[..., :width].clamp_min(0).sqrt()[..., None, :]
    return left * root, right * root


def factorize(stats: Mapping[str, torch.Tensor], width: int) -> DenseStats:
    """Pseudo-tokens ``g: [N, width, G, out]``, ``a: [N, width, G, in]`` with ``sum_k g_k a_k^T ~ G_n`` (see the module)."""
    stats = require_dense(stats, "The training-gradient index (factorize)")
    g, a = stats.g, stats.a
    if g.shape[1] <= width:
        return DenseStats(_pad_tokens(a, width), _pad_tokens(g, width))
    left, right = _top_singular(g, a, width)
    return DenseStats(right.permute(0, 3, 1, 2), left.permute(0, 3, 1, 2))


def relative_residual(stats: Mapping[str, torch.Tensor], factored: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``||G_n - sum_k g_k a_k^T||_F^2 / ||G_n||_F^2`` per example: the energy the truncation drops (0 if exact).

    Computed from Gram matrices, without forming ``G_n``: ``||sum_t g_t a_t^T||^2 = sum (g g^T) * (a a^T)``.
    """
    def energy(g1, a1, g2, a2):
        return contract("ntgo,nsgo,ntgi,nsgi->n", g1, g2, a1, a2)

    stats, factored = require_dense(stats, "relative_residual"), require_dense(factored, "relative_residual")
    g, a, gk, ak = stats.g, stats.a, factored.g, factored.a
    total = energy(g, a, g, a)
    kept = energy(gk, ak, gk, ak)
    cross = energy(g, a, gk, ak)
    return ((total - 2 * cross + kept) / total.clamp_min(torch.finfo(total.dtype).tiny)).clamp_min(0)
