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
from fninfluence.testing import (CHECKS, Case, EstimatorCheckError, SummedCrossEntropy, check_estimator,
                                 damping_law_distances, dense_ggn, exact_ggn_influence, ridge_influence,
                                 ridge_leave_one_out, ridge_leverages, ridge_solution, standard_cases)
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
    factors = fi.fit_factors(model, task, train, strategy="kfac", use_empirical_fisher=False, batch_size=6, **QUIET)
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
    factors = fi.fit_factors(model, task, train, strategy="ekfac", use_empirical_fisher=False, batch_size=5, **QUIET)
    scores = fi.pairwise_scores(model, task, factors, queries, train, damping=l2 / n, **QUIET)
    query_design = torch.cat([x_query, torch.ones(3, 1, dtype=x.dtype)], dim=1)
    loo = ridge_leave_one_out(design, y, l2, query_design)
    torch.testing.assert_close(scores / n / (1 - ridge_leverages(design, l2)), loo, rtol=1e-8, atol=1e-12)
    # the sign convention: a positive score means removing the example raises the prediction
    assert bool(((scores > 0) == (loo > 0)).all())


# -- the property suite ------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy,exact", [("identity", False), ("diagonal", False), ("kfac", True), ("ekfac", True)])
def test_built_in_estimators_pass_the_suite(strategy, exact):
    """Every built-in on every default case (an MLP, a CNN with positions, a grouped and a depthwise conv), with
    every check, the damping law and the groups check included."""
    results = check_estimator(fi.get_estimator(strategy), exact_for_one_example=exact)
    assert {r.check.split(",")[0] for r in results} == set(CHECKS) - ({"one example exact"} if not exact else set())
    assert {r.case for r in results} == {"mlp", "cnn", "grouped conv"}
    assert all(r.passed for r in results)


def test_the_default_cases_have_grouped_layers_and_their_one_group_twin():
    case = standard_cases()[-1]
    factors = fi.fit_factors(case.model, case.task, case.train, strategy="ekfac", progress=False)
    groups = {layer: spec.shape[0] for layer, spec in factors.layers.items()}
    assert groups == {"grouped": 2, "depthwise": 4, "head": 1}
    twin, split = case.ungrouped
    assert split == {"grouped": ("grouped.0", "grouped.1"), "depthwise": tuple(f"depthwise.{g}" for g in range(4))}
    x = case.train.tensors[0]
    torch.testing.assert_close(twin(x), case.model(x), rtol=0, atol=0)


def test_identity_passes_all_but_the_exactness_check():
    """Identity satisfies every invariance, and the exactness check can fail: identity ignores the curvature."""
    results = check_estimator(fi.identity, exact_for_one_example=True, raise_on_failure=False)
    failed = {r.check for r in results if not r.passed}
    assert failed == {"one example exact"}


def test_the_damping_law_holds_of_a_damped_inverse_and_of_identity():
    """``damping_law_distances`` is non-increasing for (C + l I)^{-1}, falls as 1/l, and is 0 for P(G) = G."""
    g = torch.Generator().manual_seed(0)
    root = torch.randn(6, 6, generator=g, dtype=torch.float64)
    curvature = root @ root.T
    grads = torch.randn(4, 1, 2, 3, generator=g, dtype=torch.float64)
    solve = lambda x, damping: torch.linalg.solve(curvature + damping * torch.eye(6, dtype=torch.float64),
                                                   x.flatten(1).T).T.reshape(x.shape)
    dampings = [0.01 * 10.0 ** k for k in range(10)]
    distances = damping_law_distances(solve, grads, dampings)
    assert bool((distances[1:] <= distances[:-1] + 1e-14).all())
    torch.testing.assert_close(distances[-1] / distances[-2], torch.full((4,), 0.1, dtype=torch.float64), rtol=1e-3,
                               atol=0)
    assert float(damping_law_distances(lambda x, damping: x, grads, dampings).abs().max()) == 0.0
    fixed = damping_law_distances(lambda x, damping: solve(x, 0.1), grads, dampings)  # ignores the damping
    assert bool((fixed == fixed[0]).all()) and float(fixed.min()) > 0.01


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


