"""Small things a new user meets first: the per-module total of in-memory scores, estimate_memory's output,
the score-distribution ticks, the labels of query passes, and Kronfluence's argument presets."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fninfluence as fi
from fninfluence.compat import kronfluence as compat
from fninfluence.compat import presets
from fninfluence.memory import format_bytes
from fninfluence.store.scores_store import read_scores

QUIET = dict(progress=False)


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    data = TensorDataset(torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,)))
    task = fi.classification_task()
    return model, task, data, fi.fit_factors(model, task, data, strategy="ekfac", **QUIET)


def test_per_module_scores_answer_all_modules_like_a_store(tmp_path):
    model, task, data, factors = _setup()
    summed = fi.pairwise_scores(model, task, factors, data, data, **QUIET)
    per_module = fi.pairwise_scores(model, task, factors, data, data, per_module=True, **QUIET)
    assert list(per_module) == ["0", "2"]  # the layers only: adding the values up counts each layer once
    torch.testing.assert_close(per_module["all_modules"], summed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(per_module.values()), summed, rtol=1e-12, atol=1e-12)
    fi.pairwise_scores(model, task, factors, data, data, per_module=True, store=tmp_path / "s", **QUIET)
    stored = read_scores(tmp_path / "s")
    torch.testing.assert_close(stored["all_modules"], per_module["all_modules"], rtol=1e-12, atol=1e-12)
    again = fi.pairwise_scores(model, task, factors, data, data, per_module=True, store=tmp_path / "s", **QUIET)
    torch.testing.assert_close(again.total, summed, rtol=1e-12, atol=1e-12)  # a reused store answers the same
    self_per_module = fi.self_scores(model, task, factors, data, per_module=True, **QUIET)
    torch.testing.assert_close(self_per_module["all_modules"], fi.self_scores(model, task, factors, data, **QUIET),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(KeyError):
        per_module["no such layer"]


def test_format_bytes_keeps_small_sizes_readable():
    assert [format_bytes(n) for n in (0, 812, 3 * 1024 + 400, 5 * 2 ** 20, 2 ** 30 * 1.25)] == \
        ["0 B", "812 B", "3.4 KiB", "5.0 MiB", "1.2 GiB"]


def test_estimate_memory_takes_a_dataset_and_prints_no_profiler_log():
    """In a fresh process (the profiler's own log goes to file descriptor 2, which capsys does not see)."""
    script = textwrap.dedent("""
        import torch, fninfluence as fi
        from torch import nn
        from torch.utils.data import TensorDataset
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        data = TensorDataset(torch.randn(30, 4), torch.randint(0, 3, (30,)))
        from_data = fi.estimate_memory(model, fi.classification_task(), data, batch_size=8)
        from_batch = fi.estimate_memory(model, fi.classification_task(), data[:8], num_train=30)
        assert from_data.settings == from_batch.settings, (from_data.settings, from_batch.settings)
        print(from_data)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "profiler_start" not in done.stderr and "gpuGetDeviceCount" not in done.stderr, done.stderr
    assert " 0.0 MiB" not in done.stdout and "KiB" in done.stdout, done.stdout


def test_estimate_memory_passes_other_stderr_output_on(capfd):
    from fninfluence.memory import measure_peak

    def noisy():
        print("a user's message", file=sys.stderr, flush=True)
        return torch.ones(1000).sum()

    measure_peak(noisy)
    assert "a user's message" in capfd.readouterr().err


def test_symlog_ticks_leave_room_around_zero():
    from fninfluence.plot import _symlog_ticks

    ticks = _symlog_ticks(limit=0.08, threshold=1.2e-4)
    assert ticks == [-1e-2, -1e-3, 0.0, 1e-3, 1e-2]
    many = _symlog_ticks(limit=1e6, threshold=1e-6)
    assert len(many) <= 11 and 0.0 in many and all(abs(t) >= 3e-6 for t in many if t)
    assert _symlog_ticks(limit=0.0, threshold=1.0) == [0.0]


def test_query_passes_are_labelled_by_their_queries(caplog):
    model, task, data, factors = _setup()
    with caplog.at_level(logging.INFO, logger="fninfluence"):
        split = fi.pairwise_scores(model, task, factors, data, data, queries_per_pass=5, query_batch_size=5, **QUIET)
    labels = [r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().startswith("pairwise")]
    assert labels == [f"pairwise scores queries {a}-{b} of 12" for a, b in ((0, 4), (5, 9), (10, 11))]
    torch.testing.assert_close(split, fi.pairwise_scores(model, task, factors, data, data, **QUIET),
                               rtol=1e-12, atol=1e-12)


def test_presets_set_what_they_say():
    assert presets.default_factor_arguments("kfac") == compat.FactorArguments(strategy="kfac")
    exact = presets.pytest_factor_arguments()
    assert exact.use_empirical_fisher and {exact.activation_covariance_dtype, exact.gradient_covariance_dtype,
                                           exact.per_sample_gradient_dtype, exact.lambda_dtype} == {torch.float64}
    extreme = presets.extreme_reduce_memory_factor_arguments(module_partitions=3)
    assert (extreme.covariance_module_partitions, extreme.lambda_module_partitions, extreme.lambda_dtype) == \
        (3, 3, torch.bfloat16)
    assert presets.default_score_arguments(query_gradient_low_rank=4).query_gradient_accumulation_steps == 10
    assert presets.all_low_precision_score_arguments().precondition_dtype == torch.bfloat16
    assert presets.extreme_reduce_memory_score_arguments(module_partitions=2).module_partitions == 2


@pytest.mark.parametrize("name", presets.__all__)
def test_presets_equal_kronfluences(name):
    """Every field of every preset as Kronfluence 1.0.1 sets it (where Kronfluence is installed)."""
    kind = "factor_arguments" if "factor" in name else "score_arguments"
    reference = importlib.import_module(f"kronfluence.utils.common.{kind}")
    theirs, ours = getattr(reference, name)(), getattr(presets, name)()
    for field in dataclasses.fields(ours):
        if hasattr(theirs, field.name):
            assert getattr(ours, field.name) == getattr(theirs, field.name), field.name


def test_per_module_dict_survives_precision_cast():
    model, task, data, factors = _setup()
    scores = fi.pairwise_scores(model, task, factors, data, data, per_module=True,
                                precision=fi.precision.Precision(score_dtype=torch.float32), **QUIET)
    assert scores["all_modules"].dtype == torch.float32 and list(scores) == ["0", "2"]


def test_index_scores_per_module_total(tmp_path):
    model, task, data, factors = _setup()
    index = fi.build_index(model, task, data, tmp_path / "index", **QUIET)
    scores = fi.index_scores(model, task, factors, data, index, per_module=True, **QUIET)
    torch.testing.assert_close(scores["all_modules"], fi.index_scores(model, task, factors, data, index, **QUIET),
                               rtol=1e-12, atol=1e-12)


def test_loader_for_estimate_memory_is_not_shuffled():
    model, task, data, _ = _setup()
    with pytest.raises(fi.InfluenceError, match="shuffle"):
        fi.estimate_memory(model, task, DataLoader(data, batch_size=4, shuffle=True))
