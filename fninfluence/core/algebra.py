"""Layer statistics as two records, and every computation whose formula depends on which one it is.

One batch's statistics of one tracked layer are either

* :class:`DenseStats` ``(a [B, T, G, in], g [B, T, G, out], tokens)``: the layer's per-token inputs (with
  the bias column) and output gradients, so that example ``n``'s weight gradient is
  ``G_n = sum_t g_{n,t} a_{n,t}^T`` (``[G, out, in]``); or
* :class:`OneHotStats` ``(ids [B, T], id_values [B, T], g [B, T, 1, D], tokens)``: an embedding (the linear
  layer ``W^T``, ``[D, V]``, G = 1) whose inputs are the one-hot rows ``a_t = w_t e_{i_t}``, with
  ``i_t = ids[t]`` and ``w_t = id_values[t]`` (1, or 0 for padding and masked tokens), never formed.

``tokens`` is the batch's count of (unmasked) tokens, None where none applies (an index's pseudo-tokens).
This module is the one place that tells the two apart, by the record's type: ``isinstance`` is decided
while ``torch.compile`` traces, so a compiled step stays one graph. Both records are pytree nodes (they pass
through ``torch.compile``, ``torch.func.vmap`` and ``tree_map``) and read like the dicts of their fields
(``stats["a"]``, ``"ids" in stats``, ``set(stats)``), so estimators written against that dict contract work
unchanged; a plain dict with those keys is accepted wherever a record is (:func:`as_stats`).

The one-hot algebra, with ``S_v = {t : i_t = v}`` (the positions of token v in one example) and
``x_t = w_t g_t`` (:func:`scaled_grads`):

* per-example gradient: column v of ``G_n`` is ``sum_{t in S_v} x_t``;
* ``sum_t a_t a_t^T = diag(f)``, ``f_v = sum_t w_t^2 [i_t = v]``: the token frequencies;
* squared gradients, e.g. in the basis ``(Q_S, I)`` with ``x'_t = Q_S^T x_t``, use

      (sum_{t in S_v} x'_t)^2 = sum_{t in S_v} x'_t * P_t,    P_t = sum_s [i_s = i_t] x'_s,

  i.e. a ``[B, T, T]`` same-token mask and a batched matmul, then an index_add of ``x'_t * P_t`` into
  column ``i_t``: ``[B, T, D]`` and ``[B, T, T]`` tensors only, never ``[B, D, V]``;
* scores against a dense query ``P_q`` (``[Q, G, D, V]``): ``<P_q, G_n> = sum_t x_t . P_q[:, i_t]``,
  gathering the query's columns at the example's ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch.utils._pytree import register_dataclass, register_pytree_node

from . import conv
from .contract import contract
from ..errors import InfluenceError

Query = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]  # dense [Q, G, out, in] or low rank (L, R)


# -- the records -----------------------------------------------------------------------------------

class _FieldMapping(Mapping):
    """Read-only dict view of a record's fields that are set (not None), for code written against dicts.

    Equality and hashing are by identity: tensors have no truth value to compare records by.
    """

    _KEYS: Tuple[str, ...] = ()
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __getitem__(self, key):
        if key in self._KEYS:
            value = getattr(self, key)
            if value is not None:
                return value
        raise KeyError(key)

    def __iter__(self):
        return iter([key for key in self._KEYS if getattr(self, key) is not None])

    def __len__(self) -> int:
        return len([key for key in self._KEYS if getattr(self, key) is not None])

    def __contains__(self, key) -> bool:
        return key in self._KEYS and getattr(self, key) is not None


@dataclass(frozen=True, eq=False)
class DenseStats(_FieldMapping):
    """A dense layer's batch: inputs ``a`` ``[B, T, G, in]``, output gradients ``g`` ``[B, T, G, out]``."""

    a: torch.Tensor
    g: torch.Tensor
    tokens: Optional[torch.Tensor] = None
    _KEYS = ("a", "g", "tokens")

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype


