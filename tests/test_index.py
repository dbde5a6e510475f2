"""The training-gradient index: exact where it stores the tokens or rank-one pairs, the best rank-K
approximation otherwise, resumable, and refused for a model it was not built from."""

from __future__ import annotations

import pytest
import torch

import fninfluence as fi
from fninfluence.errors import InfluenceError
from fninfluence.index import build_index, index_scores, load_index
from fninfluence.index.factorize import factorize
from fninfluence.testing import layer_gradients, per_example_gradients

from models import LMTask, TinyTransformerLM, classification_data, mlp, sequence_data
from test_parameters import CrossEntropy, Normed


def _lm(seq=6):
    torch.manual_seed(0)
    return (TinyTransformerLM(seq=seq).double().eval(), LMTask(), sequence_data(n=14, seq=seq),
            sequence_data(n=4, seq=seq, seed=1))


def _close(actual, expected, tol=1e-10):
    assert ((actual - expected).norm() / expected.norm()).item() <= tol


def test_exact_index_scores_equal_pairwise_scores(tmp_path):
    model, task, train, queries = _lm()
    factors = fi.fit_factors(model, task, train, strategy="ekfac", batch_size=4, progress=False)
    expected = fi.pairwise_scores(model, task, factors, queries, train, batch_size=4, per_module=True,
                                  progress=False)
    index = build_index(model, task, train, tmp_path / "index", rank=None, dtype=torch.float64, batch_size=4,
                        progress=False)
    assert all(layer["width"] == min(layer["out"], layer["in"]) for layer in index.layers.values())  # exact
    scores = index_scores(model, task, factors, queries, tmp_path / "index", batch_size=3, examples_per_read=5,
                          per_module=True, progress=False)
    for layer in expected:
        _close(scores[layer], expected[layer])
    assert all(index.residuals(layer).abs().max() < 1e-12 for layer in index.layers)


def test_layers_without_tokens_are_exact_rank_one_pairs_whatever_the_rank(tmp_path):
    torch.manual_seed(0)
    model, train, queries = mlp().double().eval(), classification_data(n=10), classification_data(n=3, seed=1)
    task = fi.classification_task()
    factors = fi.fit_factors(model, task, train, strategy="kfac", batch_size=4, progress=False)
    index = build_index(model, task, train, tmp_path, rank=1, dtype=torch.float64, batch_size=4, progress=False)
    assert {layer["width"] for layer in index.layers.values()} == {1}
    _close(index_scores(model, task, factors, queries, tmp_path, progress=False),
           fi.pairwise_scores(model, task, factors, queries, train, progress=False))


def test_parameter_layers_are_indexed_exactly(tmp_path):
    torch.manual_seed(0)
    model, train, queries = Normed().double().eval(), classification_data(n=8), classification_data(n=2, seed=1)
    task = CrossEntropy(["fc", "norm", "custom", "head"])
    factors = fi.fit_factors(model, task, train, strategy="diagonal", batch_size=4, progress=False)
    build_index(model, task, train, tmp_path, rank=2, dtype=torch.float64, batch_size=4, progress=False)
    _close(index_scores(model, task, factors, queries, tmp_path, progress=False),
           fi.pairwise_scores(model, task, factors, queries, train, progress=False))


@pytest.mark.parametrize("rank, seq", [(1, 6), (3, 6), (3, 10)])
def test_truncated_layers_hold_the_best_rank_k_gradient(rank, seq, tmp_path):
    """Against the loop oracle: the stored factors multiply out to the rank-K truncated SVD of each
    example's gradient, and the residual is the energy it drops. Six tokens take the QR route (fewer
    tokens than min(out, in) = 8), ten the dense SVD."""
    model, task, train, _ = _lm(seq)
    index = build_index(model, task, train, tmp_path, rank=rank, dtype=torch.float64, batch_size=5, progress=False)
    engine = fi.capture.ModelTap(model, task)
    engine.probes_for("train", next(iter(torch.utils.data.DataLoader(train, batch_size=2))))
    oracle = layer_gradients(per_example_gradients(model, task, train), engine.specs)
    for layer in ("q", "up", "lm_head"):  # (out, in): (8, 9), (16, 9), (11, 8)
        stored = index.read_rows(layer, slice(0, len(train)))
        rebuilt = torch.einsum("nkgo,nkgi->ngoi", stored["g"], stored["a"])
        u, s, vh = torch.linalg.svd(oracle[layer], full_matrices=False)
        best = (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]
        _close(rebuilt, best, 1e-9)
        dropped = (s[..., rank:] ** 2).sum((-1, -2)) / (s ** 2).sum((-1, -2))
        assert torch.allclose(index.residuals(layer), dropped, rtol=1e-8, atol=1e-12)


