"""Inputs that used to be accepted and gave mis-indexed or NaN scores are now refused, saying why.

Scores a user sees are finite or the call fails naming the stage (gradients, preconditioning, factors) and the
fix; a DataLoader is accepted only when its batches are the examples 0..N-1 in order.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fninfluence as fi
from fninfluence import InfluenceError
from models import ClassificationTask, classification_data, float64, mlp

QUIET = dict(progress=False)


@pytest.fixture(scope="module")
def fitted():
    model = float64(mlp())
    data, task = classification_data(n=20), ClassificationTask()
    return model, task, data, fi.fit_factors(model, task, data, strategy="ekfac", batch_size=8, **QUIET)


# -- DataLoaders whose order is not the examples' order ---------------------------------------------

@pytest.mark.parametrize("make", [
    lambda d: DataLoader(d, batch_size=4, sampler=list(reversed(range(len(d))))),
    lambda d: DataLoader(d, batch_size=4, drop_last=True),
    lambda d: DataLoader(d, batch_size=None),
    lambda d: DataLoader(d, batch_sampler=[[0, 1], [1, 2]]),
], ids=["reversed-sampler", "drop-last", "batch-size-none", "repeating-batch-sampler"])
def test_loaders_that_reorder_drop_or_repeat_examples_are_refused(fitted, make):
    model, task, data, factors = fitted
    with pytest.raises(InfluenceError, match="DataLoader"):
        fi.pairwise_scores(model, task, factors, data, make(data), **QUIET)
    with pytest.raises(InfluenceError, match="DataLoader"):
        fi.self_scores(model, task, factors, make(data), **QUIET)


def test_an_in_order_loader_gives_the_same_scores_as_the_dataset(fitted):
    """The check refuses only what is wrong: a custom sampler that yields 0..N-1 in order is accepted."""
    model, task, data, factors = fitted
    expected = fi.pairwise_scores(model, task, factors, data, data, batch_size=4, query_batch_size=4, **QUIET)
    in_order = DataLoader(data, batch_size=4, sampler=list(range(len(data))))
    got = fi.pairwise_scores(model, task, factors, data, in_order, query_batch_size=4, **QUIET)
    assert torch.equal(got, expected)  # same batches, same kernels: the same bits
    assert got.shape == (len(data), len(data))


# -- numbers that silently meant something else --------------------------------------------------------

@pytest.mark.parametrize("damping", [math.nan, math.inf, -1.0, True, "0.1"])
def test_damping_must_be_a_finite_non_negative_number(fitted, damping):
    model, task, data, factors = fitted
    with pytest.raises(InfluenceError, match="damping"):
        fi.pairwise_scores(model, task, factors, data, data, damping=damping, **QUIET)
    with pytest.raises(InfluenceError, match="damping"):
        fi.self_scores(model, task, factors, data, damping=damping, **QUIET)


@pytest.mark.parametrize("max_examples", [0, -3, {"covariance": 0}, 2.5])
def test_max_examples_zero_negative_or_fractional_is_refused(max_examples):
    model, data, task = float64(mlp()), classification_data(n=8), ClassificationTask()
    with pytest.raises(InfluenceError, match="max_examples"):
        fi.fit_factors(model, task, data, strategy="ekfac", max_examples=max_examples, **QUIET)


@pytest.mark.parametrize("name", ["batch_size", "query_batch_size", "query_rank", "queries_per_pass"])
@pytest.mark.parametrize("value", [0, -1, True])
def test_counts_must_be_positive_integers(fitted, name, value):
    model, task, data, factors = fitted
    with pytest.raises(InfluenceError, match=name):
        fi.pairwise_scores(model, task, factors, data, data, **{name: value}, **QUIET)


# -- NaN or Inf inside: the call fails naming the stage ------------------------------------------------

class DeadFeature(nn.Module):
    """An MLP whose first input feature is always 0, so that feature's curvature is exactly 0."""

    def __init__(self):
        super().__init__()
        self.net = mlp(bias=False)

    def forward(self, x):
        return self.net(torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:]], dim=1))


@pytest.mark.parametrize("strategy", ["diagonal", "ekfac"])
def test_damping_zero_on_a_singular_curvature_names_the_damping(strategy):
    model, data, task = float64(DeadFeature()), classification_data(n=12), ClassificationTask()
    factors = fi.fit_factors(model, task, data, strategy=strategy, **QUIET)
    scores = fi.pairwise_scores(model, task, factors, data, data, damping=1e-3, **QUIET)  # damped: fine
    assert torch.isfinite(scores).all()
    # the query gradient's dead-feature column is 0 too, and 0 / (0 + 0) is NaN
    with pytest.raises(InfluenceError, match="singular.*damping"):
        fi.pairwise_scores(model, task, factors, data, data, damping=0.0, **QUIET)
        pytest.fail("damping 0 on a singular curvature gave scores")
    with pytest.raises(InfluenceError, match="singular.*damping"):
        fi.self_scores(model, task, factors, data, damping=0.0, **QUIET)


