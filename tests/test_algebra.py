"""The per-kind algebra of layer statistics (fninfluence.core.algebra).

An embedding's OneHotStats must give exactly what the same algebra gives on DenseStats holding the explicit
one-hot inputs ``a_t = id_values[t] e_{ids[t]}``; the records must pass through a compiled step as one graph;
and code written against the dict contract (``stats["a"]``, ``"ids" in stats``) must keep working.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import fninfluence as fi
from fninfluence.core import algebra
from fninfluence.core.algebra import DenseStats, OneHotStats
from fninfluence.core.scores import example_grad_dot, pairwise_layer_scores, summed_train_scores
from fninfluence.testing import layer_gradients, per_example_gradients

B, T, D, V, Q = 3, 5, 4, 7, 2


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-13)


def one_hot_and_dense(seed=0):
    """The same batch as OneHotStats and as DenseStats with the one-hot rows written out (repeated ids, a zero value)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 2, (B, T), generator=g)
    ids[0, :3] = 2  # a token repeated within one example
    values = torch.ones(B, T, dtype=torch.float64)
    values[1, 1] = values[2, 4] = 0  # padding / masked tokens
    grads = torch.randn(B, T, 1, D, generator=g, dtype=torch.float64) * values[:, :, None, None]
    tokens = values.sum()
    a = (F.one_hot(ids, V).to(torch.float64) * values[..., None])[:, :, None, :]
    return OneHotStats(ids, values, grads, tokens), DenseStats(a, grads, tokens)


def random_orthogonal(size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(1, size, size, generator=g, dtype=torch.float64))[0]


def test_per_example_gradients_of_one_hot_stats_equal_the_dense_ones():
    one_hot, dense = one_hot_and_dense()
    close(algebra.per_example_grads(one_hot, V), algebra.per_example_grads(dense))
    with pytest.raises(ValueError, match="in_features"):
        algebra.per_example_grads(one_hot)


@pytest.mark.parametrize("low_rank", [False, True])
def test_score_contractions_of_one_hot_stats_equal_the_dense_ones(low_rank):
    one_hot, dense = one_hot_and_dense()
    g = torch.Generator().manual_seed(1)
    query = torch.randn(Q, 1, D, V, generator=g, dtype=torch.float64)
    if low_rank:
        query = (torch.randn(Q, 1, D, 2, generator=g, dtype=torch.float64),
                 torch.randn(Q, 1, 2, V, generator=g, dtype=torch.float64))
    for out in ("qnt", "qn", "q"):
        close(algebra.score_contraction(query, one_hot, out), algebra.score_contraction(query, dense, out))
    close(pairwise_layer_scores(query, one_hot, per_token=True), pairwise_layer_scores(query, dense, per_token=True))
    close(summed_train_scores(query, one_hot), summed_train_scores(query, dense))
    # and the contraction itself is <P_q, G_n>
    dense_query = query if not low_rank else query[0] @ query[1]
    close(pairwise_layer_scores(query, dense),
          torch.einsum("qgoi,ngoi->qn", dense_query, algebra.per_example_grads(dense)))


