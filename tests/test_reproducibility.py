"""Results that must not depend on the route they took: one memory layout for factors, whichever way they came.

Bit-for-bit comparisons here are between runs of the same kernels on the same values in one process, so they
hold on any CPU by construction; they fail as soon as two routes lay a tensor out differently (eigenvectors
straight from ``torch.linalg.eigh`` are column-major, arrays read from a store are row-major, and a
contraction over either layout sums in another order on some CPUs).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Subset

import fninfluence as fi
from models import ClassificationTask, LMTask, SmallCNN, TinyTransformerLM, float64, image_data, sequence_data

QUIET = dict(progress=False)


def _every_factor_is_row_major(factors):
    return all(value.is_contiguous() for tensors in factors.tensors.values() for value in tensors.values())


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_fitted_factors_are_row_major(strategy):
    model, data, task = float64(TinyTransformerLM()), sequence_data(), LMTask()
    factors = fi.fit_factors(model, task, data, strategy=strategy, use_empirical_fisher=True, batch_size=4, **QUIET)
    assert _every_factor_is_row_major(factors)


@pytest.mark.parametrize("model_data_task", ["cnn", "lm"])
def test_fit_resumed_between_passes_equals_an_uninterrupted_fit_bit_for_bit(model_data_task, tmp_path):
    torch.manual_seed(0)
    if model_data_task == "cnn":
        model, data, task = float64(SmallCNN(padding=1)), image_data(n=12), ClassificationTask()
    else:
        model, data, task = float64(TinyTransformerLM()), sequence_data(), LMTask()
    fit = dict(strategy="ekfac", use_empirical_fisher=True, batch_size=4, data_partitions=2, **QUIET)
    uninterrupted = fi.fit_factors(model, task, data, **fit)
    store = tmp_path / "factors"
    assert fi.fit_factors(model, task, data, store=store, passes=["covariance"], **fit).passes_done == ("covariance",)
    resumed = fi.fit_factors(model, task, data, store=store, **fit)  # reads the covariance pass back, fits Lambda
    for layer, tensors in uninterrupted.tensors.items():
        for name, value in tensors.items():
            assert torch.equal(resumed[layer][name], value), (layer, name)
    queries = Subset(data, range(4))
    assert torch.equal(fi.pairwise_scores(model, task, resumed, queries, data, **QUIET),
                       fi.pairwise_scores(model, task, uninterrupted, queries, data, **QUIET))