@dataclass(frozen=True, eq=False)
class OneHotStats(_FieldMapping):
    """An embedding's batch: token ``ids`` and one-hot values ``id_values`` ``[B, T]``, ``g`` ``[B, T, 1, D]``."""

    ids: torch.Tensor
    id_values: torch.Tensor
    g: torch.Tensor
    tokens: Optional[torch.Tensor] = None
    _KEYS = ("ids", "id_values", "g", "tokens")

    @property
    def dtype(self) -> torch.dtype:
        return self.g.dtype


@dataclass(frozen=True, eq=False)
class OneHotInput(_FieldMapping):
    """What the tap records of one embedding call: ``ids`` and ``id_values`` ``[B, T]`` (the input side only)."""

    ids: torch.Tensor
    id_values: torch.Tensor
    _KEYS = ("ids", "id_values")


@dataclass(frozen=True, eq=False)
class ConvStats(_FieldMapping):
    """A convolution's batch kept as the op's input ``x`` ``[B, C, *spatial]`` and its settings, with ``g``
    ``[B, T, G, out]``: the patches ``a`` ``[B, T, G, in]`` are unfolded only where a formula reads them, and
    per-example gradients come from the convolution's weight-gradient kernel (:mod:`.conv`). Reads like a
    :class:`DenseStats` (``stats["a"]`` unfolds)."""

    x: torch.Tensor
    g: Optional[torch.Tensor]
    tokens: Optional[torch.Tensor]
    conv: conv.ConvSettings
    _KEYS = ("a", "g", "tokens")

    @property
    def a(self) -> torch.Tensor:
        return conv.patches(self.x, self.conv)

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype


@dataclass(frozen=True, eq=False)
class ExampleGrads(_FieldMapping):
    """Per-example gradients ``grads`` ``[N, G, out, in]`` given as they are (a convolution's, rotated into an
    eigenbasis): every formula that needs only ``G_n`` applies."""

    grads: torch.Tensor
    tokens: Optional[torch.Tensor] = None
    _KEYS = ("grads", "tokens")

    @property
    def dtype(self) -> torch.dtype:
        return self.grads.dtype


LayerStats = Union[DenseStats, OneHotStats, ConvStats, ExampleGrads]

register_dataclass(DenseStats)
register_dataclass(OneHotStats)
register_dataclass(OneHotInput)
register_dataclass(ExampleGrads)
register_pytree_node(ConvStats, lambda s: ([s.x, s.g, s.tokens], s.conv),
                     lambda leaves, settings: ConvStats(*leaves, settings))


def as_stats(stats: Mapping) -> LayerStats:
    """``stats`` as a record: records as they are; a dict by its keys (``"ids"`` marks an embedding's)."""
    if isinstance(stats, (DenseStats, OneHotStats, ConvStats, ExampleGrads)):
        return stats
    if "ids" in stats:
        return OneHotStats(stats["ids"], stats["id_values"], stats["g"], stats.get("tokens"))
    return DenseStats(stats["a"], stats["g"], stats.get("tokens"))


def cast(stats: Mapping, dtype: torch.dtype) -> LayerStats:
    """The floating-point fields (``a``, ``g``, ``id_values``) in ``dtype``; ids and the token count as they are."""
    stats = as_stats(stats)
    if isinstance(stats, ExampleGrads):
        return ExampleGrads(stats.grads.to(dtype), stats.tokens)
    g = None if stats.g is None else stats.g.to(dtype)  # None: an input side (fninfluence.core.statistics)
    if isinstance(stats, OneHotStats):
        return OneHotStats(stats.ids, stats.id_values.to(dtype), g, stats.tokens)
    if isinstance(stats, ConvStats):
        return ConvStats(stats.x.to(dtype), g, stats.tokens, stats.conv)
    return DenseStats(stats.a.to(dtype), g, stats.tokens)


