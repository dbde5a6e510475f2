"""Zarr stores: round trips, partitions, argument checks, safe names, concurrent fills, resume after SIGKILL."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Subset

import fninfluence as fi
from fninfluence import InfluenceError
from fninfluence.partitions import Cell, cell_grid
from fninfluence.store.names import check_name, child
from fninfluence.store.scores_store import read_scores
from models import ClassificationTask, LMTask, TinyTransformerLM, classification_data, float64, mlp, sequence_data
import store_job

QUIET = dict(progress=False)
JOB = Path(__file__).with_name("store_job.py")


def _fit(model, task, data, strategy="ekfac", **kwargs):
    return fi.fit_factors(model, task, data, strategy=strategy, use_empirical_fisher=True, batch_size=4, **QUIET,
                          **kwargs)


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
def test_factors_round_trip_through_zarr(strategy, tmp_path, monkeypatch):
    model, data, task = float64(TinyTransformerLM()), sequence_data(), LMTask()
    factors = _fit(model, task, data, strategy)
    factors.save(tmp_path / "f")
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("loading must not unpickle"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("loading must not unpickle"))
    loaded = fi.Factors.load(tmp_path / "f")
    assert loaded.strategy == strategy and loaded.layers == factors.layers and loaded.complete
    for layer in factors.tensors:
        assert loaded[layer].keys() == factors[layer].keys()
        for name, value in factors[layer].items():
            assert torch.equal(loaded[layer][name], value.cpu()), (layer, name)
    queries = Subset(data, range(3))
    torch.testing.assert_close(fi.pairwise_scores(model, task, loaded, queries, data, **QUIET),
                               fi.pairwise_scores(model, task, factors, queries, data, **QUIET), rtol=0, atol=0)
    with pytest.raises(InfluenceError, match="already exists"):
        factors.save(tmp_path / "f")
    factors.save(tmp_path / "f", overwrite=True)


@settings(max_examples=8, deadline=None)
@given(st.sampled_from(["diagonal", "kfac", "ekfac"]), st.integers(1, 5), st.integers(1, 2), st.integers(1, 5),
       st.booleans())
def test_partitioned_results_equal_unpartitioned(strategy, data_parts, module_parts, score_parts, per_module):
    model, data, task = float64(mlp()), classification_data(n=13), ClassificationTask()
    queries = Subset(data, range(3))
    plain = _fit(model, task, data, strategy)
    split = _fit(model, task, data, strategy, data_partitions=data_parts, module_partitions=module_parts)
    for layer in plain.tensors:
        torch.testing.assert_close(split[layer]["lambda"], plain[layer]["lambda"], rtol=1e-10, atol=1e-14)
    expected = fi.pairwise_scores(model, task, plain, queries, data, per_module=per_module, **QUIET)
    got = fi.pairwise_scores(model, task, split, queries, data, per_module=per_module, data_partitions=score_parts,
                             module_partitions=module_parts, **QUIET)
    expected_self = fi.self_scores(model, task, plain, data, **QUIET)
    got_self = fi.self_scores(model, task, split, data, data_partitions=score_parts, module_partitions=module_parts,
                              **QUIET)
    if per_module:
        assert got.keys() == expected.keys()
        for layer in expected:
            torch.testing.assert_close(got[layer], expected[layer], rtol=1e-9, atol=1e-12)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_self, expected_self, rtol=1e-9, atol=1e-12)


def test_stored_partitioned_scores_fill_cell_by_cell(tmp_path):
    model, data, task = float64(mlp()), classification_data(n=14), ClassificationTask()
    queries = Subset(data, range(3))
    factors = _fit(model, task, data)
    expected = fi.pairwise_scores(model, task, factors, queries, data, **QUIET)
    store = tmp_path / "scores"
    common = dict(store=store, data_partitions=3, **QUIET)
    assert fi.pairwise_scores(model, task, factors, queries, data, target_data_partitions=[2], **common) is None
    partial = read_scores(store, allow_partial=True)["all_modules"]  # partition 2 = examples 10..13 (size ceil(14/3)=5)
    torch.testing.assert_close(partial[:, 10:], expected[:, 10:])
    assert torch.isnan(partial[:, :10]).all()
    with pytest.raises(InfluenceError, match="incomplete"):
        read_scores(store)
    done = fi.pairwise_scores(model, task, factors, queries, data, **common)
    torch.testing.assert_close(done, expected)
    torch.testing.assert_close(read_scores(store)["all_modules"], expected)
    again = fi.pairwise_scores(model, task, factors, queries, data, **common)  # complete: read back, no recompute
    torch.testing.assert_close(again, expected)


def test_rerun_with_different_arguments_or_data_is_refused(tmp_path):
    model, data, task = float64(mlp()), classification_data(n=12), ClassificationTask()
    store = tmp_path / "f"
    _fit(model, task, data, "ekfac", store=store)
    with pytest.raises(InfluenceError, match=r"(?s)different arguments.*strategy: 'ekfac' \(stored\) vs 'kfac'.*overwrite=True"):
        _fit(model, task, data, "kfac", store=store)
    with pytest.raises(InfluenceError, match=r"(?s)data.size: 12 \(stored\) vs 8"):
        _fit(model, task, Subset(data, range(8)), "ekfac", store=store)
    with pytest.raises(InfluenceError, match="indices_sha256"):
        _fit(model, task, Subset(data, list(reversed(range(12)))), "ekfac", store=store)
    other_model = float64(mlp())
    with torch.no_grad():
        other_model[0].weight.add_(1.0)
    with pytest.raises(InfluenceError, match="model.values_sha256"):
        _fit(other_model, task, data, "ekfac", store=store)
    refit = _fit(model, task, data, "kfac", store=store, overwrite=True)
    assert refit.strategy == "kfac"

    factors = _fit(model, task, data)
    scores = tmp_path / "s"
    fi.pairwise_scores(model, task, factors, Subset(data, [0]), data, store=scores, **QUIET)
    with pytest.raises(InfluenceError, match=r"damping: None \(stored\) vs 0.5"):
        fi.pairwise_scores(model, task, factors, Subset(data, [0]), data, store=scores, damping=0.5, **QUIET)
    with pytest.raises(InfluenceError, match="query_data"):
        fi.pairwise_scores(model, task, factors, Subset(data, [1]), data, store=scores, **QUIET)
    with pytest.raises(InfluenceError, match="factors.values_sha256"):
        fi.pairwise_scores(model, task, _fit(model, task, data, "diagonal"), Subset(data, [0]), data, store=scores,
                           **QUIET)


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/b", "..", ".hidden", "", "x" * 200, "a\\b"])
def test_names_cannot_escape_the_output_directory(name, tmp_path):
    with pytest.raises(InfluenceError, match="not allowed"):
        check_name(name)
    with pytest.raises(InfluenceError):
        child(tmp_path, name)


def test_plain_names_are_accepted(tmp_path):
    assert child(tmp_path, "ekfac_run-2.v1") == (tmp_path / "ekfac_run-2.v1").resolve()


def test_concurrent_processes_fill_disjoint_cells_of_one_store(tmp_path):
    store = tmp_path / "pairwise"
    jobs = [subprocess.Popen([sys.executable, str(JOB), str(store), "pairwise", "--targets", targets])
            for targets in ("0,2,4", "1,3,5")]
    assert [job.wait(timeout=300) for job in jobs] == [0, 0]
    # every cell is there: this call only aggregates
    merged = store_job.run(str(store), "pairwise")
    expected = store_job.run(None, "pairwise")
    assert torch.equal(merged, expected)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pairwise", "factors"])
def test_sigkill_mid_run_loses_only_cells_in_progress(kind, tmp_path):
    store = tmp_path / kind
    job = subprocess.Popen([sys.executable, str(JOB), str(store), kind, "--slow", "0.15"])
    done = store / "_done"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill once two cells are complete, mid-way through the third
        finished = [p for p in done.glob("*-data*.json")] if done.exists() else []
        if len(finished) >= 2:
            break
        assert job.poll() is None, "the job ended before it could be killed"
        time.sleep(0.02)
    time.sleep(0.2)
    os.kill(job.pid, signal.SIGKILL)
    job.wait(timeout=30)
    survivors = {p.name: p.stat().st_mtime_ns for p in done.glob("*-data*.json")}
    assert 2 <= len(survivors) < 2 * store_job.PARTITIONS
    assert not (done / "complete.json").exists()

    resumed = store_job.run(str(store), kind)
    for name, mtime in survivors.items():  # finished cells were not recomputed
        assert (done / name).stat().st_mtime_ns == mtime
    uninterrupted = store_job.run(str(tmp_path / "uninterrupted"), kind)
    if kind == "factors":
        for layer in uninterrupted.tensors:
            for name, value in uninterrupted[layer].items():
                assert torch.equal(resumed[layer][name], value), (layer, name)
    else:
        assert torch.equal(resumed, uninterrupted)


@pytest.mark.parametrize("cell, name", [
    (Cell("covariance", 1, 0), "covariance-data1-modules0"), (Cell("pairwise", 3, 2), "pairwise-data3-modules2"),
    (Cell("self", 0, 0), "self-data0-modules0"), (Cell("index", 4, None), "index-data4"),
])
def test_cell_names_are_the_marker_names_stores_have_always_written(cell, name):
    assert cell.name == name == str(cell) and Cell.parse(name) == cell


@given(st.text(min_size=1), st.integers(0, 10 ** 6), st.one_of(st.none(), st.integers(0, 10 ** 6)))
def test_a_cell_is_read_back_from_its_name_whatever_its_pass_is_called(kind, data, module):
    assert Cell.parse(Cell(kind, data, module).name) == Cell(kind, data, module)


@pytest.mark.parametrize("name", ["complete", "pass-lambda", "lambda-data01-modules0", "lambda-data1-modules",
                                  "-data1-modules0", "lambda-datax"])
def test_other_marker_names_are_no_cells(name):
    assert Cell.parse(name) is None


def test_cell_grid_lists_module_partitions_then_data_partitions():
    assert [c.name for c in cell_grid("lambda", 2, 2)] == ["lambda-data0-modules0", "lambda-data1-modules0",
                                                         "lambda-data0-modules1", "lambda-data1-modules1"]
    assert [c.name for c in cell_grid("index", 2, None)] == ["index-data0", "index-data1"]