def test_example_grad_dot_of_one_hot_stats_equals_the_dense_one():
    one_hot, dense = one_hot_and_dense()
    preconditioned = torch.randn(B, 1, D, V, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    close(example_grad_dot(preconditioned, one_hot), example_grad_dot(preconditioned, dense))
    close(example_grad_dot(preconditioned, dense), (preconditioned * algebra.per_example_grads(dense)).flatten(1).sum(1))


@pytest.mark.parametrize("rotated", [False, True])
def test_self_products_and_squared_gradients_of_one_hot_stats_equal_the_dense_ones(rotated):
    one_hot, dense = one_hot_and_dense()
    if rotated:  # the eigenbasis (Q_S, I) of an embedding
        qs = random_orthogonal(D, 3)
        one_hot, dense = algebra.in_eigenbasis(one_hot, None, qs), algebra.in_eigenbasis(dense, None, qs)
    weights = torch.rand(1, D, V, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grads = algebra.per_example_grads(dense)
    close(algebra.self_products(one_hot), algebra.self_products(dense))
    close(algebra.self_products(dense), grads.square().flatten(1).sum(1))
    close(algebra.self_products(one_hot, weights), algebra.self_products(dense, weights))
    close(algebra.self_products(dense, weights), (grads.square() * weights).flatten(1).sum(1))
    close(algebra.squared_example_grads(one_hot, V), algebra.squared_example_grads(dense, V))
    close(algebra.squared_example_grads(dense, V), grads.square().sum(0))


def test_rank_one_closed_forms_equal_the_general_ones():
    g = torch.Generator().manual_seed(5)
    stats = DenseStats(torch.randn(B, 1, 2, 3, generator=g, dtype=torch.float64),
                       torch.randn(B, 1, 2, 4, generator=g, dtype=torch.float64))
    grads, weights = algebra.per_example_grads(stats), torch.rand(2, 4, 3, generator=g, dtype=torch.float64)
    close(algebra.self_products(stats), grads.square().flatten(1).sum(1))
    close(algebra.self_products(stats, weights), (grads.square() * weights).flatten(1).sum(1))
    close(algebra.squared_example_grads(stats, 3), grads.square().sum(0))


def test_kfac_second_moments_of_one_hot_stats_are_the_diagonal_of_the_dense_ones():
    one_hot, dense = one_hot_and_dense()
    close(torch.diag_embed(algebra.input_second_moment(one_hot, V, torch.float64)),
          algebra.input_second_moment(dense, V, torch.float64))
    close(algebra.gradient_second_moment(one_hot, torch.float64), algebra.gradient_second_moment(dense, torch.float64))
    a = dense.a.flatten(0, 1)
    close(algebra.input_second_moment(dense, V, torch.float64), torch.einsum("ngi,ngj->gij", a, a))


def test_the_estimators_agree_on_one_hot_and_dense_stats():
    one_hot, dense = one_hot_and_dense()
    shape = (1, D, V)
    factors = {"lambda": torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) + 0.1,
               "gradient_eigenvectors": random_orthogonal(D, 7)}
    from fninfluence.curvature.eigenbasis import lambda_init, lambda_update, self_score_in_basis
    state = lambda_init(shape, torch.float64, "cpu")
    close(lambda_update(state, one_hot, factors)["lambda_sum"], lambda_update(state, dense, factors)["lambda_sum"])
    close(self_score_in_basis(factors, one_hot, 0.1), self_score_in_basis(factors, dense, 0.1))
    close(fi.identity.self_score({}, one_hot, None), fi.identity.self_score({}, dense, None))


@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("wide_output", [False, True])
def test_pseudo_token_stats_carry_exactly_the_given_gradients(one_hot, wide_output):
    like = one_hot_and_dense()[0 if one_hot else 1]
    out, inp = (D, V) if one_hot or not wide_output else (V + 2, V)
    processed = torch.randn(B, 1, out, inp, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    stats = algebra.pseudo_token_stats(processed, like)
    assert isinstance(stats, type(like)) and stats.tokens is like.tokens
    close(algebra.per_example_grads(stats, inp), processed)


def test_records_read_like_the_documented_dicts():
    one_hot, dense = one_hot_and_dense()
    assert set(dense) == {"a", "g", "tokens"} and set(one_hot) == {"ids", "id_values", "g", "tokens"}
    assert "ids" not in dense and "ids" in one_hot and dense["a"] is dense.a and one_hot.get("a") is None
    assert set(DenseStats(dense.a, dense.g)) == {"a", "g"} and len(DenseStats(dense.a, dense.g)) == 2
    with pytest.raises(KeyError):
        DenseStats(dense.a, dense.g)["tokens"]
    from_dicts = algebra.as_stats(dict(one_hot)), algebra.as_stats({"a": dense.a, "g": dense.g})
    assert isinstance(from_dicts[0], OneHotStats) and isinstance(from_dicts[1], DenseStats)
    assert from_dicts[1].tokens is None and algebra.as_stats(dense) is dense


def test_cast_changes_only_the_floating_point_fields():
    one_hot, dense = one_hot_and_dense()
    narrow = algebra.cast(one_hot, torch.float32)
    assert (narrow.g.dtype, narrow.id_values.dtype, narrow.ids.dtype, narrow.tokens.dtype) == (
        torch.float32, torch.float32, torch.int64, torch.float64)
    narrow = algebra.cast(dense, torch.float32)
    assert (narrow.a.dtype, narrow.g.dtype, narrow.tokens.dtype) == (torch.float32, torch.float32, torch.float64)
    assert algebra.cast(dense, torch.float64).a is dense.a  # no copy when the dtype is already right


def test_records_pass_through_vmap_and_tree_map():
    one_hot, dense = one_hot_and_dense()
    doubled = torch.utils._pytree.tree_map(lambda x: 2 * x, dense)
    assert isinstance(doubled, DenseStats)
    close(doubled.a, 2 * dense.a)
    single = torch.func.vmap(lambda s: OneHotStats(s.ids[None], s.id_values[None], s.g[None], s.id_values.sum()))(
        OneHotStats(one_hot.ids, one_hot.id_values, one_hot.g))
    merged = algebra.from_single_examples(single)
    assert isinstance(merged, OneHotStats)
    close(merged.g, one_hot.g)
    close(merged.tokens, one_hot.tokens)


def _step(stats, queries):
    """A compiled step's worth of algebra: cast, per-example gradients, scores and self products, records out."""
    stats = {layer: algebra.cast(s, torch.float64) for layer, s in stats.items()}
    scores = {layer: pairwise_layer_scores(queries[layer], s) + algebra.self_products(s)
              for layer, s in stats.items()}
    grads = {"dense": algebra.per_example_grads(stats["dense"]),
             "one_hot": algebra.per_example_grads(stats["one_hot"], V)}
    return scores, grads, stats


def test_a_compiled_step_taking_and_returning_records_is_one_graph():
    one_hot, dense = one_hot_and_dense()
    stats = {"dense": algebra.cast(dense, torch.float32), "one_hot": algebra.cast(one_hot, torch.float32)}
    queries = {layer: torch.randn(Q, 1, D, V, dtype=torch.float64) for layer in stats}
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_step)(stats, queries)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    torch._dynamo.reset()
    scores, grads, records = torch.compile(_step, fullgraph=True, backend="eager")(stats, queries)
    expected = _step(stats, queries)
    assert isinstance(records["dense"], DenseStats) and isinstance(records["one_hot"], OneHotStats)
    for layer in stats:
        close(scores[layer], expected[0][layer])
        close(grads[layer], expected[1][layer])
    close(grads["one_hot"], grads["dense"])


# -- a user estimator written against the dict contract ---------------------------------------------

class TokenTagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D, padding_idx=0)
        self.head = nn.Linear(D, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


class TagTask(fi.Task):
    def compute_train_loss(self, batch, model, sample=False):
        ids, labels, mask = batch
        losses = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), reduction="none")
        return (losses * mask.flatten()).sum()

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def get_attention_mask(self, batch):
        return batch[2]

    def tracked_modules(self):
        return ["embed", "head"]  # embeddings are tracked only when named


