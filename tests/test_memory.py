"""Memory estimates against peaks measured with torch.profiler's allocation events, and suggest() for a budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

import fninfluence as fi
from fninfluence.memory import estimate_memory, fit_phase_peak, measure_peak, pairwise_call_peak, self_call_peak, suggest
from models import LMTask, TinyTransformerLM

QUIET = dict(progress=False)


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.Tanh(), nn.Linear(256, 10)).eval()
    return model, TensorDataset(torch.randn(96, 128), torch.randint(0, 10, (96,))), fi.classification_task()


def _cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 16, 3, stride=2), nn.Tanh(),
                          nn.Flatten(), nn.Linear(16 * 5 * 5, 10)).eval()
    return model, TensorDataset(torch.randn(64, 3, 12, 12), torch.randint(0, 10, (64,))), fi.classification_task()


def _transformer():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    return TinyTransformerLM(vocab=40, d=48, seq=24).eval(), TensorDataset(torch.randint(0, 40, (48, 24), generator=g)), LMTask()


def test_measure_peak_sees_a_temporary_allocation():
    def work():
        big = torch.ones(1000, 1000)  # 4 MB, freed before the end
        return float(big.sum())

    _, peak = measure_peak(work)
    assert 4_000_000 <= peak < 4_200_000


@pytest.mark.parametrize("make,strategy", [(_mlp, "ekfac"), (_mlp, "identity"), (_cnn, "ekfac"), (_transformer, "ekfac")],
                         ids=["mlp-ekfac", "mlp-identity", "cnn-ekfac", "transformer-ekfac"])
def test_predicted_peaks_are_within_40_percent_of_measured_ones(make, strategy):
    model, data, task = make()
    batch_size, queries = 32, Subset(data, range(8))
    estimate = estimate_memory(model, task, data[:4], strategy=strategy, batch_size=batch_size, num_queries=8,
                               num_train=len(data))
    factors, fit = measure_peak(lambda: fi.fit_factors(model, task, data, strategy=strategy, batch_size=batch_size,
                                                       **QUIET))
    _, pairwise = measure_peak(lambda: fi.pairwise_scores(model, task, factors, queries, data, batch_size=batch_size,
                                                          **QUIET))
    _, self_ = measure_peak(lambda: fi.self_scores(model, task, factors, data, batch_size=batch_size, **QUIET))
    # estimate_memory runs discovery's exactness check on the training loss, the objective of the default
    # (empirical-Fisher) fit, so the fit and the scoring calls after it on the same model and task skip it
    ratios = {"fit": fit_phase_peak(estimate, checked=True) / fit, "pairwise": pairwise_call_peak(estimate, checked=True) / pairwise,
              "self": self_call_peak(estimate, checked=True) / self_}
    assert all(0.6 <= r <= 1.4 for r in ratios.values()), ratios
    factor_bytes = sum(t.numel() * t.element_size() for layer in factors.tensors.values() for t in layer.values())
    assert 0.7 <= estimate.resident["factors"] / max(factor_bytes, 1) <= 1.3 or factor_bytes == 0


def test_estimates_grow_with_the_batch_size_and_the_query_count():
    model, data, task = _mlp()
    activation = (10_000, 5_000)  # given, so nothing is measured
    small = estimate_memory(model, task, data[:4], batch_size=8, num_queries=4, activation_bytes=activation)
    large = estimate_memory(model, task, data[:4], batch_size=64, num_queries=64, activation_bytes=activation)
    for phase in ("lambda", "query gradients", "pairwise", "self"):
        assert large.phases[phase].peak > small.phases[phase].peak
    assert large.resident == small.resident  # factors do not depend on the batch size
    assert "query gradients" in str(large) and "total peak" in str(large)
    # a user's estimator is sized from itself: identity's functions under another name, with identity's memory
    # hints, give identity's estimate; without hints its preconditioning gets the default transient (one block)
    identity = estimate_memory(model, task, data[:4], strategy="identity", activation_bytes=activation)
    renamed = estimate_memory(model, task, data[:4], strategy=fi.identity._replace(name="mine"),
                              activation_bytes=activation)
    assert {k: p.breakdown for k, p in renamed.phases.items()} == {k: p.breakdown for k, p in identity.phases.items()}
    custom = fi.CurvatureEstimator("mine", (), fi.identity.precondition, fi.identity.self_score)
    unhinted = estimate_memory(model, task, data[:4], strategy=custom, activation_bytes=activation)
    query = unhinted.phases["query gradients"].breakdown
    assert query["per-example gradients"] == identity.phases["query gradients"].breakdown["per-example gradients"]
    assert query["preconditioning"] == 256 * 129 * 4  # one float32 block of the largest layer's query gradient


def test_suggested_settings_run_within_the_budget():
    model, data, task = _mlp()
    budget = 12 * 2 ** 20
    suggestion = suggest(model, task, data[:4], budget, strategy="ekfac", num_queries=64, num_train=len(data),
                         max_batch_size=64)
    settings = suggestion.settings
    assert suggestion.estimate.peak <= budget
    # 64 kept query gradients (each 128 KiB) fit beside the rest only with query batches of one (preconditioning
    # a batch of queries doubles its gradients for a while); the measured peaks below confirm they fit
    assert settings["queries_per_call"] in (None, 16, 32) and settings["batch_size"] >= 32
    if settings["queries_per_call"] is None:
        assert settings["query_batch_size"] <= 2
    factors, fit = measure_peak(lambda: fi.fit_factors(model, task, data, strategy="ekfac",
                                                       batch_size=settings["batch_size"], **QUIET))
    queries = Subset(data, range(settings["queries_per_call"] or 64))
    _, pairwise = measure_peak(lambda: fi.pairwise_scores(model, task, factors, queries, data,
                                                          batch_size=settings["batch_size"],
                                                          query_batch_size=settings["query_batch_size"], **QUIET))
    resident = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        t.numel() * t.element_size() for layer in factors.tensors.values() for t in layer.values())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert params + fit <= budget and resident + pairwise <= budget
    with pytest.raises(fi.InfluenceError, match="No batch size fits"):
        suggest(model, task, data[:4], 2 ** 20, strategy="ekfac", num_queries=4)
