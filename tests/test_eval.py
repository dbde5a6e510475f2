"""LDS evaluation: Spearman with ties, subsets, the sign convention, caching of retrained results."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import fninfluence as fi
from fninfluence.eval import (RetrainCache, lds_from_measurements, linear_datamodeling_score, random_subsets,
                              retrain_measurements, spearman, subset_predictions)
from fninfluence.testing import ridge_influence, ridge_solution

QUIET = dict(progress=False)


def test_spearman_matches_a_hand_computed_case_with_ties():
    # x ranks (average for ties): [0, 1.5, 1.5, 3]; y ranks: [3, 0.5, 2, 0.5]
    x = torch.tensor([1.0, 2.0, 2.0, 3.0], dtype=torch.float64)
    y = torch.tensor([9.0, 1.0, 4.0, 1.0], dtype=torch.float64)
    rx = torch.tensor([0.0, 1.5, 1.5, 3.0], dtype=torch.float64) - 1.5
    ry = torch.tensor([3.0, 0.5, 2.0, 0.5], dtype=torch.float64) - 1.5
    expected = float((rx * ry).sum() / (rx.square().sum() * ry.square().sum()).sqrt())
    assert float(spearman(x, y)) == pytest.approx(expected, abs=1e-12)
    assert float(spearman(x, -x)) == pytest.approx(-1.0)
    assert float(spearman(x, x.exp())) == pytest.approx(1.0)  # monotone maps do not change ranks
    assert torch.isnan(spearman(x, torch.ones(4)))


def test_spearman_matches_scipy_on_many_ties():
    from scipy import stats  # installed with scikit-learn, a test dependency
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (6, 30), generator=g).double()
    y = torch.randint(0, 7, (6, 30), generator=g).double() + 0.1 * x
    ours = spearman(x, y)
    for row in range(6):
        assert float(ours[row]) == pytest.approx(stats.spearmanr(x[row], y[row]).statistic, abs=1e-12)


def test_random_subsets_are_seeded_halves_without_repeats():
    subsets = random_subsets(11, 8, seed=3)
    assert subsets.shape == (8, 6)  # round(0.5 * 11) = 6 (banker's rounding gives 6)
    assert all(len(set(row.tolist())) == 6 and row.tolist() == sorted(row.tolist()) for row in subsets)
    assert torch.equal(subsets, random_subsets(11, 8, seed=3))
    assert not torch.equal(subsets, random_subsets(11, 8, seed=4))
    with pytest.raises(fi.InfluenceError, match="fraction"):
        random_subsets(10, 4, fraction=1.0)


def test_predictions_subtract_the_scores_of_the_subset():
    scores = torch.tensor([[1.0, 2.0, 4.0], [0.0, -1.0, 3.0]])
    subsets = torch.tensor([[0, 2], [1, 2]])
    # [subsets, queries]: subset 0 = {0, 2} sums to 5 (query 0) and 3 (query 1); subset 1 = {1, 2} to 6 and 2
    assert torch.equal(subset_predictions(scores, subsets), -torch.tensor([[5.0, 3.0], [6.0, 2.0], ], dtype=torch.float64))


def _ridge_problem(n=24, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    return x, y, torch.randn(5, d, generator=g, dtype=torch.float64)


class SquaredError(fi.Task):
    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        return 0.5 * (model(x)[:, 0] - y).square().sum()

    def compute_measurement(self, batch, model):
        x, y = batch
        return 0.5 * (model(x)[:, 0] - y).square().sum()


def test_exact_influence_of_ridge_regression_has_high_lds_and_reversed_scores_have_low(tmp_path):
    """Ridge regression retrains in closed form; its exact influence predicts the subsets' query losses well.

    Flipping the sign of the scores must flip the LDS: this pins down the sign convention."""
    x, y, x_query = _ridge_problem()
    y_query = x_query @ ridge_solution(x, y, 1.0) + 1.0  # query targets the model misses: losses vary
    l2 = 1.0
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(ridge_solution(x, y, l2)[None])
    train, queries = TensorDataset(x, y), TensorDataset(x_query, y_query)
    task = SquaredError()
    factors = fi.fit_factors(model, task, train, strategy="kfac", use_empirical_fisher=True, **QUIET)
    # damping l2 / N: the preconditioner is N (X^T X + l2 I)^{-1} only with the GGN; the empirical Fisher is close
    scores = fi.pairwise_scores(model, task, factors, queries, train, damping=l2 / len(x), **QUIET)

    calls = []

    def retrain(indices):
        calls.append(indices)
        theta = ridge_solution(x[indices], y[indices], l2 * len(indices) / len(x))  # same per-example penalty
        return 0.5 * (x_query @ theta - y_query).square()

    result = linear_datamodeling_score(scores, retrain, num_subsets=30, cache_dir=tmp_path, cache_key="ridge")
    assert result.mean > 0.8 and result.per_query.shape == (5,)
    assert 0 < result.stderr < 0.2
    flipped = lds_from_measurements(-scores, result.subsets, result.measurements)
    assert flipped.mean == pytest.approx(-result.mean)
    # every subset trained once, and the cache now holds them all
    assert len(calls) == 30 and len(RetrainCache(tmp_path, "ridge")) == 30


def test_exact_ridge_influence_ranks_retrained_predictions():
    """The exact-Hessian influence of ridge regression on query predictions, against closed-form retraining on
    random halves: the first-order prediction is not exact for halves (the Hessian changes), but it ranks them."""
    x, y, x_query = _ridge_problem()
    l2 = 1.0
    result = linear_datamodeling_score(ridge_influence(x, y, l2, x_query),
                                       lambda indices: x_query @ ridge_solution(x[indices], y[indices], l2),
                                       num_subsets=30)
    assert result.mean > 0.85 and bool((result.per_query > 0.8).all())


def test_a_second_call_reuses_the_cache_and_another_key_retrains(tmp_path):
    subsets = random_subsets(30, 4, seed=0)
    assert len({tuple(s.tolist()) for s in subsets}) == 4
    calls = []

    def train_fn(indices):
        calls.append(indices.tolist())
        return torch.tensor([float(indices.sum()), float(indices.max())])

    first = retrain_measurements(train_fn, subsets, cache_dir=tmp_path, cache_key="a")
    assert len(calls) == 4
    second = retrain_measurements(lambda i: pytest.fail("must not retrain"), subsets, cache_dir=tmp_path,
                                  cache_key="a")
    assert torch.equal(first, second)
    retrain_measurements(train_fn, subsets[:2], cache_dir=tmp_path, cache_key="b")
    assert len(calls) == 6
    for path in tmp_path.glob("*.json"):  # plain JSON: nothing to unpickle
        entry = json.loads(path.read_text())
        assert set(entry) == {"key", "indices", "measurements"}
    with pytest.raises(fi.InfluenceError, match="cache_key"):
        retrain_measurements(train_fn, subsets, cache_dir=tmp_path)


def test_train_fn_may_return_a_model_measured_with_the_task():
    x, y, x_query = _ridge_problem(n=12)
    queries = TensorDataset(x_query, torch.zeros(5, dtype=torch.float64))
    task = SquaredError()

    def train_fn(indices):
        model = nn.Linear(3, 1, bias=False).double()
        with torch.no_grad():
            model.weight.copy_(ridge_solution(x[indices], y[indices], 0.5)[None])
        return model

    subsets = random_subsets(12, 3, seed=1)
    measured = retrain_measurements(train_fn, subsets, task=task, query_data=queries)
    expected = torch.stack([0.5 * (x_query @ ridge_solution(x[s], y[s], 0.5)).square() for s in subsets])
    torch.testing.assert_close(measured, expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(fi.InfluenceError, match="query_data"):
        retrain_measurements(train_fn, subsets)


def test_measurements_of_the_wrong_shape_are_refused():
    subsets = random_subsets(6, 3)
    with pytest.raises(fi.InfluenceError, match="one value per query"):
        lds_from_measurements(torch.zeros(2, 6), subsets, torch.zeros(3, 5))


def test_lds_mean_and_standard_error_on_hand_computed_correlations():
    """Five queries on four subsets, each query's Spearman correlation worked out by hand: 1, -1, 0.6, undefined
    (its measurements are constant) and 0.8. The LDS is the mean of the defined ones and its standard error their
    sample standard deviation (n - 1) over sqrt(number defined)."""
    scores = torch.tensor([[1.0, 2.0, 4.0, 8.0]] * 5, dtype=torch.float64)
    subsets = torch.tensor([[0, 1], [0, 2], [1, 3], [2, 3]])  # sums 3, 5, 10, 12: predictions -3, -5, -10, -12
    measurements = torch.tensor([[4.0, 3.0, 2.0, 1.0],    # ranked as the predictions: 1
                                 [1.0, 2.0, 3.0, 4.0],    # reversed: -1
                                 [3.0, 4.0, 1.0, 2.0],    # ranks (2, 3, 0, 1) against (3, 2, 1, 0): 3 / 5
                                 [5.0, 5.0, 5.0, 5.0],    # constant: undefined, left out
                                 [4.0, 3.0, 1.0, 2.0]],   # ranks (3, 2, 0, 1): 4 / 5
                                dtype=torch.float64).T    # [subsets, queries]
    result = lds_from_measurements(scores, subsets, measurements)
    defined = [1.0, -1.0, 0.6, 0.8]
    mean = sum(defined) / 4
    stderr = (sum((v - mean) ** 2 for v in defined) / 3) ** 0.5 / 4 ** 0.5
    assert result.mean == pytest.approx(0.35, abs=1e-12) and mean == pytest.approx(0.35)
    assert result.stderr == pytest.approx(stderr, abs=1e-12)
    assert result.stderr == pytest.approx(0.45734742, abs=1e-8)  # sqrt(2.51 / 3) / 2
    expected = torch.tensor([1.0, -1.0, 0.6, float("nan"), 0.8], dtype=torch.float64)
    torch.testing.assert_close(result.per_query, expected, equal_nan=True, rtol=0, atol=1e-12)
    # one defined query: a mean but no spread to estimate
    single = lds_from_measurements(scores[:1], subsets, measurements[:, :1])
    assert single.mean == pytest.approx(1.0) and math.isnan(single.stderr)
