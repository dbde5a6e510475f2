"""A different strategy per layer: each layer is fitted and preconditioned by its own estimator."""

from __future__ import annotations

import pytest
import torch

import fninfluence as fi
from models import classification_data
from test_parameters import CrossEntropy, _model

LAYERS = ["fc", "norm", "custom", "head"]
MIXED = {"*": "ekfac", "norm": "diagonal", "custom": "identity"}


def _scores(strategy, modules, store=None):
    model, data = _model(), classification_data()
    task = CrossEntropy(modules)
    factors = fi.fit_factors(model, task, data, strategy=strategy, use_empirical_fisher=True, batch_size=5,
                             store=store, progress=False)
    pairwise = fi.pairwise_scores(model, task, factors, data, data, per_module=True, progress=False)
    self_scores = fi.self_scores(model, task, factors, data, per_module=True, progress=False)
    return factors, pairwise, self_scores


def test_each_layer_scores_as_under_its_own_strategy():
    factors, pairwise, self_scores = _scores(MIXED, LAYERS)
    assert factors.strategy == "mixed"
    assert factors.strategies == {"fc": "ekfac", "norm": "diagonal", "custom": "identity", "head": "ekfac"}
    for strategy, layers in (("ekfac", ["fc", "head"]), ("diagonal", ["norm"]), ("identity", ["custom"])):
        _, alone_pairwise, alone_self = _scores(strategy, layers)
        for layer in layers:
            torch.testing.assert_close(pairwise[layer], alone_pairwise[layer], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(self_scores[layer], alone_self[layer], rtol=1e-10, atol=1e-12)
    assert "lambda" in factors["norm"] and "activation_eigenvectors" not in factors["norm"]
    assert factors["custom"] == {}


def test_mixed_factors_round_trip_through_a_store(tmp_path):
    factors, pairwise, _ = _scores(MIXED, LAYERS, store=tmp_path / "f")
    loaded = fi.Factors.load(tmp_path / "f")
    assert loaded.strategies == factors.strategies and loaded.complete
    model, data = _model(), classification_data()
    again = fi.pairwise_scores(model, CrossEntropy(LAYERS), loaded, data, data, per_module=True, progress=False)
    for layer in LAYERS:
        torch.testing.assert_close(again[layer], pairwise[layer], rtol=0, atol=0)


def test_strategy_mappings_are_checked():
    with pytest.raises(fi.InfluenceError, match=r"names layers \['nrom'\] that are not tracked"):
        _scores({"*": "ekfac", "nrom": "diagonal"}, LAYERS)
    with pytest.raises(fi.InfluenceError, match=r"no strategy for layers \['fc', 'head', 'custom'\].*'\*' default"):
        _scores({"norm": "diagonal"}, LAYERS)
