"""True-Fisher label sampling is a function of (seed, example index): resumed, partitioned, re-batched, vmapped
and compiled fits give the same factors, and the labels still follow the model's predictive distribution."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import fninfluence as fi
from fninfluence.compat import kronfluence as compat
from fninfluence.errors import InfluenceError
from fninfluence.sampling import ExampleDraws, uniforms
from models import (ClassificationTask, LMTask, TinyTransformerLM, classification_data, float64, mlp,
                    sequence_data)


def assert_same_factors(ours: fi.Factors, expected: fi.Factors, rtol=1e-10, atol=1e-13):
    """Every factor within float tolerance; eigenvectors only where bit-exact (``rtol=0``): elsewhere a small
    eigenvalue gap amplifies rounding in them, and the covariances they come from are compared instead."""
    assert set(ours.layers) == set(expected.layers)
    for layer in expected.layers:
        assert set(ours[layer]) == set(expected[layer])
        for name, value in expected[layer].items():
            if name.endswith("eigenvectors") and rtol > 0:
                continue
            torch.testing.assert_close(ours[layer][name], value, rtol=rtol, atol=atol, msg=f"{layer}/{name}")


def fit(model, task, data, **options):
    """The true Fisher unless a test asks otherwise (the library's default is the empirical one)."""
    options.setdefault("batch_size", 4)
    options.setdefault("use_empirical_fisher", False)
    return fi.fit_factors(model, task, data, progress=False, **options)


# -- reproducibility through the pipeline --------------------------------------------------------------

def test_a_resumed_true_fisher_fit_equals_an_uninterrupted_one(tmp_path):
    """Interrupted between cells and between passes, with the global generator moved in between: same factors
    (before: 14-32 % apart, because the labels came from the global generator in the order cells ran)."""
    model, data, task = float64(mlp()), classification_data(n=20), ClassificationTask()
    torch.manual_seed(1)
    whole = fit(model, task, data, store=tmp_path / "whole", data_partitions=2)
    torch.manual_seed(2)
    fit(model, task, data, store=tmp_path / "resumed", data_partitions=2, passes=["covariance"],
        target_data_partitions=[1])
    torch.manual_seed(3)
    fit(model, task, data, store=tmp_path / "resumed", data_partitions=2, passes=["covariance"])
    resumed = fit(model, task, data, store=tmp_path / "resumed", data_partitions=2)
    assert_same_factors(resumed, whole, rtol=0, atol=0)  # the same batches in the same cells: the same bits


def test_batch_size_partitions_and_vmap_do_not_change_the_true_fisher():
    model, data, task = float64(mlp()), classification_data(n=20), ClassificationTask()
    reference = fit(model, task, data, batch_size=20)
    for options in (dict(batch_size=3, data_partitions=3, module_partitions=2), dict(batch_size=7),
                    dict(batch_size=4, per_example_vmap=True)):
        assert_same_factors(fit(model, task, data, **options), reference)
    queries = classification_data(n=3, seed=5)
    torch.testing.assert_close(
        fi.pairwise_scores(model, task, fit(model, task, data, batch_size=6), queries, data, progress=False),
        fi.pairwise_scores(model, task, reference, queries, data, progress=False), rtol=1e-9, atol=1e-12)


def test_language_model_token_labels_are_per_example():
    """``multinomial`` on ``[B * T, V]`` rows: each example owns T consecutive rows, whatever B is."""
    model, data, task = float64(TinyTransformerLM()), sequence_data(n=7), LMTask()
    reference = fit(model, task, data, batch_size=7, strategy="kfac")
    assert_same_factors(fit(model, task, data, batch_size=2, strategy="kfac", data_partitions=2), reference)


def test_the_seed_changes_the_labels_and_a_store_refuses_another_seed(tmp_path):
    model, data, task = float64(mlp()), classification_data(n=20), ClassificationTask()
    zero, one = fit(model, task, data, strategy="kfac"), fit(model, task, data, strategy="kfac", seed=1)
    assert not torch.allclose(zero["2"]["gradient_covariance"], one["2"]["gradient_covariance"])
    fit(model, task, data, store=tmp_path / "s", passes=["covariance"])
    with pytest.raises(InfluenceError, match="seed"):
        fit(model, task, data, store=tmp_path / "s", seed=1)


class PermutationTask(ClassificationTask):
    """Samples with ``randperm``, which the per-example draws do not answer: the per-batch seeded fallback."""

    def compute_train_loss(self, batch, model, sample=False):
        if not sample:
            return super().compute_train_loss(batch, model)
        x, _ = batch
        logits = model(x)
        labels = torch.randperm(x.shape[0] * logits.shape[1])[: x.shape[0]] % logits.shape[1]
        return F.cross_entropy(logits, labels, reduction="sum")


def test_other_random_functions_are_seeded_per_batch(tmp_path):
    """Not per example, but a function of (seed, the batch's first example): resume and reruns agree."""
    model, data, task = float64(mlp()), classification_data(n=16), PermutationTask()
    torch.manual_seed(4)
    whole = fit(model, task, data, store=tmp_path / "whole", data_partitions=2)
    torch.manual_seed(5)
    fit(model, task, data, store=tmp_path / "resumed", data_partitions=2, passes=["covariance"],
        target_data_partitions=[1])
    resumed = fit(model, task, data, store=tmp_path / "resumed", data_partitions=2)
    assert_same_factors(resumed, whole, rtol=0, atol=0)
    assert_same_factors(fit(model, task, data, data_partitions=2), whole)


class CompatTask(compat.Task):
    """A Kronfluence-style task: labels from torch.multinomial in compute_train_loss(sample=True)."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        logits = model(x)
        if sample:
            with torch.no_grad():
                y = torch.multinomial(F.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


def _compat_factors(root, name, batch_size, staged=False, **fields):
    torch.manual_seed(0)
    model, data = mlp().double().eval(), classification_data(n=20)
    analyzer = compat.Analyzer("sampling", compat.prepare_model(model, CompatTask()), CompatTask(), cpu=True,
                               disable_tqdm=True, output_dir=str(root))
    args = compat.FactorArguments(strategy="ekfac", activation_covariance_dtype=torch.float64,
                                  gradient_covariance_dtype=torch.float64, lambda_dtype=torch.float64,
                                  per_sample_gradient_dtype=torch.float64, **fields)
    if staged:  # covariance one partition at a time, then Lambda: an interrupted and resumed fit
        for part in range(args.covariance_data_partitions):
            torch.manual_seed(part)
            analyzer.fit_covariance_matrices(name, data, per_device_batch_size=batch_size, factor_args=args,
                                             target_data_partitions=[part])
        analyzer.fit_lambda_matrices(name, data, per_device_batch_size=batch_size, factor_args=args)
    else:
        analyzer.fit_all_factors(name, data, per_device_batch_size=batch_size, factor_args=args)
    return analyzer.load_all_factors(name)


def test_compat_true_fisher_does_not_depend_on_batches_partitions_or_resume(tmp_path):
    reference = _compat_factors(tmp_path / "a", "whole", 20)
    for index, (batch_size, staged, fields) in enumerate([
            (3, True, dict(covariance_data_partitions=2, lambda_data_partitions=3)),
            (7, False, dict(covariance_module_partitions=2))]):
        ours = _compat_factors(tmp_path / f"b{index}", "other", batch_size, staged, **fields)
        for factor, modules in reference.items():
            for module, value in modules.items():
                if factor.endswith("eigenvectors"):  # up to rounding amplified by small eigenvalue gaps
                    value, ours[factor][module] = value.abs(), ours[factor][module].abs()
                torch.testing.assert_close(ours[factor][module], value, rtol=1e-8, atol=1e-10,
                                           msg=f"{factor}/{module}")


@pytest.mark.slow
def test_a_compiled_true_fisher_fit_is_one_graph_and_equals_eager():
    from torch._dynamo.utils import counters

    model, data, task = float64(mlp()), classification_data(n=14), ClassificationTask()
    torch._dynamo.reset()
    counters.clear()
    compiled = fit(model, task, data, compile={"backend": "aot_eager"})
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    assert_same_factors(compiled, fit(model, task, data, batch_size=5))


def test_every_path_draws_the_documented_labels():
    """The diagonal Fisher of a tapped layer (the head) and of a parameter layer (a LayerNorm, through
    vmap(grad)) equals an autograd loop whose labels are drawn, one example at a time, by the documented rule:
    ExampleDraws keyed by (seed, the example's index). So both paths draw the same labels for an example."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    data = classification_data(n=12)
    factors = fit(model, ClassificationTask(modules=["1", "3"]), data, batch_size=5, strategy="diagonal", seed=7)
    squares = {"1": [], "3": []}
    for index in range(len(data)):
        x, _ = data[index]
        logits = model(x[None])
        with ExampleDraws(torch.tensor([index]), seed=7):
            label = torch.multinomial(logits.detach().softmax(-1), 1).flatten()
        params = [model[1].weight, model[1].bias, model[3].weight, model[3].bias]
        grads = torch.autograd.grad(F.cross_entropy(logits, label, reduction="sum"), params)
        squares["1"].append(torch.cat([grads[0], grads[1]]).square())
        squares["3"].append(torch.cat([grads[2], grads[3][:, None]], dim=1).square())
    torch.testing.assert_close(factors["1"]["lambda"].flatten(), torch.stack(squares["1"]).mean(0), rtol=1e-10,
                               atol=1e-14)
    torch.testing.assert_close(factors["3"]["lambda"][0], torch.stack(squares["3"]).mean(0), rtol=1e-10, atol=1e-14)


# -- the draws themselves ----------------------------------------------------------------------------

def test_sampled_labels_follow_the_softmax_through_the_pipeline():
    """A linear layer with zero weights: g = p - e_y, so the true Fisher's S is diag(p) - p p^T in expectation."""
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    layer = nn.Linear(2, 3).double().eval()
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(p.log())
    n = 4000
    data = TensorDataset(torch.randn(n, 2, dtype=torch.float64), torch.zeros(n, dtype=torch.int64))
    factors = fit(layer, ClassificationTask(), data, strategy="kfac", batch_size=500)
    s = factors[""]["gradient_covariance"] if "" in factors.layers else next(iter(factors.tensors.values()))[
        "gradient_covariance"]
    expected = torch.diag(p) - torch.outer(p, p)
    # each entry is a mean of n bounded terms; 5 standard deviations (at most 1/2 / sqrt(n) each)
    assert (s - expected).abs().max() < 5 * 0.5 / math.sqrt(n)


def test_draws_follow_their_distributions():
    n = 20_000
    ids = torch.arange(n)
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0], dtype=torch.float64).expand(n, 5)
    tol = lambda q: 5 * math.sqrt(q * (1 - q) / n)  # 5 sigma of a frequency
    with ExampleDraws(ids, seed=3):
        one = torch.multinomial(probs, 1)[:, 0]
        many = probs.multinomial(3, replacement=True)
        without = torch.multinomial(probs, 2)
        coins = torch.bernoulli(torch.full((n,), 0.3, dtype=torch.float64))
        uniform = torch.rand(n, 2)
        normal = torch.randn(n, dtype=torch.float64)
        integers = torch.randint(2, 7, (n,))
    for draws in (one, many.flatten()):
        frequencies = torch.bincount(draws, minlength=5).double() / draws.numel()
        assert frequencies[4] == 0
        for k in range(4):
            assert abs(frequencies[k] - probs[0, k]) < tol(float(probs[0, k])) * math.sqrt(n / draws.numel())
    assert (without[:, 0] != without[:, 1]).all() and (without < 4).all()
    first = torch.bincount(without[:, 0], minlength=5).double() / n  # the first pick is a plain draw
    assert (first[:4] - probs[0, :4]).abs().max() < tol(0.5)
    assert abs(coins.mean() - 0.3) < tol(0.3)
    assert uniform.dtype == torch.float32 and 0 <= uniform.min() and uniform.max() < 1
    assert abs(uniform.mean() - 0.5) < 5 * math.sqrt(1 / 12 / uniform.numel())
    assert abs(normal.mean()) < 5 / math.sqrt(n) and abs(normal.var() - 1) < 5 * math.sqrt(2 / n)
    assert set(integers.unique().tolist()) == {2, 3, 4, 5, 6}