def _with_inf(data, example=3):
    x, y = data.tensors
    x = x.clone()
    x[example, 0] = math.inf
    return TensorDataset(x, y)


@pytest.mark.parametrize("strategy", ["identity", "diagonal"])
def test_an_inf_input_is_refused_not_scored(strategy):
    """tanh saturates an Inf input to a finite loss, but its gradient is NaN (Inf x 0)."""
    model, data, task = float64(mlp()), classification_data(n=12), ClassificationTask()
    factors = fi.fit_factors(model, task, data, strategy=strategy, **QUIET)
    bad = _with_inf(data)
    with pytest.raises(InfluenceError, match="batch 0") as error:
        fi.pairwise_scores(model, task, factors, data, bad, batch_size=4, **QUIET)
    assert "NaN or Inf" in str(error.value)
    with pytest.raises(InfluenceError, match="NaN or Inf"):
        fi.self_scores(model, task, factors, bad, **QUIET)
    if strategy != "identity":  # identity fits nothing from the data
        with pytest.raises(InfluenceError, match="NaN or Inf"):
            fi.fit_factors(model, task, bad, strategy=strategy, **QUIET)


class RootAtZero(nn.Module):
    """``o + sqrt|o|`` of a bias-free MLP: an all-zero input gives ``o = 0``, a finite loss and a NaN gradient
    (the derivative of ``sqrt|o|`` at 0 is Inf x sign(0))."""

    def __init__(self):
        super().__init__()
        self.net = mlp(bias=False)

    def forward(self, x):
        o = self.net(x)
        return o + o.abs().sqrt()


def _with_zero_example(data, example=0):
    x, y = data.tensors
    x = x.clone()
    x[example] = 0
    return TensorDataset(x, y)


def test_nan_gradients_with_a_finite_loss_are_refused():
    model, data, task = float64(RootAtZero()), _with_zero_example(classification_data(n=8)), ClassificationTask()
    loss = task.compute_train_loss(data[:8], model)
    assert torch.isfinite(loss)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert not all(torch.isfinite(g).all() for g in grads)  # the premise: autograd gives NaN too
    with pytest.raises(InfluenceError, match="derivative is infinite or undefined"):
        fi.fit_factors(model, task, data, strategy="ekfac", **QUIET)
    factors = fi.fit_factors(model, task, data, strategy="identity", **QUIET)
    with pytest.raises(InfluenceError, match="query gradients.*derivative is infinite or undefined"):
        fi.pairwise_scores(model, task, factors, data, data, **QUIET)
    with pytest.raises(InfluenceError, match="training gradients.*derivative is infinite or undefined"):
        fi.pairwise_scores(model, task, factors, classification_data(n=4, seed=1), data, batch_size=4, **QUIET)


# -- a custom estimator whose outputs have the wrong shape ---------------------------------------------

def _broken(**replace):
    return fi.ekfac._replace(name="broken", **replace)


@pytest.mark.parametrize("estimator, call, match", [
    # [N, G, out, in] -> [N, G, out, 1]: broadcasts against the training gradients without an error
    (lambda: _broken(precondition=lambda f, g, d: fi.ekfac.precondition(f, g, d).sum(-1, keepdim=True)),
     "pairwise", r"precondition returned \(\d+, 1, \d+, 1\)"),
    (lambda: _broken(self_score=lambda f, s, d: fi.ekfac.self_score(f, s, d)[:, None]),
     "self", r"self_score returned \(\d+, 1\)"),
    (lambda: _broken(passes=(fi.ekfac.passes[0], fi.ekfac.passes[1]._replace(
        update=lambda state, stats, f: {k: v.sum() for k, v in fi.ekfac.passes[1].update(state, stats, f).items()}))),
     "fit", r"lambda update \['lambda_sum'\] returned \(\)"),
], ids=["precondition", "self_score", "update"])
def test_custom_estimator_outputs_of_the_wrong_shape_are_refused(estimator, call, match):
    model, data, task = float64(mlp()), classification_data(n=8), ClassificationTask()
    estimator = estimator()
    if call == "fit":
        with pytest.raises(InfluenceError, match=match):
            fi.fit_factors(model, task, data, strategy=estimator, use_empirical_fisher=True, **QUIET)
        return
    factors = fi.fit_factors(model, task, data, strategy=estimator, use_empirical_fisher=True, **QUIET)
    with pytest.raises(InfluenceError, match=match):
        if call == "pairwise":
            fi.pairwise_scores(model, task, factors, data, data, **QUIET)
        else:
            fi.self_scores(model, task, factors, data, **QUIET)
