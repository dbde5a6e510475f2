"""The shape of the code, as issue 12 set it (measured by benchmarks/structure.py from the source alone), and
the one behaviour the rebuilt shell adds: one discovery per call, shared by every module partition."""

import sys
from pathlib import Path

import pytest
import torch

import fninfluence as fi

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import structure  # noqa: E402
from fninfluence.capture import ModelTap

from models import ClassificationTask, classification_data, float64, mlp


@pytest.fixture(scope="module")
def report():
    return structure.measure(max_lines=60, max_params=8)


def test_no_import_cycle(report):
    """Imports inside functions count: a lazy import that hides a cycle at import time is still one."""
    assert report.import_cycles == []


def test_layer_kind_dispatch_only_in_the_algebra_module(report):
    assert report.layer_kind_dispatch == []


def test_no_long_function(report):
    assert report.long_functions == []


def test_no_wide_internal_function(report):
    assert report.wide_functions == []


def _counting_discovery(monkeypatch):
    calls = []
    original = ModelTap._discover_once

    def counted(self, objective, batch):
        calls.append(objective)
        return original(self, objective, batch)

    monkeypatch.setattr(ModelTap, "_discover_once", counted)
    return calls


def test_module_partitions_share_one_discovery(monkeypatch):
    """A discovery pass per (objective, batch shape) and call, not one more per module partition; the
    factors and scores equal those of the unpartitioned call."""
    model, data = float64(mlp()), classification_data(n=16)
    task = ClassificationTask()
    calls = _counting_discovery(monkeypatch)
    whole = fi.fit_factors(model, task, data, strategy="ekfac", use_empirical_fisher=False, batch_size=8, progress=False)
    calls.clear()
    split = fi.fit_factors(model, task, data, strategy="ekfac", use_empirical_fisher=False, batch_size=8,
                           module_partitions=2, progress=False)
    assert calls == ["train_sampled"]
    for layer in whole.tensors:
        for name, value in whole.tensors[layer].items():
            torch.testing.assert_close(split.tensors[layer][name], value, rtol=1e-12, atol=1e-12)
    calls.clear()
    scores = fi.pairwise_scores(model, task, whole, data, data, batch_size=8, module_partitions=2, progress=False)
    assert sorted(calls) == ["measurement", "train"]
    reference = fi.pairwise_scores(model, task, whole, data, data, batch_size=8, progress=False)
    torch.testing.assert_close(scores, reference, rtol=1e-10, atol=1e-12)