def test_an_example_draws_the_same_in_any_batch():
    probs = torch.softmax(torch.randn(10, 3, 7, generator=torch.Generator().manual_seed(0)), -1).flatten(0, 1)
    with ExampleDraws(torch.arange(10), seed=0):
        together = torch.multinomial(probs, 1)
        normals = torch.randn(10, 3, 2)
    with ExampleDraws(torch.arange(4, 10), seed=0):
        later = torch.multinomial(probs[12:], 1)
        later_normals = torch.randn(6, 3, 2)
    assert torch.equal(later, together[12:]) and torch.equal(later_normals, normals[4:])
    logits = torch.randn(10, 7, generator=torch.Generator().manual_seed(1))
    with ExampleDraws(torch.arange(10), seed=0):  # torch.distributions samples through torch.multinomial
        categorical = torch.distributions.Categorical(logits=logits).sample()
    with ExampleDraws(torch.arange(6, 10), seed=0):
        assert torch.equal(torch.distributions.Categorical(logits=logits[6:]).sample(), categorical[6:])
    with ExampleDraws(torch.arange(10), seed=1):
        assert not torch.equal(torch.multinomial(probs, 1), together)


def test_invalid_probabilities_are_refused_as_torch_refuses_them():
    with ExampleDraws(torch.arange(2)):
        with pytest.raises(RuntimeError, match="multinomial"):
            torch.multinomial(torch.tensor([[0.5, float("nan")], [0.5, 0.5]]), 1)
        with pytest.raises(RuntimeError, match="sums to 0"):
            torch.multinomial(torch.tensor([[0.0, 0.0], [0.5, 0.5]]), 1)
        with pytest.raises(RuntimeError, match="bernoulli"):
            torch.bernoulli(torch.tensor([0.5, 1.5]))


