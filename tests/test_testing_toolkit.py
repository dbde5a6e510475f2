"""The public testing toolkit: the GGN and ridge leave-one-out oracles, and the estimator property suite."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn
from torch.utils.data import TensorDataset

import fninfluence as fi
from fninfluence.curvature import default_self_score
from fninfluence.curvature.eigenbasis import lambda_finalize, lambda_init, precondition_in_basis
from fninfluence.curvature.kfac import covariance_init, covariance_update, kfac_finalize
from fninfluence.testing import (CHECKS, EstimatorCheckError, SummedCrossEntropy, check_estimator, dense_ggn,
                                 exact_ggn_influence, ridge_influence, ridge_leave_one_out, ridge_leverages,
                                 ridge_solution, standard_cases)
from fninfluence.testing.strategies import ridge_problems

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(progress=False)


def _load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- oracles ---------------------------------------------------------------------------------------

def test_dense_ggn_is_jacobian_transpose_output_hessian_jacobian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [p.numel() for p in params.values()]

    def output(flat, xi):
        pieces = torch.split(flat, sizes)
        values = {n: piece.reshape(p.shape) for (n, p), piece in zip(params.items(), pieces)}
        return torch.func.functional_call(model, values, (xi[None],))[0]

    flat = torch.cat([p.flatten() for p in params.values()])
    expected = 0
    for xi in x:  # cross-entropy: the Hessian in the logits is diag(p) - p p^T
        jacobian, p = torch.func.jacrev(output)(flat, xi), output(flat, xi).softmax(-1)
        expected = expected + jacobian.T @ (torch.diag(p) - p[:, None] * p[None]) @ jacobian
    ggn = dense_ggn(model, SummedCrossEntropy(), TensorDataset(x, y))
    torch.testing.assert_close(ggn, expected / len(x), rtol=1e-12, atol=1e-15)
    # the GGN is not the Hessian for a non-linear model: the oracle does not fall back to it
    hessian = torch.func.hessian(lambda f: sum(F.cross_entropy(output(f, xi)[None], yi[None]) for xi, yi in zip(x, y)))(flat)
    assert (ggn - hessian / len(x)).abs().max() > 1e-3


class UnitResidualRegression(fi.Task):
    """Summed squared error; sampled targets sit at distance exactly 1, so the true-Fisher S is exactly 1 and
    KFAC's A = mean a a^T is the exact Gauss-Newton matrix (= Hessian) of a linear model, averaged."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        out = model(x)
        if sample:
            with torch.no_grad():
                y = out.detach() + (torch.randint(0, 2, out.shape, dtype=out.dtype) * 2 - 1)
        return 0.5 * (out - y).square().sum()

    def compute_measurement(self, batch, model):
        return model(batch[0]).sum()  # the prediction itself