def from_single_examples(stats: LayerStats) -> LayerStats:
    """The stats of a ``vmap`` over batches of one (every field ``[B, 1, ...]``) as one batch's: ``[B, ...]``,
    with the token counts summed."""
    tokens = None if stats.tokens is None else stats.tokens.sum()
    if isinstance(stats, OneHotStats):
        return OneHotStats(stats.ids.squeeze(1), stats.id_values.squeeze(1), stats.g.squeeze(1), tokens)
    return DenseStats(stats.a.squeeze(1), stats.g.squeeze(1), tokens)


def without_grads(stats: Mapping) -> LayerStats:
    """The input side of a layer's statistics: the same record with ``g = None``."""
    stats = as_stats(stats)
    if isinstance(stats, OneHotStats):
        return OneHotStats(stats.ids, stats.id_values, None, stats.tokens)
    if isinstance(stats, ConvStats):
        return ConvStats(stats.x, None, stats.tokens, stats.conv)
    return DenseStats(stats.a, None, stats.tokens)


def with_grads(inputs: LayerStats, g: torch.Tensor) -> LayerStats:
    """An input side completed with the output gradients ``g``."""
    if isinstance(inputs, OneHotStats):
        return OneHotStats(inputs.ids, inputs.id_values, g, inputs.tokens)
    if isinstance(inputs, ConvStats):
        return ConvStats(inputs.x, g, inputs.tokens, inputs.conv)
    return DenseStats(inputs.a, g, inputs.tokens)


def join_calls(sides, g_calls) -> LayerStats:
    """One layer's batch statistics from its calls' input sides and output gradients: calls concatenated along
    tokens (a convolution's as patches), token counts summed."""
    tokens = sum((side.tokens for side in sides[1:]), sides[0].tokens)
    if len(sides) == 1:
        return with_grads(sides[0], g_calls[0])
    g = torch.cat(list(g_calls), dim=1)
    if isinstance(sides[0], OneHotStats):
        ids = torch.cat([side.ids for side in sides], dim=1)
        return OneHotStats(ids, torch.cat([side.id_values for side in sides], dim=1), g, tokens)
    return DenseStats(torch.cat([side.a for side in sides], dim=1), g, tokens)


def require_dense(stats: Mapping, purpose: str) -> DenseStats:
    """``stats`` as :class:`DenseStats` (a convolution's patches unfolded), or an error saying that ``purpose``
    has no embedding form."""
    stats = as_stats(stats)
    if isinstance(stats, ConvStats):
        return DenseStats(stats.a, stats.g, stats.tokens)
    if isinstance(stats, OneHotStats):
        raise InfluenceError(f"{purpose} takes dense layer statistics, not an embedding's (one-hot ids): leave the "
                             "embedding out of Task.tracked_modules() for it.")
    return stats


# -- per-example gradients -------------------------------------------------------------------------

def scaled_grads(stats: Mapping, g: torch.Tensor) -> torch.Tensor:
    """``x_t = w_t g_t``: ``[B, T, G, D]``; zero at padding and masked tokens."""
    return g * stats["id_values"][:, :, None, None].to(g.dtype)


def per_example_grads(stats: Mapping, in_features: Optional[int] = None) -> torch.Tensor:
    """``G_n = sum_t g_t a_t^T`` laid out as ``[N, G, out, in]``.

    One-hot stats need ``in_features`` (the vocabulary V): column ``v`` of ``G_n`` is
    ``sum_{t: ids_t = v} id_values_t g_t``, scattered into a dense ``[N, 1, D, V]`` (query side only).
    """
    stats = as_stats(stats)
    if isinstance(stats, DenseStats):
        return torch.einsum("btgo,btgi->bgoi", stats.g, stats.a)
    if isinstance(stats, ConvStats):
        return conv.example_grads(stats.x, stats.g, stats.conv)
    if isinstance(stats, ExampleGrads):
        return stats.grads
    if in_features is None:
        raise ValueError("per_example_grads of an embedding (one-hot stats) needs in_features, the vocabulary size.")
    g = scaled_grads(stats, stats.g)  # [N, T, 1, D]
    n, t, groups, out = g.shape
    index = stats.ids[:, None, None, :].expand(n, groups, out, t)
    return g.new_zeros(n, groups, out, in_features).scatter_add(-1, index, g.permute(0, 2, 3, 1))