def test_uniforms_are_exact_and_in_the_open_interval():
    u = uniforms(0, 0, 0, torch.tensor([0, 2**40, 2**62]), 1000)
    assert u.dtype == torch.float64 and (u > 0).all() and (u < 1).all()
    assert torch.equal(u, uniforms(0, 0, 0, torch.tensor([0, 2**40, 2**62]), 1000))
    assert not torch.equal(u[0], u[1]) and not torch.equal(u, uniforms(0, 1, 0, torch.tensor([0, 2**40, 2**62]), 1000))


# -- the randomised low-rank query path ----------------------------------------------------------------

def test_randomised_low_rank_queries_are_the_same_in_every_cell(tmp_path):
    """torch.svd_lowrank draws from the generators the pipeline seeds per (layer, query chunk): data partitions,
    a resumed store and the global seed do not change the scores (before: partitions 1 and 2 differed by 13 %)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double().eval()
    task, data, queries = ClassificationTask(), classification_data(n=16), classification_data(n=5, seed=3)
    factors = fit(model, task, data, use_empirical_fisher=True)
    options = dict(query_rank=2, damping=1e-3, batch_size=4, progress=False)
    torch.manual_seed(1)
    reference = fi.pairwise_scores(model, task, factors, queries, data, **options)
    torch.manual_seed(2)
    partitioned = fi.pairwise_scores(model, task, factors, queries, data, data_partitions=2, module_partitions=2,
                                     **options)
    fi.pairwise_scores(model, task, factors, queries, data, data_partitions=2, store=tmp_path / "s",
                       target_data_partitions=[1], **options)
    torch.manual_seed(3)
    resumed = fi.pairwise_scores(model, task, factors, queries, data, data_partitions=2, store=tmp_path / "s",
                                 **options)
    torch.testing.assert_close(partitioned, reference, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(resumed, reference, rtol=1e-12, atol=1e-14)


def test_randomised_low_rank_is_exact_on_rank_one_queries():
    """Identity curvature, no tokens: each preconditioned query gradient is g a^T (rank one), so rank 1 is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double().eval()
    task, data, queries = ClassificationTask(), classification_data(n=10), classification_data(n=3, seed=3)
    factors = fit(model, task, data, use_empirical_fisher=True, strategy="identity")
    options = dict(damping=1e-3, batch_size=1, progress=False)
    low = fi.pairwise_scores(model, task, factors, queries, data, query_rank=1, **options)
    torch.testing.assert_close(low, fi.pairwise_scores(model, task, factors, queries, data, **options), rtol=1e-9,
                               atol=1e-12)


@pytest.mark.slow
def test_two_gloo_ranks_sample_the_labels_of_one_process(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import sampling_job

    here = Path(__file__).resolve()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(here.parents[1])] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    ranks = [subprocess.Popen([sys.executable, str(here.with_name("sampling_job.py")), str(tmp_path)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    results = [(p.wait(timeout=240), p.stderr.read()) for p in ranks]
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    expected = sampling_job.fit_true_fisher(distributed=False).tensors
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for layer, tensors in expected.items():
            for name, value in tensors.items():
                assert torch.equal(got[layer][name], value), (rank, layer, name)
