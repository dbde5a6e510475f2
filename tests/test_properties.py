"""Properties that any correct influence computation has, checked with hypothesis on random models."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Subset

import fninfluence as fi
from fninfluence.testing.strategies import SummedCrossEntropy, dampings, models_and_data, strategies

QUIET = dict(progress=False)
PROPERTY = settings(max_examples=12, deadline=None)


def _close(actual, expected, rtol=1e-8):
    scale = expected.abs().max().clamp_min(1e-300)
    assert float((actual - expected).abs().max() / scale) <= rtol, (actual, expected)


def _fit(model, task, data, strategy, batch_size):
    return fi.fit_factors(model, task, data, strategy=strategy, use_empirical_fisher=True, batch_size=batch_size,
                          **QUIET)


@PROPERTY
@given(models_and_data(), strategies, dampings, st.integers(1, 5), st.integers(1, 5))
def test_batch_size_invariance(model_data, strategy, damping, batch_a, batch_b):
    model, data = model_data
    task = SummedCrossEntropy()
    queries = Subset(data, [0, len(data) - 1])
    results = []
    for batch_size in (batch_a, batch_b):
        factors = _fit(model, task, data, strategy, batch_size)
        pairwise = fi.pairwise_scores(model, task, factors, queries, data, damping=damping, batch_size=batch_size,
                                      query_batch_size=1, **QUIET)
        results.append((pairwise, fi.self_scores(model, task, factors, data, damping=damping, batch_size=batch_size,
                                                 **QUIET)))
    _close(results[0][0], results[1][0])
    _close(results[0][1], results[1][1])


@PROPERTY
@given(models_and_data(min_size=3), strategies, dampings, st.randoms(use_true_random=False))
def test_permuting_training_examples_permutes_scores(model_data, strategy, damping, rng):
    model, data = model_data
    task = SummedCrossEntropy()
    order = list(range(len(data)))
    rng.shuffle(order)
    shuffled = Subset(data, order)
    queries = Subset(data, [0, 1])
    scores = fi.pairwise_scores(model, task, _fit(model, task, data, strategy, 4), queries, data, damping=damping,
                                **QUIET)
    shuffled_scores = fi.pairwise_scores(model, task, _fit(model, task, shuffled, strategy, 3), queries, shuffled,
                                         damping=damping, **QUIET)
    _close(shuffled_scores, scores[:, order])


@PROPERTY
@given(models_and_data(), strategies, dampings)
def test_self_scores_are_the_diagonal_of_pairwise_train_train(model_data, strategy, damping):
    model, data = model_data
    task = SummedCrossEntropy()  # the measurement is the training loss
    factors = _fit(model, task, data, strategy, 4)
    pairwise = fi.pairwise_scores(model, task, factors, data, data, damping=damping, batch_size=3, **QUIET)
    self_scores = fi.self_scores(model, task, factors, data, damping=damping, batch_size=5, **QUIET)
    _close(self_scores, torch.diagonal(pairwise))
    measured = fi.self_scores(model, task, factors, data, damping=damping, use_measurement=True, **QUIET)
    _close(measured, torch.diagonal(pairwise))


class Mixed(SummedCrossEntropy):
    """Measurement ``w_loss * cross-entropy + w_logit * sum of the first logit``."""

    def __init__(self, w_loss, w_logit):
        super().__init__()
        self.w_loss, self.w_logit = w_loss, w_logit

    def compute_measurement(self, batch, model):
        x, _ = batch
        return self.w_loss * self.compute_train_loss(batch, model) + self.w_logit * model(x)[:, 0].sum()


@PROPERTY
@given(models_and_data(), strategies, dampings, st.floats(-3.0, 3.0), st.floats(-3.0, 3.0))
def test_scores_are_linear_in_the_query_measurement(model_data, strategy, damping, alpha, beta):
    model, data = model_data
    factors = _fit(model, SummedCrossEntropy(), data, strategy, 4)
    queries = Subset(data, [0, 1])

    def scores(w_loss, w_logit):
        return fi.pairwise_scores(model, Mixed(w_loss, w_logit), factors, queries, data, damping=damping, **QUIET)

    combined = scores(alpha, beta)
    expected = alpha * scores(1.0, 0.0) + beta * scores(0.0, 1.0)
    assert torch.allclose(combined, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max() + 1))