def test_factorize_pads_short_token_axes_exactly():
    g, a = torch.randn(3, 2, 1, 5, dtype=torch.float64), torch.randn(3, 2, 1, 4, dtype=torch.float64)
    factored = factorize({"g": g, "a": a}, 3)
    assert factored["g"].shape == (3, 3, 1, 5) and factored["a"].shape == (3, 3, 1, 4)
    assert torch.equal(factored["g"][:, :2], g) and not factored["g"][:, 2:].any()


def test_an_interrupted_index_is_refused_then_completed(tmp_path):
    model, task, train, queries = _lm()
    factors = fi.fit_factors(model, task, train, strategy="diagonal", batch_size=4, progress=False)
    assert build_index(model, task, train, tmp_path, rank=None, dtype=torch.float64, batch_size=4, data_partitions=3,
                       target_data_partitions=[0, 2], progress=False) is None
    with pytest.raises(InfluenceError, match="incomplete.*index-data1"):
        index_scores(model, task, factors, queries, tmp_path, progress=False)
    done = (tmp_path / "_done" / "index-data0.json").stat().st_mtime_ns
    assert build_index(model, task, train, tmp_path, rank=None, dtype=torch.float64, batch_size=4, data_partitions=3,
                       progress=False) is not None
    assert (tmp_path / "_done" / "index-data0.json").stat().st_mtime_ns == done  # not recomputed
    _close(index_scores(model, task, factors, queries, tmp_path, progress=False),
           fi.pairwise_scores(model, task, factors, queries, train, progress=False))
    with pytest.raises(InfluenceError, match="rank"):
        build_index(model, task, train, tmp_path, rank=4, dtype=torch.float64, batch_size=4, data_partitions=3,
                    progress=False)


def test_an_index_is_refused_for_another_model_and_for_embeddings(tmp_path):
    model, task, train, queries = _lm()
    factors = fi.fit_factors(model, task, train, strategy="identity", batch_size=7, progress=False)
    build_index(model, task, train, tmp_path / "i", rank=2, batch_size=7, progress=False)
    with torch.no_grad():
        model.q.weight.add_(0.1)
    with pytest.raises(InfluenceError, match="rebuild the index"):
        index_scores(model, task, factors, queries, tmp_path / "i", progress=False)

    class WithEmbedding(LMTask):
        def tracked_modules(self):
            return ["embed", "q"]

    with pytest.raises(InfluenceError, match="embedding"):
        build_index(model, WithEmbedding(), train, tmp_path / "e", progress=False)
    assert load_index(tmp_path / "i").header["rank"] == 2


