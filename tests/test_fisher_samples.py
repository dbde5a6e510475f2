"""``fit_factors(fisher_samples=S)``: each example's labels drawn S times for the true Fisher, every statistic of the
fit averaged over the draws. Draw 0 is the single draw of ``S=1``, so ``S=1`` changes nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fninfluence as fi
from fninfluence.errors import InfluenceError
from fninfluence.sampling import ExampleDraws, uniforms
from fninfluence.store.describe import describe
from models import ClassificationTask, LMTask, TinyTransformerLM, classification_data, float64, mlp, sequence_data


def fit(model, task, data, **options):
    """The true Fisher unless a test asks otherwise (the library's default is the empirical one)."""
    options.setdefault("batch_size", 4)
    options.setdefault("use_empirical_fisher", False)
    return fi.fit_factors(model, task, data, progress=False, **options)


def assert_same_factors(ours: fi.Factors, expected: fi.Factors, rtol=1e-10, atol=1e-13):
    """Every factor within float tolerance (eigenvectors only where bit-exact: elsewhere a small eigenvalue gap
    amplifies rounding in them, and the covariances they come from are compared instead)."""
    assert set(ours.layers) == set(expected.layers)
    for layer in expected.layers:
        assert set(ours[layer]) == set(expected[layer])
        for name, value in expected[layer].items():
            if name.endswith("eigenvectors") and rtol > 0:
                continue
            torch.testing.assert_close(ours[layer][name], value, rtol=rtol, atol=atol, msg=f"{layer}/{name}")


def test_draw_zero_is_the_single_draw_of_before():
    """The uniforms (exact integer hashes) and labels that fninfluence drew before ``fisher_samples`` existed,
    pinned: draw 0 reproduces them bit for bit, draw 1 is another draw."""
    before = [["0x1.569e80c31883dp-1", "0x1.79fb97301342ap-2"], ["0x1.22a340ae379ecp-3", "0x1.b4421c1329829p-1"],
              ["0x1.9fa63a63825f3p-1", "0x1.dd367a893f846p-2"]]
    for draw in (None, 0):
        options = {} if draw is None else {"draw": draw}
        got = uniforms(seed=0, call=0, stream=0, examples=torch.arange(3), count=2, **options)
        assert [[float.hex(float(v)) for v in row] for row in got] == before
    probs = torch.softmax(torch.linspace(-1, 1, 30, dtype=torch.float64).reshape(10, 3), -1)
    with ExampleDraws(torch.arange(10), seed=0, draw=0):
        assert torch.multinomial(probs, 1).flatten().tolist() == [2, 0, 2, 0, 2, 1, 2, 0, 2, 2]
    with ExampleDraws(torch.arange(10), seed=0, draw=1):
        assert torch.multinomial(probs, 1).flatten().tolist() != [2, 0, 2, 0, 2, 1, 2, 0, 2, 2]


def test_one_draw_is_the_default_and_leaves_stores_as_they_were(tmp_path):
    model, data, task = float64(mlp()), classification_data(n=12), ClassificationTask()
    default = fit(model, task, data, store=tmp_path / "default")
    assert_same_factors(fit(model, task, data, fisher_samples=1), default, rtol=0, atol=0)
    assert "fisher_samples" not in describe(tmp_path / "default")["arguments"]  # stores of before still match


def _layer_gradients(model, x, label):
    """``{layer: G}`` of one example (``[out, in + 1]`` with the bias column; ``[1, P]`` for the LayerNorm)."""
    loss = F.cross_entropy(model(x[None]), label, reduction="sum")
    w0, b0, w1, b1, w3, b3 = torch.autograd.grad(loss, [model[0].weight, model[0].bias, model[1].weight,
                                                        model[1].bias, model[3].weight, model[3].bias])
    return {"0": torch.cat([w0, b0[:, None]], 1), "1": torch.cat([w1, b1])[None],
            "3": torch.cat([w3, b3[:, None]], 1)}


def test_several_draws_average_the_statistics_of_each_draw():
    """An autograd loop over (example n, draw s), labels drawn by the documented rule (ExampleDraws keyed by seed,
    s and n): KFAC's S is the mean of g g^T over n and s, EKFAC's Lambda the mean of (Q_S^T G Q_A)^2 in the fit's
    own eigenbasis, the diagonal's (here a LayerNorm, a parameter layer) the mean of G^2; A does not change."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    data, draws, seed = classification_data(n=10), 3, 7
    task = ClassificationTask(modules=["0", "1", "3"])
    strategy = {"*": "ekfac", "1": "diagonal"}
    factors = fit(model, task, data, batch_size=4, strategy=strategy, seed=seed, fisher_samples=draws)
    grads = []
    for n in range(len(data)):
        x, _ = data[n]
        for s in range(draws):
            with ExampleDraws(torch.tensor([n]), seed=seed, draw=s):
                label = torch.multinomial(model(x[None]).detach().softmax(-1), 1).flatten()
            grads.append(_layer_gradients(model, x, label))
    close = dict(rtol=1e-10, atol=1e-14)
    single = fit(model, task, data, batch_size=4, strategy=strategy, seed=seed)
    for layer in ("0", "3"):
        g = torch.stack([G[layer][:, -1] for G in grads])  # T = 1: the output gradient is the bias column
        torch.testing.assert_close(factors[layer]["gradient_covariance"][0], g.T @ g / len(grads), **close)
        torch.testing.assert_close(factors[layer]["activation_covariance"], single[layer]["activation_covariance"],
                                   **close)
        qs, qa = factors[layer]["gradient_eigenvectors"][0], factors[layer]["activation_eigenvectors"][0]
        rotated = torch.stack([(qs.T @ G[layer] @ qa).square() for G in grads]).mean(0)
        torch.testing.assert_close(factors[layer]["lambda"][0], rotated, **close)
    torch.testing.assert_close(factors["1"]["lambda"][0], torch.stack([G["1"] for G in grads]).square().mean(0),
                               **close)


def test_more_draws_bring_two_seeds_closer():
    """Deterministic (fixed model, data and seeds): the distance between two seeds' sampled Fisher, relative to
    its size and averaged over four pairs of seeds, falls about as 1/sqrt(S): at S = 8 it is 0.28 (KFAC's S) and
    0.36 (the diagonal's Lambda) of its S = 1 value here, 1/sqrt(8) = 0.35."""
    model, data, task = float64(mlp(hidden=8)), classification_data(n=40), ClassificationTask()

    def distance(draws, strategy, factor):
        total = 0.0
        for first in (0, 2, 4, 6):
            a, b = (fit(model, task, data, batch_size=40, strategy=strategy, seed=seed, fisher_samples=draws)
                    for seed in (first, first + 1))
            total += sum(float((a[layer][factor] - b[layer][factor]).norm() / b[layer][factor].norm())
                         for layer in a.layers)
        return total

    for strategy, factor in (("kfac", "gradient_covariance"), ("diagonal", "lambda")):
        assert distance(8, strategy, factor) < 0.5 * distance(1, strategy, factor)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2", None])
def test_invalid_fisher_samples_are_refused(value):
    model, data, task = float64(mlp()), classification_data(n=4), ClassificationTask()
    with pytest.raises(InfluenceError, match="fisher_samples"):
        fit(model, task, data, fisher_samples=value)


def test_several_draws_need_the_true_fisher():
    model, data, task = float64(mlp()), classification_data(n=4), ClassificationTask()
    with pytest.raises(InfluenceError, match="fisher_samples=2.*use_empirical_fisher"):
        fit(model, task, data, fisher_samples=2, use_empirical_fisher=True)
    fit(model, task, data, fisher_samples=1, use_empirical_fisher=True)


def test_several_draws_do_not_depend_on_batches_partitions_vmap_or_resume(tmp_path):
    """The draws are keyed per example (and draw), so batch size, partitions, per-example vmap and an interrupted
    fit give the same factors; a store records the number of draws and refuses another."""
    model, data, task = float64(mlp()), classification_data(n=20), ClassificationTask()
    reference = fit(model, task, data, batch_size=20, fisher_samples=3)
    for options in (dict(batch_size=3, data_partitions=3, module_partitions=2), dict(batch_size=7),
                    dict(batch_size=4, per_example_vmap=True)):
        assert_same_factors(fit(model, task, data, fisher_samples=3, **options), reference)
    store = tmp_path / "s"
    fit(model, task, data, store=store, data_partitions=2, passes=["covariance"], target_data_partitions=[1],
        fisher_samples=3)
    assert_same_factors(fit(model, task, data, store=store, data_partitions=2, fisher_samples=3), reference)
    assert describe(store)["arguments"]["fisher_samples"] == 3
    with pytest.raises(InfluenceError, match="fisher_samples"):
        fit(model, task, data, store=store, data_partitions=2, fisher_samples=2)


def test_language_model_draws_are_per_example():
    model, data, task = float64(TinyTransformerLM()), sequence_data(n=7), LMTask()
    reference = fit(model, task, data, batch_size=7, strategy="kfac", fisher_samples=2)
    assert_same_factors(fit(model, task, data, batch_size=2, strategy="kfac", fisher_samples=2), reference)
    single = fit(model, task, data, batch_size=7, strategy="kfac")
    assert not torch.allclose(single["lm_head"]["gradient_covariance"], reference["lm_head"]["gradient_covariance"])


@pytest.mark.slow
def test_a_compiled_multi_draw_fit_is_one_graph_per_pass_and_equals_eager():
    """The draws are unrolled in the step (each draw index a constant): still one graph per pass, no break."""
    from torch._dynamo.utils import counters

    model, data, task = float64(mlp()), classification_data(n=10), ClassificationTask()
    torch._dynamo.reset()
    counters.clear()
    compiled = fit(model, task, data, fisher_samples=2, compile={"backend": "aot_eager"})
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    assert_same_factors(compiled, fit(model, task, data, batch_size=5, fisher_samples=2))


@pytest.mark.slow
def test_the_benchmark_runs_and_tabulates(tmp_path):
    """benchmarks/fisher_samples.py on a few subsets and seeds (its numbers are in docs/concepts.md)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import fisher_samples

    result = fisher_samples.main(["--strategies", "diagonal", "--draws", "1", "2", "--seeds", "2", "--subsets", "4",
                                  "--reference-draws", "2", "--timing-copies", "1", "--repeats", "1",
                                  "--out", str(tmp_path / "r.json")])
    assert [r["fisher_samples"] for r in result["rows"]] == [1, 2, "empirical"]
    assert result["rows"][-1]["top10"] == 1.0 and (tmp_path / "r.json").exists()
    assert "| diagonal | 2 |" in fisher_samples.table(result)


class LabelCallsTask(ClassificationTask):
    """Records the ``sample`` argument of every training-loss call."""

    def __init__(self):
        super().__init__()
        self.samples = []

    def compute_train_loss(self, batch, model, sample=False):
        self.samples.append(sample)
        return super().compute_train_loss(batch, model, sample=sample)


def test_the_default_is_the_empirical_fisher():
    """fninfluence 0.2: ``fit_factors`` asks the task for the data's labels (``sample=False``) unless told otherwise,
    and its factors are those of ``use_empirical_fisher=True`` bit for bit."""
    model, data = float64(mlp()), classification_data(n=12)
    task = LabelCallsTask()
    default = fi.fit_factors(model, task, data, batch_size=4, progress=False)
    assert task.samples and not any(task.samples)
    assert default.use_empirical_fisher is True
    assert_same_factors(default, fit(model, task, data, use_empirical_fisher=True), rtol=0, atol=0)
    task.samples.clear()
    fit(model, task, data, use_empirical_fisher=False)
    assert any(task.samples)


def test_a_store_of_the_old_default_names_the_argument_that_reuses_it(tmp_path):
    """A store fitted with the true Fisher (the default before 0.2) is refused by a call with today's default, and
    the refusal says to pass ``use_empirical_fisher=False``, which then reuses it."""
    model, data, task = float64(mlp()), classification_data(n=12), ClassificationTask()
    stored = fit(model, task, data, store=tmp_path / "factors", use_empirical_fisher=False)
    with pytest.raises(InfluenceError, match=r"(?s)use_empirical_fisher: False \(stored\) vs True.*pass "
                                             r"use_empirical_fisher=False to reuse it"):
        fi.fit_factors(model, task, data, batch_size=4, progress=False, store=tmp_path / "factors")
    assert_same_factors(fit(model, task, data, store=tmp_path / "factors", use_empirical_fisher=False), stored,
                        rtol=0, atol=0)


def test_several_draws_with_the_default_name_the_argument():
    model, data, task = float64(mlp()), classification_data(n=4), ClassificationTask()
    with pytest.raises(InfluenceError, match=r"use_empirical_fisher=True \(the default\).*pass "
                                             r"use_empirical_fisher=False with fisher_samples"):
        fi.fit_factors(model, task, data, batch_size=4, progress=False, fisher_samples=4)