class _Bag(nn.Module):
    """Token ids -> an embedding (or its one-hot ``Linear`` twin: weight = embedding.weight^T) -> mean -> head."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed, self.head = embed, nn.Linear(3, 3)

    def forward(self, ids):
        x = self.embed(ids) if isinstance(self.embed, nn.Embedding) else self.embed(F.one_hot(ids, 7).double())
        return self.head(torch.tanh(x).mean(1))


class _BagTask(SummedCrossEntropy):
    def tracked_modules(self):
        return ["embed", "head"]


def test_the_documented_user_estimator_handles_embeddings():
    """On an embedding (one-hot statistics) it scores as on the same layer written as a one-hot ``Linear``."""
    estimator = _load_example("custom_estimator").dense_layer_fisher
    torch.manual_seed(0)
    model = _Bag(nn.Embedding(7, 3)).double().eval()
    twin = _Bag(nn.Linear(7, 3, bias=False)).double().eval()
    with torch.no_grad():
        twin.embed.weight.copy_(model.embed.weight.T)
        twin.head.load_state_dict(model.head.state_dict())
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 5, (9, 4), generator=g), torch.randint(0, 3, (9,), generator=g))
    task = _BagTask()
    fit = lambda m: fi.fit_factors(m, task, data, strategy=estimator, use_empirical_fisher=True, batch_size=4, **QUIET)
    factors, twin_factors = fit(model), fit(twin)
    assert factors.layers["embed"].shape == (1, 3, 7) and getattr(factors.layers["embed"].shape, "one_hot", False)
    scores = fi.pairwise_scores(model, task, factors, data, data, damping=0.1, batch_size=4, **QUIET)
    torch.testing.assert_close(scores, fi.pairwise_scores(twin, task, twin_factors, data, data, damping=0.1,
                                                          batch_size=4, **QUIET), rtol=1e-10, atol=0)
    torch.testing.assert_close(fi.self_scores(model, task, factors, data, damping=0.1, batch_size=4, **QUIET),
                               torch.diagonal(scores), rtol=1e-10, atol=0)
    # and the suite runs on a case of one's own with an embedding, as docs/testing.md shows
    queries = TensorDataset(torch.randint(0, 5, (3, 4), generator=g), torch.randint(0, 3, (3,), generator=g))
    results = check_estimator(estimator, cases=[Case("embedding", model, task, data, queries)],
                              exact_for_one_example=True)
    assert len(results) == 15 and {r.case for r in results} == {"embedding"}


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


# Wrong: drops the damping argument (always the heuristic damping), in precondition and self_score alike, so the
# two stay consistent and every invariance holds; only the damping law sees it (and, on the grouped case, the
# groups check: the heuristic is a mean over the layer's groups).
IGNORES_DAMPING = fi.CurvatureEstimator("ignores_damping", fi.kfac.passes,
                                        lambda factors, grads, damping: fi.kfac.precondition(factors, grads, None),
                                        lambda factors, stats, damping: fi.kfac.self_score(factors, stats, None),
                                        fi.kfac.memory)


def _group_zero_everywhere(finalize):
    """Wrong: every factor with a group dimension gets group 0's value in all groups (indistinguishable from KFAC
    on layers of one group)."""
    def wrong_finalize(state, factors):
        return {name: value[:1].expand_as(value).clone() if value.dim() else value
                for name, value in finalize(state, factors).items()}
    return wrong_finalize


GROUP_ZERO = fi.CurvatureEstimator(
    "group_zero", tuple(p._replace(finalize=_group_zero_everywhere(p.finalize)) for p in fi.kfac.passes),
    fi.kfac.precondition, fi.kfac.self_score, fi.kfac.memory)

MLP = lambda: standard_cases()[:1]
GROUPED = lambda: [case for case in standard_cases() if case.name == "grouped conv"]

# name: (estimator, cases, exact_for_one_example, failures expected, failures allowed, a failure's message)
WRONG = {
    "per_batch_mean": (fi.CurvatureEstimator("per_batch_mean", (fi.FitPass("lambda", lambda_init, _per_batch_mean_update,
                                                                          lambda_finalize),),
                                             precondition_in_basis, default_self_score(precondition_in_basis)),
                       MLP, False, {"batch size", "partitions", "duplication"},
                       {"batch size", "partitions", "duplication", "order"}, "batch size [mlp]"),
    "undamped_self": (fi.CurvatureEstimator("undamped_self", fi.diagonal.passes, precondition_in_basis,
                                            _undamped_self_score), MLP, False, {"self = diag(pairwise)"},
                      {"self = diag(pairwise)"}, "self = diag(pairwise), damping=0.1 [mlp]"),
    "untransposed": (fi.CurvatureEstimator("untransposed", (fi.FitPass("covariance", covariance_init, covariance_update,
                                                                       kfac_finalize),),
                                           _untransposed_precondition, default_self_score(_untransposed_precondition)),
                     MLP, False, {"symmetric"}, {"symmetric", "positive", "damping law"}, "symmetric, damping=0.1 [mlp]"),
    "ignores_damping": (IGNORES_DAMPING, MLP, False, {"damping law"}, {"damping law"}, "damping law [mlp]"),
    "ignores_damping_everywhere": (IGNORES_DAMPING, lambda: None, False, {"damping law"},
                                   {"damping law", "groups = separate layers"}, "damping law [grouped conv]"),
    "group_zero": (GROUP_ZERO, GROUPED, False, {"groups = separate layers"}, {"groups = separate layers"},
                   "groups = separate layers [grouped conv]"),
    "group_zero_exact": (GROUP_ZERO, GROUPED, True, {"groups = separate layers", "one example exact"},
                         {"groups = separate layers", "one example exact"}, "one example exact [grouped conv]"),
}


@pytest.mark.parametrize("name", list(WRONG))
def test_the_suite_catches_a_wrong_estimator(name):
    estimator, cases, exact, expected_failures, possible_failures, message = WRONG[name]
    with pytest.raises(EstimatorCheckError) as caught:
        check_estimator(estimator, cases=cases(), exact_for_one_example=exact)
    failed = {f.check.split(",")[0] for f in caught.value.failures}
    assert expected_failures <= failed <= possible_failures, failed  # specific: correct properties are not reported
    assert estimator.name in str(caught.value) and "relative error" in str(caught.value)
    assert message in str(caught.value)  # the failure names the law and the case


@pytest.mark.parametrize("estimator", [IGNORES_DAMPING, GROUP_ZERO], ids=lambda e: e.name)
def test_the_old_suite_could_not_see_the_wrong_estimators(estimator):
    """Without the damping law and the grouped case, both pass: every other check holds of them."""
    old_checks = set(CHECKS) - {"damping law", "groups = separate layers", "one example exact"}
    results = check_estimator(estimator, cases=standard_cases()[:2], raise_on_failure=False)
    assert all(r.passed for r in results if r.check.split(",")[0] in old_checks)


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