def pseudo_token_stats(processed: torch.Tensor, like: Mapping) -> LayerStats:
    """Stats of the kind of ``like`` (and its token count) whose per-example gradients are exactly ``processed``.

    ``processed``: ``[B, G, out, in]``. Dense layers get ``min(out, in)`` pseudo-tokens, an identity on the
    smaller side (``a_t = e_t, g_t = P[:, t]`` or ``g_t = e_t, a_t = P[t, :]``); an embedding gets one
    one-hot row per vocabulary entry (``ids = 0..V-1``).
    """
    like = as_stats(like)
    n, groups, out, inp = processed.shape
    if isinstance(like, OneHotStats):
        ids = torch.arange(inp, device=processed.device).expand(n, inp)
        return OneHotStats(ids, processed.new_ones(n, inp), processed.permute(0, 3, 1, 2), like.tokens)
    if inp <= out:
        a = torch.eye(inp, dtype=processed.dtype, device=processed.device)[None, :, None, :].expand(n, inp, groups, inp)
        return DenseStats(a, processed.permute(0, 3, 1, 2), like.tokens)
    g = torch.eye(out, dtype=processed.dtype, device=processed.device)[None, :, None, :].expand(n, out, groups, out)
    return DenseStats(processed.permute(0, 2, 1, 3), g, like.tokens)


# -- one-hot helpers -------------------------------------------------------------------------------

