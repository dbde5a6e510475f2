"""Precision: float32 results stay close to float64 ones, and asked-for dtypes are what is returned and stored."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import fninfluence as fi
from fninfluence.curvature.kfac import second_moment
from fninfluence.precision import Precision
from fninfluence.scores import pairwise_layer_scores
from models import ClassificationTask, mlp

WIDE = Precision(covariance_dtype=torch.float64, lambda_dtype=torch.float64, per_sample_gradient_dtype=torch.float64,
                 precondition_dtype=torch.float64, score_dtype=torch.float64)


def shifted_problem():
    """An MLP whose inputs have a large common mean (20 against a spread of 1): A's small eigenvalues sit
    ~1e-3 below its largest, where a plain float32 sum of a a^T loses them."""
    torch.manual_seed(0)
    model = mlp(d_in=8, hidden=16, classes=3).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g) + 20.0, torch.randint(0, 3, (64,), generator=g)
    return model, ClassificationTask(), TensorDataset(x, y), TensorDataset(x[:6], y[:6])


def pairwise(model, task, train, queries, strategy, damping, precision):
    factors = fi.fit_factors(model, task, train, strategy=strategy, use_empirical_fisher=True, batch_size=16,
                             progress=False, precision=precision)
    return fi.pairwise_scores(model, task, factors, queries, train, damping=damping, batch_size=16, progress=False,
                              precision=precision)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_float32_scores_stay_close_to_float64_with_tiny_damping(strategy):
    # float32 sums of a a^T made these 6.3e-3 (EKFAC) and 1.4e-3 (KFAC) from float64; Kronfluence 1.0.1 is
    # at the same level. Centred per-batch products and float64 sums across batches give ~1.2e-5.
    model, task, train, queries = shifted_problem()
    exact = pairwise(model, task, train, queries, strategy, 1e-8, WIDE)
    narrow = pairwise(model, task, train, queries, strategy, 1e-8, Precision())
    assert narrow.dtype == torch.float32 and exact.dtype == torch.float64
    assert float((narrow.double() - exact).norm() / exact.norm()) < 1e-4


def test_factors_sum_across_batches_in_float64_and_are_returned_in_the_asked_dtype():
    model, task, train, _ = shifted_problem()
    factors = fi.fit_factors(model, task, train, strategy="ekfac", use_empirical_fisher=True, batch_size=16,
                             progress=False)
    wide = fi.fit_factors(model, task, train, strategy="ekfac", use_empirical_fisher=True, batch_size=16,
                          progress=False, precision=WIDE)
    for layer in ("0", "2"):
        for name in ("activation_covariance", "gradient_covariance", "lambda"):
            assert factors[layer][name].dtype == torch.float32
            exact = wide[layer][name]
            assert float((factors[layer][name].double() - exact).norm() / exact.norm()) < 1e-6
        assert factors[layer]["activation_eigenvectors"].dtype == torch.float64


def test_centred_second_moment_equals_the_float64_sum():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(500, 2, 7, generator=g, dtype=torch.float64) + 30.0)
    exact = torch.einsum("ngi,ngj->gij", x, x)
    narrow = x.float()
    exact_of_narrow = torch.einsum("ngi,ngj->gij", narrow.double(), narrow.double())
    centred = second_moment(narrow, torch.float64)
    plain = torch.einsum("ngi,ngj->gij", narrow, narrow).double()
    assert centred.dtype == torch.float64
    # the spread about the mean (eigenvalues ~500) is what a float32 product of raw entries (~4.5e5) blurs
    spread = lambda m: torch.linalg.eigvalsh(m)[:, :-1]
    error = lambda m: float((spread(m) - spread(exact_of_narrow)).abs().max() / spread(exact_of_narrow).abs().max())
    assert error(centred) < 1e-5 < error(plain)
    assert torch.allclose(second_moment(x, torch.float64), exact, rtol=0, atol=0)


def test_pairwise_contraction_is_as_accurate_as_the_einsum_without_a_groups_axis():
    # summing over the size-1 groups axis took torch.einsum's less accurate float32 path: 2.8x the error
    torch.manual_seed(0)
    q, n, t, o, i = 8, 16, 32, 256, 65
    query = torch.randn(q, 1, o, i, dtype=torch.float64) * torch.logspace(0, 4, i, dtype=torch.float64)
    stats = {"g": torch.randn(n, t, 1, o, dtype=torch.float64), "a": torch.randn(n, t, 1, i, dtype=torch.float64) + 1}
    exact = pairwise_layer_scores(query, stats)
    assert torch.allclose(exact, torch.einsum("qoi,nto,nti->qn", query[:, 0], stats["g"][:, :, 0], stats["a"][:, :, 0]),
                          rtol=1e-12, atol=0)
    narrow = {k: v.float() for k, v in stats.items()}
    error = lambda s: float((s.double() - exact).norm() / exact.norm())
    reference = error(torch.einsum("noi,qoi->qn", torch.einsum("nto,nti->noi", narrow["g"][:, :, 0], narrow["a"][:, :, 0]),
                                   query[:, 0].float()))
    assert error(pairwise_layer_scores(query.float(), narrow)) <= 1.25 * reference < 1e-5