def _norm_init(shape, dtype, device):
    return {"squared_norm_sum": torch.zeros((), dtype=dtype, device=device),
            "tokens": torch.zeros((), dtype=dtype, device=device)}


def _norm_update(state, stats, factors):
    """``sum_n |G_n|^2``, reading the stats as the documented dicts: ``a`` or, for an embedding, ``ids``."""
    if "ids" in stats:
        a = F.one_hot(stats["ids"], V).to(stats["g"].dtype) * stats["id_values"][..., None]
        a = a[:, :, None, :]
    else:
        a = stats["a"]
    grads = torch.einsum("btgo,btgi->bgoi", stats["g"], a)
    return {"squared_norm_sum": state["squared_norm_sum"] + grads.square().sum(),
            "tokens": state["tokens"] + stats["tokens"]}


def _norm_finalize(state, factors):
    return dict(state)


def test_a_user_estimator_that_indexes_the_stats_as_dicts_still_works():
    torch.manual_seed(0)
    model, task = TokenTagger().double().eval(), TagTask()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (6, 4), generator=g)
    ids[0, 0] = 0  # the padding token
    mask = torch.ones(6, 4, dtype=torch.float64)
    mask[1, 2:] = 0
    data = TensorDataset(ids, torch.randint(0, 3, (6, 4), generator=g), mask)
    estimator = fi.CurvatureEstimator("squared_norms", (fi.FitPass("norms", _norm_init, _norm_update, _norm_finalize),),
                                      lambda factors, grads, damping: grads, lambda factors, stats, damping: None)
    factors = fi.fit_factors(model, task, data, strategy=estimator, use_empirical_fisher=True, batch_size=4,
                             progress=False)
    expected = layer_gradients(per_example_gradients(model, task, data), factors.layers)
    for layer in ("embed", "head"):
        close(factors[layer]["squared_norm_sum"], expected[layer].square().sum())
        assert float(factors[layer]["tokens"]) == float(mask.sum())