def same_token_sums(ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``P_t = sum_s [i_s = i_t] x_s`` within each example: ``[B, T, G, D]`` from ``[B, T]`` ids and ``x``."""
    same = (ids[:, :, None] == ids[:, None, :]).to(x.dtype)  # [B, T, T]
    return torch.bmm(same, x.flatten(2)).view(x.shape)


def token_frequency_sum(stats: Mapping, vocabulary: int, dtype: torch.dtype) -> torch.Tensor:
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


# -- second moments (KFAC's covariance pass) -------------------------------------------------------

WIDE_SUM_ROWS = 8192


def wide_sum(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.sum(0)`` in the wider ``dtype``, converting ``WIDE_SUM_ROWS`` rows at a time: a whole-tensor conversion
    would hold a copy of ``x`` twice its size (a conv layer's patches: the largest tensor of a covariance pass).
    Up to that many rows it is exactly ``x.to(dtype).sum(0)``."""
    chunks = x.split(WIDE_SUM_ROWS)
    total = chunks[0].to(dtype).sum(0)
    for chunk in chunks[1:]:
        total = total + chunk.to(dtype).sum(0)
    return total


def second_moment(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``sum_n x_n x_n^T`` per group (``x: [K, G, d]``), in ``dtype``, from a product in ``x.dtype``.

    When ``x`` is narrower than ``dtype`` the product is taken about a shift ``c`` (the rows' mean,
    rounded to ``x.dtype``) and the shift is added back in ``dtype``, with ``s = sum_n x_n``:

        sum_n x_n x_n^T = sum_n (x_n - c)(x_n - c)^T + c s^T + s c^T - K c c^T

    Rounding errors of the narrow product scale with the entries it sums, so this trades the error
    relative to the raw second moment for one relative to the spread about the mean: the small
    eigenvalues of A survive a large common mean (non-negative inputs, ReLU outputs, the bias column).
    """
    if x.dtype == dtype:
        return torch.einsum("ngi,ngj->gij", x, x)
    total = wide_sum(x, dtype)  # [G, d]
    shift = (total / max(x.shape[0], 1)).to(x.dtype)
    centred = x - shift
    wide_shift = shift.to(dtype)
    cross = torch.einsum("gi,gj->gij", wide_shift, total)
    return (torch.einsum("ngi,ngj->gij", centred, centred).to(dtype) + cross + cross.transpose(-1, -2)
            - x.shape[0] * torch.einsum("gi,gj->gij", wide_shift, wide_shift))


def input_second_moment(stats: Mapping, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """``sum_t a_t a_t^T`` over the batch in ``dtype``: ``[G, in, in]``, or for an embedding only its diagonal
    ``[1, V]`` (the weighted token counts, ``in_features = V``); the rest of that matrix is 0."""
    stats = as_stats(stats)
    if isinstance(stats, OneHotStats):
        return token_frequency_sum(stats, in_features, dtype)
    return second_moment(stats.a.flatten(0, 1), dtype)


def gradient_second_moment(stats: Mapping, dtype: torch.dtype) -> torch.Tensor:
    """``sum_t g_t g_t^T`` over the batch in ``dtype``: ``[G, out, out]`` (the same for both kinds)."""
    return second_moment(stats["g"].flatten(0, 1), dtype)


# -- the eigenbasis (EKFAC's lambda pass, self-scores) ---------------------------------------------

def in_eigenbasis(stats: Mapping, activation_vectors: Optional[torch.Tensor],
                  gradient_vectors: Optional[torch.Tensor]) -> LayerStats:
    """Stats whose gradients are ``G'_n = Q_S^T G_n Q_A``: ``a' = Q_A^T a`` and ``g' = Q_S^T g`` (a factor that
    is None is the identity). An embedding's ``Q_A`` is always the identity (its A is diagonal)."""
    stats = as_stats(stats)
    if isinstance(stats, (ConvStats, ExampleGrads)):  # rotate G_n itself: no patches
        grads = per_example_grads(stats)
        if gradient_vectors is not None:
            grads = torch.einsum("ngoi,gop->ngpi", grads, gradient_vectors.to(grads.dtype))
        if activation_vectors is not None:
            grads = torch.einsum("ngoi,gij->ngoj", grads, activation_vectors.to(grads.dtype))
        return ExampleGrads(grads, stats.tokens)
    g = stats.g
    if gradient_vectors is not None:
        g = torch.einsum("btgo,gop->btgp", g, gradient_vectors.to(g.dtype))
    if isinstance(stats, OneHotStats):
        return OneHotStats(stats.ids, stats.id_values, g, stats.tokens)
    a = stats.a
    if activation_vectors is not None:
        a = torch.einsum("btgi,gij->btgj", a, activation_vectors.to(a.dtype))
    return DenseStats(a, g, stats.tokens)


def squared_example_grads(stats: Mapping, in_features: int) -> torch.Tensor:
    """``sum_n (G_n)^2`` elementwise over the batch: ``[G, out, in]`` (``in_features``: an embedding's V).

    Without a token dimension ``G_n`` is rank one and ``(G_n)^2 = (g_n)^2 (a_n^2)^T``; an embedding's comes
    from same-token sums: no ``[N, out, in]`` tensor is formed in either case.
    """
    stats = as_stats(stats)
    if isinstance(stats, OneHotStats):
        return squared_column_sums(stats.ids, scaled_grads(stats, stats.g), in_features)
    if isinstance(stats, ConvStats):
        return per_example_grads(stats).square_().sum(0)
    if isinstance(stats, ExampleGrads):
        return stats.grads.square().sum(0)
    a, g = stats.a, stats.g
    if a.shape[1] == 1:
        return torch.einsum("bgo,bgi->goi", g[:, 0].square(), a[:, 0].square())
    return torch.einsum("btgo,btgi->bgoi", g, a).square_().sum(0)  # in place: one [N, G, out, in] at a time


def self_products(stats: Mapping, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum_{g, o, i} weights[g, o, i] (G_n[g, o, i])^2`` per example (``weights = 1`` when None): ``[N]``.

    Rank one without a token dimension: ``|g a^T|^2 = |g|^2 |a|^2`` (weighted: ``(g^2)^T W (a^2)``). An
    embedding's: ``sum_t x_t . P_t`` with same-token sums, its weights read at the ids only.
    """
    stats = as_stats(stats)
    if isinstance(stats, OneHotStats):
        return weighted_self_products(stats.ids, scaled_grads(stats, stats.g), weights)
    if isinstance(stats, (ConvStats, ExampleGrads)):
        squared = per_example_grads(stats).square()
        return (squared if weights is None else squared * weights).flatten(1).sum(1)
    a, g = stats.a, stats.g
    if a.shape[1] == 1 and weights is None:
        return (g.square().sum(-1) * a.square().sum(-1)).sum((1, 2))
    if a.shape[1] == 1:
        return contract("bgo,bgi,goi->b", g[:, 0].square(), a[:, 0].square(), weights)
    squared = torch.einsum("btgo,btgi->bgoi", g, a).square_()
    return (squared if weights is None else squared.mul_(weights)).flatten(1).sum(1)


# -- score contractions ----------------------------------------------------------------------------

def score_contraction(query: Query, stats: Mapping, out: str) -> torch.Tensor:
    """``<P_q, G_n> = sum_t g_{n,t}^T P_q a_{n,t}``, reduced to ``out`` (``"qnt"``, ``"qn"`` or ``"q"``).

    ``query`` is dense ``[Q, G, out, in]`` or low rank ``(L [Q, G, out, r], R [Q, G, r, in])``, contracted as
    ``sum_t (g^T L)(R a)``. For an embedding ``g^T P_q a = w_t g_t . P_q[:, i_t]``: the query's columns at the
    training ids are gathered (``[Q, G, D, N, T]``) instead of forming one-hot vectors.
    """
    stats = as_stats(stats)
    low_rank = isinstance(query, tuple)
    if isinstance(stats, ConvStats) and "t" in out:  # per position: the patches themselves
        stats = require_dense(stats, "per-position scores")
    if isinstance(stats, (ConvStats, ExampleGrads)):
        grads = per_example_grads(stats)
        if out == "q":
            grads = grads.sum(0, keepdim=True)
        target = "q" if out == "q" else "qn"
        if low_rank:
            return contract(f"qgor,qgri,ngoi->{target}", query[0], query[1], grads)
        return contract(f"qgoi,ngoi->{target}", query, grads)
    if isinstance(stats, OneHotStats):
        x = scaled_grads(stats, stats.g)
        if low_rank:
            left, right = query
            return contract(f"qgor,qgrnt,ntgo->{out}", left, columns_at_ids(right, stats.ids), x)
        return contract(f"qgont,ntgo->{out}", columns_at_ids(query, stats.ids), x)
    if low_rank:
        left, right = query
        return contract(f"qgor,qgri,ntgo,ntgi->{out}", left, right, stats.g, stats.a)
    return contract(f"qgoi,ntgo,ntgi->{out}", query, stats.g, stats.a)


def example_grad_dot(preconditioned: torch.Tensor, stats: Mapping) -> torch.Tensor:
    """``[N]`` inner products ``<P_n, G_n>`` of row-aligned preconditioned gradients and stats."""
    stats = as_stats(stats)
    if isinstance(stats, OneHotStats):
        return contract("ngot,ntgo->n", own_columns(preconditioned, stats.ids), scaled_grads(stats, stats.g))
    if isinstance(stats, (ConvStats, ExampleGrads)):
        return contract("ngoi,ngoi->n", preconditioned, per_example_grads(stats))
    return contract("ngoi,ntgo,ntgi->n", preconditioned, stats.g, stats.a)

