"""Estimators against oracles: per-example autograd loops and exact dense curvature on tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

import fninfluence as fi
from fninfluence.testing import dense_fisher, dense_influence, layer_gradients, per_example_gradients
from models import ClassificationTask, SmallCNN, classification_data, float64, image_data, mlp

QUIET = dict(progress=False)


def _oracle_grads(model, task, train, queries, specs):
    train_grads = layer_gradients(per_example_gradients(model, task, train), specs)
    query_grads = layer_gradients(per_example_gradients(model, task, queries, objective="measurement"), specs)
    return train_grads, query_grads


CASES = [
    ("mlp", lambda: float64(mlp()), classification_data),
    ("cnn", lambda: float64(SmallCNN(padding=1, padding_mode="reflect")), image_data),
]


@pytest.mark.parametrize("name,make_model,make_data", CASES, ids=[c[0] for c in CASES])
def test_identity_scores_are_gradient_inner_products(name, make_model, make_data):
    model, train, task = make_model(), make_data(), ClassificationTask()
    queries = Subset(make_data(seed=1), range(4))
    factors = fi.fit_factors(model, task, train, strategy="identity", **QUIET)
    train_grads, query_grads = _oracle_grads(model, task, train, queries, factors.layers)
    expected_pairwise = sum(torch.einsum("qgoi,ngoi->qn", query_grads[l], train_grads[l]) for l in train_grads)
    expected_self = sum(train_grads[l].flatten(1).square().sum(1) for l in train_grads)
    pairwise = fi.pairwise_scores(model, task, factors, queries, train, batch_size=5, **QUIET)
    self_scores = fi.self_scores(model, task, factors, train, batch_size=7, **QUIET)
    # float64 rounding of sums in another order, relative to the largest score (an entry near 0 after
    # cancellation has a large error relative to itself)
    torch.testing.assert_close(pairwise, expected_pairwise, rtol=1e-12, atol=1e-12 * float(expected_pairwise.abs().max()))
    torch.testing.assert_close(self_scores, expected_self, rtol=1e-12, atol=0)


@pytest.mark.parametrize("damping", [None, 1e-2])
@pytest.mark.parametrize("name,make_model,make_data", CASES, ids=[c[0] for c in CASES])
def test_diagonal_scores_against_loop_oracle(name, make_model, make_data, damping):
    model, train, task = make_model(), make_data(), ClassificationTask()
    queries = Subset(make_data(seed=1), range(4))
    factors = fi.fit_factors(model, task, train, strategy="diagonal", use_empirical_fisher=True, batch_size=5,
                             **QUIET)
    train_grads, query_grads = _oracle_grads(model, task, train, queries, factors.layers)
    expected_pairwise, expected_self = 0, 0
    for layer, grads in train_grads.items():
        second_moment = grads.square().mean(0)
        lam = 0.1 * second_moment.mean() if damping is None else damping
        torch.testing.assert_close(factors[layer]["lambda"], second_moment, rtol=1e-12, atol=0)
        expected_pairwise = expected_pairwise + torch.einsum("qgoi,ngoi->qn", query_grads[layer] / (second_moment + lam), grads)
        expected_self = expected_self + (grads.square() / (second_moment + lam)).flatten(1).sum(1)
    pairwise = fi.pairwise_scores(model, task, factors, queries, train, damping=damping, batch_size=5, **QUIET)
    self_scores = fi.self_scores(model, task, factors, train, damping=damping, batch_size=5, **QUIET)
    torch.testing.assert_close(pairwise, expected_pairwise, rtol=1e-10, atol=0)
    torch.testing.assert_close(self_scores, expected_self, rtol=1e-10, atol=0)


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
@pytest.mark.parametrize("damping", [None, 0.3])
@pytest.mark.parametrize("name,make_model,make_data", CASES, ids=[c[0] for c in CASES])
def test_kfac_and_ekfac_equal_the_exact_fisher_for_one_datum(name, make_model, make_data, strategy, damping):
    """For one example, G = sum_t g_t a_t^T with T = 1 is rank one and the Kronecker eigenbasis is exact."""
    model, task = make_model(), ClassificationTask()
    data = make_data()
    if name == "cnn":  # conv layers have many positions; the exactness holds for the linear head alone
        task = ClassificationTask(modules=["head"])
    one = Subset(data, [3])
    queries = Subset(make_data(seed=2), range(5))
    factors = fi.fit_factors(model, task, one, strategy=strategy, use_empirical_fisher=True, **QUIET)
    train_grads, query_grads = _oracle_grads(model, task, one, queries, factors.layers)
    expected = 0
    for layer, grads in train_grads.items():
        fisher = dense_fisher(grads)
        lam = 0.1 * torch.trace(fisher) / fisher.shape[0] if damping is None else damping
        expected = expected + dense_influence(query_grads[layer], grads, fisher, float(lam))
    pairwise = fi.pairwise_scores(model, task, factors, queries, one, damping=damping, **QUIET)
    torch.testing.assert_close(pairwise, expected, rtol=1e-9, atol=1e-12)


class UnitResidualRegression(fi.Task):
    """Summed squared error of a linear model; sampled targets sit at distance exactly 1 from the output.

    Then every sampled output gradient is +-1, S = 1 exactly, and the true-Fisher KFAC factor equals
    A = mean a a^T = (GGN of the summed loss) / N = (Hessian of the summed loss) / N.
    """

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        out = model(x)
        if sample:
            with torch.no_grad():
                signs = torch.randint(0, 2, out.shape, dtype=out.dtype) * 2 - 1
                y = out.detach() + signs
        return 0.5 * (out - y).square().sum()

    def compute_measurement(self, batch, model):
        x, y = batch
        return 0.5 * (model(x) - y).square().sum()


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_kfac_equals_exact_hessian_for_linear_regression(strategy):
    torch.manual_seed(0)
    n, d = 30, 4
    model = nn.Linear(d, 1).double()
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randn(n, 1, dtype=torch.float64)
    train, queries = TensorDataset(x, y), TensorDataset(x[:6] + 0.5, y[:6])
    task = UnitResidualRegression()
    damping = 1e-3
    factors = fi.fit_factors(model, task, train, strategy=strategy, use_empirical_fisher=False, batch_size=7, **QUIET)

    w0, b0 = model.weight.detach(), model.bias.detach()
    flat0 = torch.cat([w0.flatten(), b0])

    def summed_loss(flat):
        return 0.5 * (x @ flat[:d] + flat[d] - y[:, 0]).square().sum()

    hessian = torch.autograd.functional.hessian(summed_loss, flat0)
    train_grads, query_grads = _oracle_grads(model, task, train, queries, factors.layers)
    (layer,) = train_grads  # the model itself is the one tracked layer, named ""
    expected = dense_influence(query_grads[layer], train_grads[layer], hessian / n, damping)
    pairwise = fi.pairwise_scores(model, task, factors, queries, train, damping=damping, **QUIET)
    torch.testing.assert_close(pairwise, expected, rtol=1e-9, atol=1e-12)
