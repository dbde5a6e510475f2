"""nn.Embedding as a tracked layer: per-example gradients, every strategy against an oracle, compile, memory.

The KFAC/EKFAC oracle is the same model with the embedding replaced by an explicit one-hot
``nn.Linear`` (bias-free, weight = embedding.weight.T) that goes through the dense code path.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import Subset, TensorDataset

import fninfluence as fi
from fninfluence.capture import ModelTap
from fninfluence.capture.layers import resolve_targets
from fninfluence.curvature import per_example_grads
from fninfluence.testing import layer_gradients, per_example_gradients

QUIET = dict(progress=False)
VOCAB, WIDTH, PAD = 13, 4, 0


class Tagger(nn.Module):
    """Token classification whose tokens interact (a cumulative sum), so ``g_t`` depends on other tokens."""

    def __init__(self, vocab=VOCAB, d=WIDTH, classes=3, padding_idx=PAD, **embedding_kwargs):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=padding_idx, **embedding_kwargs)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        x = self.embed(ids)
        x = x + torch.tanh(self.mix(x)).cumsum(1)
        return self.head(torch.tanh(x))


class OneHotLinear(nn.Linear):
    """An embedding computed as ``one_hot(ids) @ weight.T`` (the padding token's one-hot row zeroed)."""

    def __init__(self, embedding: nn.Embedding):
        vocab, d = embedding.weight.shape
        super().__init__(vocab, d, bias=False, dtype=embedding.weight.dtype)
        self.weight = nn.Parameter(embedding.weight.detach().T.clone())
        self.padding_idx = embedding.padding_idx

    def forward(self, ids):
        x = F.one_hot(ids, self.in_features).to(self.weight.dtype)
        if self.padding_idx is not None:
            x = x * (ids != self.padding_idx)[..., None].to(x.dtype)
        return super().forward(x)


def as_one_hot_linear(model: Tagger) -> Tagger:
    dense = copy.deepcopy(model)
    dense.embed = OneHotLinear(model.embed)
    return dense


class TagTask(fi.Task):
    """Summed per-token cross-entropy over the tokens of the attention mask."""

    def __init__(self, modules=("embed", "mix", "head")):
        self.modules = None if modules is None else list(modules)

    def compute_train_loss(self, batch, model, sample=False):
        ids, labels, mask = batch
        logits = model(ids)
        if sample:
            with torch.no_grad():
                labels = torch.multinomial(logits.detach().flatten(0, 1).softmax(-1), 1).view(labels.shape)
        losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        return (losses * mask.flatten().to(losses.dtype)).sum()

    def compute_measurement(self, batch, model):
        ids, labels, mask = batch
        logits = model(ids)
        correct = logits.gather(-1, labels[..., None]).squeeze(-1)
        return -((correct - logits.logsumexp(-1)) * mask).sum()

    def tracked_modules(self):
        return self.modules

    def get_attention_mask(self, batch):
        return batch[2]


def tagging_data(n=12, seq=6, vocab=VOCAB, seed=0):
    """Token ids with padding tokens, repeated tokens (a constant row) and a masked tail."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 3, (n, seq), generator=g)  # the last ids never occur: zero-frequency rows
    ids[0, 1] = ids[2, 4] = PAD
    ids[1] = 3
    labels = torch.randint(0, 3, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.float64)
    mask[2, 4:] = 0
    mask[5, 3:] = 0
    return TensorDataset(ids, labels, mask)


def make_model(**kwargs):
    torch.manual_seed(0)
    return Tagger(**kwargs).double().eval()


def test_per_example_gradients_with_padding_repeats_and_mask():
    model, task, data = make_model(), TagTask(), tagging_data()
    for per_example in (False, True):
        engine = ModelTap(model, task, per_example=per_example)
        batch = data.tensors
        _, stats = engine.layer_stats("train", engine.params, engine.buffers, batch, engine.probes_for("train", batch))
        assert set(stats["embed"]) == {"ids", "id_values", "g", "tokens"}
        expected = layer_gradients(per_example_gradients(model, task, data), engine.specs)
        assert engine.specs["embed"].shape == (1, WIDTH, VOCAB)
        assert expected["embed"][:, 0, :, PAD].abs().max() == 0  # PyTorch gives the padding row no gradient
        for layer, grads in expected.items():
            tapped = per_example_grads(stats[layer], engine.specs[layer].in_features)
            torch.testing.assert_close(tapped, grads, rtol=0, atol=1e-13 * float(grads.abs().max()))
        assert float(stats["embed"]["tokens"]) == float(data.tensors[2].sum())


def _scores(model, task, strategy, train, queries, damping=None, **options):
    factors = fi.fit_factors(model, task, train, strategy=strategy, use_empirical_fisher=True, batch_size=5,
                             **options, **QUIET)
    pairwise = fi.pairwise_scores(model, task, factors, queries, train, damping=damping, batch_size=4,
                                  per_module=True, **options, **QUIET)
    self_scores = fi.self_scores(model, task, factors, train, damping=damping, batch_size=5, per_module=True,
                                 **options, **QUIET)
    return factors, pairwise, self_scores


def _oracle(model, task, train, queries, specs):
    train_grads = layer_gradients(per_example_gradients(model, task, train), specs)["embed"]
    query_grads = layer_gradients(per_example_gradients(model, task, queries, objective="measurement"), specs)["embed"]
    return train_grads, query_grads


def test_identity_scores_are_gradient_inner_products():
    model, task, train = make_model(), TagTask(), tagging_data()
    queries = Subset(tagging_data(seed=1), range(4))
    factors, pairwise, self_scores = _scores(model, task, "identity", train, queries)
    train_grads, query_grads = _oracle(model, task, train, queries, factors.layers)
    torch.testing.assert_close(pairwise["embed"], torch.einsum("qgoi,ngoi->qn", query_grads, train_grads),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(self_scores["embed"], train_grads.flatten(1).square().sum(1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("damping", [None, 1e-2])
def test_diagonal_scores_against_loop_oracle(damping):
    model, task, train = make_model(), TagTask(), tagging_data()
    queries = Subset(tagging_data(seed=1), range(4))
    factors, pairwise, self_scores = _scores(model, task, "diagonal", train, queries, damping)
    train_grads, query_grads = _oracle(model, task, train, queries, factors.layers)
    second_moment = train_grads.square().mean(0)
    torch.testing.assert_close(factors["embed"]["lambda"], second_moment, rtol=1e-12, atol=1e-300)
    lam = 0.1 * second_moment.mean() if damping is None else damping
    inverse = 1 / (second_moment + lam)
    torch.testing.assert_close(pairwise["embed"], torch.einsum("qgoi,ngoi->qn", query_grads * inverse, train_grads),
                               rtol=1e-10, atol=0)
    torch.testing.assert_close(self_scores["embed"], (train_grads.square() * inverse).flatten(1).sum(1),
                               rtol=1e-10, atol=0)


@pytest.mark.parametrize("damping", [None, 0.05])
@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_kfac_and_ekfac_equal_the_one_hot_linear_layer(strategy, damping):
    model, task, train = make_model(), TagTask(), tagging_data()
    queries = Subset(tagging_data(seed=1), range(4))
    factors, pairwise, self_scores = _scores(model, task, strategy, train, queries, damping)
    dense_factors, dense_pairwise, dense_self = _scores(as_one_hot_linear(model), task, strategy, train, queries,
                                                        damping)
    assert "activation_eigenvectors" not in factors["embed"]
    assert factors["embed"]["activation_diagonal"].shape == (1, VOCAB)
    torch.testing.assert_close(torch.diag_embed(factors["embed"]["activation_diagonal"]),
                               dense_factors["embed"]["activation_covariance"], rtol=1e-14, atol=0)
    for layer in ("embed", "mix", "head"):
        scale = float(dense_pairwise[layer].abs().max())
        torch.testing.assert_close(pairwise[layer], dense_pairwise[layer], rtol=0, atol=1e-10 * scale)
        torch.testing.assert_close(self_scores[layer], dense_self[layer], rtol=1e-10, atol=0)


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
def test_self_scores_are_the_diagonal_of_pairwise_scores(strategy):
    model, task, data = make_model(), TagTask(["embed"]), tagging_data()
    factors = fi.fit_factors(model, task, data, strategy=strategy, batch_size=5, **QUIET)
    train_task = TagTask(["embed"])
    train_task.compute_measurement = lambda batch, model: train_task.compute_train_loss(batch, model)
    pairwise = fi.pairwise_scores(model, train_task, factors, data, data, batch_size=5, **QUIET)
    self_scores = fi.self_scores(model, train_task, factors, data, batch_size=5, **QUIET)
    torch.testing.assert_close(self_scores, pairwise.diagonal(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
def test_per_token_and_low_rank_scores(strategy):
    model, task, train = make_model(), TagTask(["embed"]), tagging_data()
    queries = Subset(tagging_data(seed=1), range(3))
    factors = fi.fit_factors(model, task, train, strategy=strategy, batch_size=5, **QUIET)
    pairwise = fi.pairwise_scores(model, task, factors, queries, train, batch_size=5, **QUIET)
    per_token = fi.pairwise_scores(model, task, factors, queries, train, batch_size=5, per_token=True, **QUIET)
    torch.testing.assert_close(per_token.sum(-1), pairwise, rtol=1e-10, atol=1e-12)
    low_rank = fi.pairwise_scores(model, task, factors, queries, train, batch_size=5, query_rank=WIDTH - 1,
                                  full_svd=True, **QUIET)
    dense_rank = fi.pairwise_scores(as_one_hot_linear(model), task, factors, queries, train, batch_size=5,
                                    query_rank=WIDTH - 1, full_svd=True, **QUIET) if strategy == "identity" else None
    assert low_rank.shape == pairwise.shape and torch.isfinite(low_rank).all()
    if dense_rank is not None:
        torch.testing.assert_close(low_rank, dense_rank, rtol=1e-9, atol=1e-12)
    summed = fi.pairwise_scores(model, task, factors, queries, train, batch_size=5, aggregate_train=True, **QUIET)
    torch.testing.assert_close(summed[:, 0], pairwise.sum(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
def test_compiled_equals_eager(strategy):
    torch._dynamo.reset()
    model, task, train = make_model(), TagTask(), tagging_data()
    queries = Subset(tagging_data(seed=1), range(4))
    compiled = dict(compile={"backend": "aot_eager"})
    eager = _scores(model, task, strategy, train, queries)
    graph = _scores(model, task, strategy, train, queries, **compiled)
    for key, value in eager[0]["embed"].items():
        torch.testing.assert_close(graph[0]["embed"][key], value, rtol=1e-12, atol=1e-14)
    for expected, actual in zip(eager[1:], graph[1:]):
        for layer in expected:
            torch.testing.assert_close(actual[layer], expected[layer], rtol=1e-10, atol=1e-12)


def test_factors_store_round_trip(tmp_path):
    model, task, train = make_model(), TagTask(), tagging_data()
    fit = dict(strategy="ekfac", use_empirical_fisher=True, batch_size=5, **QUIET)
    factors = fi.fit_factors(model, task, train, store=tmp_path / "fit", data_partitions=2, **fit)
    in_memory = fi.fit_factors(model, task, train, **fit)
    loaded = fi.Factors.load(tmp_path / "fit")
    for source in (factors, loaded):
        assert set(source["embed"]) == set(in_memory["embed"])
        for key, value in in_memory["embed"].items():
            torch.testing.assert_close(source["embed"][key], value, rtol=1e-12, atol=1e-14)
    scores = fi.self_scores(model, task, loaded, train, batch_size=5, **QUIET)
    torch.testing.assert_close(scores, fi.self_scores(model, task, in_memory, train, batch_size=5, **QUIET))


def test_embeddings_are_tracked_only_when_named():
    model = make_model()
    assert [t.layer for t in resolve_targets(model, None)] == ["mix", "head"]
    assert [t.layer for t in resolve_targets(model, ["embed"])] == ["embed"]


class TiedLM(nn.Module):
    def __init__(self, vocab=VOCAB, d=WIDTH):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.embed(ids)))


class TiedTask(TagTask):
    def compute_train_loss(self, batch, model, sample=False):
        ids = batch[0]
        return F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")

    def get_attention_mask(self, batch):
        return None


@pytest.mark.parametrize("tracked", ["embed", "lm_head"])
def test_a_tied_embedding_is_refused(tracked):
    model = TiedLM().double()
    with pytest.raises(fi.InfluenceError, match="tied"):
        fi.fit_factors(model, TiedTask([tracked]), tagging_data(), strategy="ekfac", **QUIET)


@pytest.mark.parametrize("kwargs,match", [({"max_norm": 1.0}, "max_norm"), ({"scale_grad_by_freq": True}, "scale_grad")])
def test_unsupported_embedding_settings_are_refused(kwargs, match):
    model = make_model(**kwargs)
    with pytest.raises(fi.InfluenceError, match=match):
        fi.fit_factors(model, TagTask(), tagging_data(), strategy="ekfac", **QUIET)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
def test_a_large_vocabulary_makes_no_vocabulary_squared_or_per_example_dense_tensor(strategy):
    vocab, width, batch = 50_000, 8, 4
    torch.manual_seed(0)
    model = Tagger(vocab=vocab, d=width, padding_idx=None).eval()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, vocab, (8, 16), generator=g), torch.randint(0, 3, (8, 16), generator=g),
                         torch.ones(8, 16))
    task = TagTask(["embed", "head"])
    with LargestTensor() as seen:
        factors = fi.fit_factors(model, task, data, strategy=strategy, batch_size=batch, **QUIET)
        scores = fi.self_scores(model, task, factors, data, batch_size=batch, **QUIET)
    assert scores.shape == (8,) and torch.isfinite(scores).all()
    assert seen.largest <= width * vocab  # the parameter and Lambda sizes: nothing [V, V] or [B, D, V]