def _regression(n=20, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


def test_kfac_equals_exact_ggn_influence_for_a_linear_layer():
    x, y = _regression()
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    train, queries = TensorDataset(x, y[:, None]), TensorDataset(x[:4] + 1.0, y[:4, None])
    task = UnitResidualRegression()
    factors = fi.fit_factors(model, task, train, strategy="kfac", batch_size=6, **QUIET)
    scores = fi.pairwise_scores(model, task, factors, queries, train, damping=0.05, **QUIET)
    torch.testing.assert_close(scores, exact_ggn_influence(model, task, queries, train, damping=0.05),
                               rtol=1e-9, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(ridge_problems())
def test_ridge_influence_over_one_minus_leverage_is_exact_leave_one_out(problem):
    x, y, l2, x_query = problem
    expected = ridge_leave_one_out(x, y, l2, x_query)
    leverage = ridge_leverages(x, l2)
    assert bool(((leverage >= 0) & (leverage < 1)).all())
    torch.testing.assert_close(ridge_influence(x, y, l2, x_query) / (1 - leverage), expected, rtol=1e-7, atol=1e-10)


def test_pipeline_scores_of_a_ridge_model_predict_exact_leave_one_out():
    """fninfluence on a ridge optimum, with damping l2 / N: scores / N / (1 - leverage) is the retrained change."""
    x, y = _regression(n=16)
    l2 = 0.8
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # the intercept is penalised too
    theta = ridge_solution(design, y, l2)
    model = nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.copy_(theta[:3][None])
        model.bias.copy_(theta[3:])
    x_query = torch.randn(3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    train, queries = TensorDataset(x, y[:, None]), TensorDataset(x_query, torch.zeros(3, 1, dtype=x.dtype))
    task, n = UnitResidualRegression(), len(x)
    factors = fi.fit_factors(model, task, train, strategy="ekfac", batch_size=5, **QUIET)
    scores = fi.pairwise_scores(model, task, factors, queries, train, damping=l2 / n, **QUIET)
    query_design = torch.cat([x_query, torch.ones(3, 1, dtype=x.dtype)], dim=1)
    loo = ridge_leave_one_out(design, y, l2, query_design)
    torch.testing.assert_close(scores / n / (1 - ridge_leverages(design, l2)), loo, rtol=1e-8, atol=1e-12)
    # the sign convention: a positive score means removing the example raises the prediction
    assert bool(((scores > 0) == (loo > 0)).all())


# -- the property suite ------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy,exact", [("diagonal", False), ("kfac", True), ("ekfac", True)])
def test_built_in_estimators_pass_the_suite(strategy, exact):
    """EKFAC on both cases (an MLP and a CNN with positions); the others on the MLP, to keep the suite quick."""
    results = check_estimator(fi.get_estimator(strategy), exact_for_one_example=exact,
                              cases=None if strategy == "ekfac" else standard_cases()[:1])
    assert {r.check.split(",")[0] for r in results} == set(CHECKS) - ({"one example exact"} if not exact else set())
    assert all(r.passed for r in results)


def test_identity_passes_all_but_the_exactness_check():
    """Identity satisfies every invariance, and the exactness check can fail: identity ignores the curvature."""
    results = check_estimator(fi.identity, cases=standard_cases()[:1], exact_for_one_example=True,
                              raise_on_failure=False)
    failed = {r.check for r in results if not r.passed}
    assert failed == {"one example exact"}


def test_the_documented_user_estimator_passes_and_matches_the_dense_oracle():
    estimator = _load_example("custom_estimator").dense_layer_fisher
    check_estimator(estimator, exact_for_one_example=True)
    case = standard_cases()[0]  # an MLP: the dense layer Fisher is exact; compare with the whole-model oracle
    factors = fi.fit_factors(case.model, case.task, case.train, strategy=estimator, use_empirical_fisher=True,
                             **QUIET)
    scores = fi.pairwise_scores(case.model, case.task, factors, case.queries, case.train, damping=0.1, **QUIET)
    from fninfluence.testing import dense_fisher, dense_influence, layer_gradients, per_example_gradients
    train = layer_gradients(per_example_gradients(case.model, case.task, case.train), factors.layers)
    queries = layer_gradients(per_example_gradients(case.model, case.task, case.queries, objective="measurement"),
                              factors.layers)
    expected = sum(dense_influence(queries[l], train[l], dense_fisher(train[l]), 0.1) for l in factors.layers)
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=0)


def _per_batch_mean_update(state, stats, factors):
    """Wrong: averages each batch and counts batches, so the result depends on how the data is batched."""
    grads = torch.einsum("btgo,btgi->bgoi", stats["g"], stats["a"])
    return {"lambda_sum": state["lambda_sum"] + grads.square().mean(0), "examples": state["examples"] + 1}


def _undamped_self_score(factors, stats, damping):
    """Wrong: forgets the damping, so it disagrees with precondition."""
    grads = torch.einsum("btgo,btgi->bgoi", stats["g"], stats["a"])
    return (grads.square() / factors["lambda"]).flatten(1).sum(1)


def _untransposed_precondition(factors, grads, damping):
    """Wrong: rotates back with Q_A instead of Q_A^T, which is not a symmetric operator."""
    qa, qs = factors["activation_eigenvectors"].to(grads.dtype), factors["gradient_eigenvectors"].to(grads.dtype)
    rotated = torch.einsum("gop,ngoi,gij->ngpj", qs, grads, qa)
    inverse = 1.0 / (factors["lambda"] + (0.1 * factors["lambda"].mean() if damping is None else damping))
    return torch.einsum("gop,ngpj,gji->ngoi", qs, rotated * inverse, qa)


WRONG = {
    "per_batch_mean": (fi.CurvatureEstimator("per_batch_mean", (fi.FitPass("lambda", lambda_init, _per_batch_mean_update,
                                                                          lambda_finalize),),
                                             precondition_in_basis, default_self_score(precondition_in_basis)),
                       {"batch size", "partitions", "duplication"}, {"batch size", "partitions", "duplication", "order"}),
    "undamped_self": (fi.CurvatureEstimator("undamped_self", fi.diagonal.passes, precondition_in_basis,
                                            _undamped_self_score), {"self = diag(pairwise)"}, {"self = diag(pairwise)"}),
    "untransposed": (fi.CurvatureEstimator("untransposed", (fi.FitPass("covariance", covariance_init, covariance_update,
                                                                       kfac_finalize),),
                                           _untransposed_precondition, default_self_score(_untransposed_precondition)),
                     {"symmetric"}, {"symmetric", "positive"}),
}


@pytest.mark.parametrize("name", list(WRONG))
def test_the_suite_catches_a_wrong_estimator(name):
    estimator, expected_failures, possible_failures = WRONG[name]
    with pytest.raises(EstimatorCheckError) as caught:
        check_estimator(estimator, cases=standard_cases()[:1])
    failed = {f.check.split(",")[0] for f in caught.value.failures}
    assert expected_failures <= failed <= possible_failures, failed  # specific: correct properties are not reported
    assert name in str(caught.value) and "relative error" in str(caught.value)


def test_check_estimator_rejects_what_is_not_an_estimator():
    with pytest.raises(fi.InfluenceError, match="CurvatureEstimator"):
        check_estimator("ekfac")


def test_the_toolkit_imports_without_hypothesis():
    # sys.modules[name] = None is how Python spells "not installed" for both import and find_spec
    blocker = ("import sys\nsys.modules['hypothesis'] = None\n"
               "import fninfluence.testing as t\nprint(sorted(t.__all__)[:2])\n"
               "try:\n    import fninfluence.testing.strategies\nexcept ImportError:\n    print('strategies need hypothesis')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", blocker], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "strategies need hypothesis" in result.stdout