def test_inspect_describes_a_partial_index(tmp_path, capsys):
    from fninfluence.cli import main

    torch.manual_seed(0)
    model, train = mlp().double().eval(), classification_data(n=10)
    build_index(model, fi.classification_task(), train, tmp_path, rank=3, batch_size=4, data_partitions=2,
                target_data_partitions=[1], progress=False)
    assert main(["inspect", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "index store (INCOMPLETE" in text and "10 examples, rank 3" in text and "missing: index-data0" in text
    assert "pairs per example 1" in text


def test_a_compiled_build_is_one_graph_with_the_eager_index(tmp_path):
    from torch._dynamo.utils import counters

    model, task, train, _ = _lm()
    eager = build_index(model, task, train, tmp_path / "e", rank=2, dtype=torch.float64, batch_size=7, progress=False)
    torch._dynamo.reset()
    counters.clear()
    compiled = build_index(model, task, train, tmp_path / "c", rank=2, dtype=torch.float64, batch_size=7,
                           progress=False, compile={"backend": "aot_eager"})
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    for layer in eager.layers:
        expected, actual = eager.read_rows(layer, slice(0, 14)), compiled.read_rows(layer, slice(0, 14))
        _close(torch.einsum("nkgo,nkgi->ngoi", actual["g"], actual["a"]),
               torch.einsum("nkgo,nkgi->ngoi", expected["g"], expected["a"]))


def test_the_smaller_form_is_chosen_per_layer():
    from fninfluence.index import choose_form
    from fninfluence.store.index_store import example_bytes

    # the 32-channel 3x3 convolution at rank 32: 32 * (32 + 288) numbers factored, 32 * 288 dense
    conv = {"form": "factored", "width": 32, "groups": 1, "out": 32, "in": 288}
    assert example_bytes(conv, 4) - 8 == 40960 and example_bytes({**conv, "form": "dense"}, 4) - 8 == 36864
    assert choose_form(32, 288, 32) == "dense"
    assert choose_form(32, 288, 8) == "factored"  # 8 * 320 < 9216
    assert choose_form(256, 785, 1) == "factored"  # a rank-one layer without tokens
    assert choose_form(1, 40, 1) == "dense"  # a parameter layer (out = 1): 40 <= 41
    assert choose_form(8, 8, 4) == "dense" and choose_form(8, 8, 3) == "factored"  # 64 <= 4 * 16, 64 > 48


@pytest.mark.parametrize("rank", [None, 3])
def test_dense_and_factored_layers_score_like_pairwise(rank, tmp_path):
    """A layer forced dense, one forced factored, the rest by the rule: each layer's scores equal pairwise_scores
    where the stored form is exact (dense always; factored at rank None or without tokens)."""
    model, task, train, queries = _lm()
    factors = fi.fit_factors(model, task, train, strategy="ekfac", batch_size=4, progress=False)
    expected = fi.pairwise_scores(model, task, factors, queries, train, batch_size=4, per_module=True,
                                  progress=False)
    form = {"q": "dense", "up": "factored"}
    index = build_index(model, task, train, tmp_path, rank=rank, dtype=torch.float64, batch_size=4, form=form,
                        progress=False)
    forms = {name: layer["form"] for name, layer in index.layers.items()}
    assert forms["q"] == "dense" and forms["up"] == "factored"
    from fninfluence.index import choose_form

    for name, layer in index.layers.items():
        if name not in form:
            assert layer["form"] == choose_form(layer["out"], layer["in"], layer["width"])
    stored = index.read_rows("q", slice(0, 5))
    assert stored["grads"].shape == (5, 1, 8, 9)
    scores = index_scores(model, task, factors, queries, tmp_path, batch_size=3, examples_per_read=5,
                          per_module=True, progress=False)
    exact = [layer for layer in expected if index.layers[layer]["form"] == "dense" or rank is None]
    assert "q" in exact and (rank is None) == ("up" in exact)
    for layer in exact:
        _close(scores[layer], expected[layer])
    assert index.residuals("q").abs().max() == 0


def test_each_chunk_is_written_once_whatever_the_batches(tmp_path, monkeypatch):
    """The build is linear: with chunks of 4 rows, batches of 3 and three data partitions, every chunk file of
    every array is written exactly once (counted at zarr's store, not timed), and the partitions are whole chunks."""
    from collections import Counter

    import zarr.storage

    import fninfluence.index as index_module

    written = Counter()
    original = zarr.storage.LocalStore.set

    async def counted(self, key, value):
        written[key] += 1
        return await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", counted)
    torch.manual_seed(0)
    model, train = mlp().double().eval(), classification_data(n=30)
    # bytes per example of this MLP's three arrays per layer, float64: make a chunk hold 4 examples
    monkeypatch.setattr(index_module, "CHUNK_BYTES", 4 * (8 * (5 + 7) + 8 + 8 * (3 + 6) + 8))
    index = build_index(model, fi.classification_task(), train, tmp_path, rank=2, dtype=torch.float64,
                        batch_size=3, data_partitions=3, progress=False)
    assert index.chunk_rows == 4
    assert [(r.start, r.stop) for r in index.ranges] == [(0, 12), (12, 24), (24, 30)]  # 10 rounded up to 12
    chunks = {key: count for key, count in written.items() if "/c/" in key}
    arrays = 3 * len(index.layers)  # g, a, residual
    assert len(chunks) == arrays * 8 and set(chunks.values()) == {1}  # 8 chunks of 4 rows (the last of 2)
    reference = build_index(model, fi.classification_task(), train, tmp_path / "one", rank=2, dtype=torch.float64,
                            batch_size=7, progress=False)
    for layer in index.layers:
        for key in ("g", "a"):
            assert torch.equal(index.read_rows(layer, slice(0, 30))[key], reference.read_rows(layer, slice(0, 30))[key])


def test_rows_read_by_index_equal_rows_read_by_slice(tmp_path):
    model, task, train, _ = _lm()
    index = build_index(model, task, train, tmp_path, rank=2, dtype=torch.float64, batch_size=4,
                        form={"q": "dense"}, progress=False)
    picked = torch.tensor([1, 4, 5, 12])
    for layer in ("q", "up"):
        whole = index.read_gradients(layer, slice(0, 14))
        assert torch.equal(index.read_gradients(layer, picked), whole[picked])
    dense = index.read_gradients("q", slice(0, 14))
    index.load_into_memory()
    assert torch.equal(index.read_gradients("q", picked), dense[picked])
