"""Stores that must not lose, invent or mix data: overwrite, copies, damaged chunks, forged markers, stale locks,
other data or models, reruns that read nothing, and crafted metadata."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

import fninfluence as fi
from fninfluence import InfluenceError
from fninfluence.store import zarr_io
from fninfluence.store.scores_store import read_scores
from models import ClassificationTask, classification_data, float64, mlp

QUIET = dict(progress=False)
N, Q = 12, 3


def _fit(model, data, store=None, **kwargs):
    return fi.fit_factors(model, ClassificationTask(), data, strategy="ekfac", use_empirical_fisher=True, batch_size=4,
                          store=store, **QUIET, **kwargs)


def _pairwise(model, factors, queries, train, store=None, **kwargs):
    return fi.pairwise_scores(model, ClassificationTask(), factors, queries, train, batch_size=4, store=store, **QUIET,
                              **kwargs)


def _same_factors(a, b):
    assert a.tensors.keys() == b.tensors.keys()
    for layer in a.tensors:
        assert a[layer].keys() == b[layer].keys()
        for name, value in a[layer].items():
            torch.testing.assert_close(b[layer][name], value, rtol=1e-12, atol=1e-14, msg=f"{layer}/{name}")


@pytest.fixture
def workload():
    torch.manual_seed(0)
    return float64(mlp()), classification_data(n=N)


# -- A: overwrite never deletes what is not a store ---------------------------------------------------

def test_overwrite_refuses_to_delete_a_folder_that_is_not_a_store(workload, tmp_path):
    model, data = workload
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "train.py").write_text("print('my code')\n")
    (project / "paper.pdf").write_bytes(b"%PDF-1.4 ...")
    with pytest.raises(InfluenceError, match=r"(?s)not an fninfluence store.*left alone"):
        _fit(model, data, store=project, overwrite=True)
    factors = _fit(model, data)
    with pytest.raises(InfluenceError, match="not an fninfluence store"):
        factors.save(project, overwrite=True)
    assert (project / "src" / "train.py").read_text() == "print('my code')\n"
    assert (project / "paper.pdf").read_bytes() == b"%PDF-1.4 ..."
    # a real store is replaced
    _fit(model, data, store=tmp_path / "store")
    refit = _fit(model, data, store=tmp_path / "store", overwrite=True)
    _same_factors(factors, refit)
    factors.save(tmp_path / "saved")
    factors.save(tmp_path / "saved", overwrite=True)
    _same_factors(factors, fi.Factors.load(tmp_path / "saved"))


# -- A: a store copied without its hidden ready file keeps its data ---------------------------------

def test_a_store_copied_without_its_ready_file_is_not_reset(workload, tmp_path):
    model, data = workload
    queries = Subset(data, range(Q))
    expected = _fit(model, data, store=tmp_path / "f", data_partitions=2)
    factors = _fit(model, data)
    _same_factors(factors, expected)
    scores = _pairwise(model, factors, queries, data, store=tmp_path / "s", data_partitions=2)
    for name in ("f", "s"):
        shutil.copytree(tmp_path / name, tmp_path / f"{name}-copy", ignore=shutil.ignore_patterns(zarr_io._READY))
        assert not (tmp_path / f"{name}-copy" / zarr_io._READY).exists()
    markers = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "f-copy" / "_done").iterdir()}
    again = _fit(model, data, store=tmp_path / "f-copy", data_partitions=2)
    _same_factors(expected, again)
    redone = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "f-copy" / "_done").iterdir()}
    assert redone == markers  # no cell, pass or completion marker was rewritten
    assert torch.equal(_pairwise(model, factors, queries, data, store=tmp_path / "s-copy", data_partitions=2), scores)
    assert torch.equal(read_scores(tmp_path / "s-copy")["all_modules"], scores)


# -- A: damaged chunks are found, then recomputed by the rerun --------------------------------------

@pytest.mark.parametrize("damage", ["delete", "flip"])
def test_a_damaged_factor_chunk_is_reported_and_recomputed(workload, tmp_path, damage):
    model, data = workload
    store = tmp_path / "f"
    expected = _fit(model, data, store=store, data_partitions=2)
    chunk = next(p for p in sorted((store / "layers").rglob("*")) if p.is_file() and p.name != "zarr.json"
                 and "lambda" in str(p))
    if damage == "delete":
        chunk.unlink()
    else:
        raw = bytearray(chunk.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        chunk.write_bytes(bytes(raw))
    with pytest.raises(InfluenceError, match=r"(?s)damaged.*pass-lambda.*(missing|changed).*Rerun"):
        fi.Factors.load(store)
    _same_factors(expected, _fit(model, data, store=store, data_partitions=2))
    _same_factors(expected, fi.Factors.load(store))


def test_a_damaged_partial_state_of_an_unfinished_pass_is_recomputed(workload, tmp_path):
    model, data = workload
    store = tmp_path / "f"
    assert _fit(model, data, store=store, data_partitions=2, target_data_partitions=[0]) is None
    for chunk in (store / "passes" / "covariance").rglob("*"):
        if chunk.is_file() and chunk.name != "zarr.json":
            chunk.unlink()  # cell 0's partial sums are lost, its marker stays
    _same_factors(_fit(model, data), _fit(model, data, store=store, data_partitions=2))


@pytest.mark.parametrize("damage", ["delete", "flip"])
def test_a_damaged_scores_chunk_is_reported_and_recomputed(workload, tmp_path, damage):
    model, data = workload
    factors, queries, store = _fit(model, data), Subset(data, range(Q)), tmp_path / "s"
    expected = _pairwise(model, factors, queries, data, store=store, data_partitions=3)
    chunk = sorted(p for p in (store / "all_modules").rglob("*") if p.is_file() and p.name != "zarr.json")[1]
    if damage == "delete":
        chunk.unlink()
    else:
        raw = bytearray(chunk.read_bytes())
        raw[3] ^= 0xFF
        chunk.write_bytes(bytes(raw))
    with pytest.raises(InfluenceError, match="damaged"):
        read_scores(store)
    partial = read_scores(store, allow_partial=True)["all_modules"] if damage == "delete" else None
    if partial is not None:  # the damaged cell reads as missing, never as its fill value under a marker
        assert torch.isnan(partial[:, 4:8]).all() and torch.equal(partial[:, :4], expected[:, :4])
    assert torch.equal(_pairwise(model, factors, queries, data, store=store, data_partitions=3), expected)
    assert torch.equal(read_scores(store)["all_modules"], expected)


def test_a_forged_marker_is_not_merged(workload, tmp_path):
    model, data = workload
    store = tmp_path / "f"
    assert _fit(model, data, store=store, data_partitions=2, target_data_partitions=[0]) is None
    (store / "_done" / "covariance-data1-modules0.json").write_text(json.dumps({"time": 0, "examples": 6}))
    copied = json.loads((store / "_done" / "covariance-data0-modules0.json").read_text())
    (store / "_done" / "covariance-data1-modules0.json").write_text(json.dumps(copied))  # another cell's marker
    _same_factors(_fit(model, data), _fit(model, data, store=store, data_partitions=2))
    scores = tmp_path / "s"
    factors, queries = _fit(model, data), Subset(data, range(Q))
    assert _pairwise(model, factors, queries, data, store=scores, data_partitions=2, target_data_partitions=[0]) is None
    (scores / "_done" / "pairwise-data1-modules0.json").write_text("{}")
    (scores / "_done" / "complete.json").write_text("{}")
    with pytest.raises(InfluenceError, match="damaged"):
        read_scores(scores)
    assert torch.equal(_pairwise(model, factors, queries, data, store=scores, data_partitions=2),
                       _pairwise(model, factors, queries, data, data_partitions=2))


def test_a_lock_left_by_a_killed_process_is_broken(workload, tmp_path, monkeypatch):
    model, data = workload
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = tmp_path / "f"
    store.mkdir()
    (store / zarr_io._LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "time": 0}))
    monkeypatch.setattr(zarr_io, "LOCK_TIMEOUT_S", 5.0)  # the old code waited for this, then gave up
    started = time.monotonic()
    _same_factors(_fit(model, data), _fit(model, data, store=store))
    assert time.monotonic() - started < 4.0
    assert not (store / zarr_io._LOCK).exists()


def test_a_lock_of_a_live_process_is_waited_for(workload, tmp_path, monkeypatch):
    model, data = workload
    store = tmp_path / "f"
    store.mkdir()
    (store / zarr_io._LOCK).write_text(json.dumps(zarr_io._owner()))  # this very process: alive
    monkeypatch.setattr(zarr_io, "LOCK_TIMEOUT_S", 0.3)
    with pytest.raises(InfluenceError, match="live process"):
        _fit(model, data, store=store)


# -- B: a store refuses other data and other models ------------------------------------------------

def _other(data, seed=7):
    """The same size and shapes as ``data``, other values."""
    return classification_data(n=len(data), seed=seed)


def test_scores_refuse_other_query_or_training_data_in_another_partition(workload, tmp_path):
    model, data = workload
    factors, other = _fit(model, data), _other(data)
    store = tmp_path / "s"
    common = dict(store=store, data_partitions=2)
    assert _pairwise(model, factors, Subset(data, range(Q)), data, target_data_partitions=[0], **common) is None
    with pytest.raises(InfluenceError, match=r"(?s)read other query data than cell pairwise-data0-modules0.*overwrite"):
        _pairwise(model, factors, Subset(other, range(Q)), other, target_data_partitions=[1], **common)
    # the training data of one data partition, read by two module partitions
    store2 = tmp_path / "s2"
    common = dict(store=store2, data_partitions=2, module_partitions=2)
    assert _pairwise(model, factors, Subset(data, range(Q)), data, target_module_partitions=[0], **common) is None
    with pytest.raises(InfluenceError, match="read other training data"):
        _pairwise(model, factors, Subset(data, range(Q)), other, target_module_partitions=[1], **common)
    # the same data passes, and gives the unpartitioned scores
    done = _pairwise(model, factors, Subset(data, range(Q)), data, **common)
    torch.testing.assert_close(done, _pairwise(model, factors, Subset(data, range(Q)), data), rtol=1e-10, atol=1e-12)


def test_factors_refuse_a_lambda_pass_or_a_module_partition_on_other_data(workload, tmp_path):
    model, data = workload
    other = _other(data)
    store = tmp_path / "f"
    assert _fit(model, data, store=store, passes=["covariance"]).passes_done == ("covariance",)
    with pytest.raises(InfluenceError, match=r"(?s)cell lambda-data0-modules0 read other data than cell "
                                             r"covariance-data0-modules0.*example 0"):
        _fit(model, other, store=store)
    _same_factors(_fit(model, data), _fit(model, data, store=store))
    store2 = tmp_path / "f2"
    assert _fit(model, data, store=store2, module_partitions=2, target_module_partitions=[0]) is None
    with pytest.raises(InfluenceError, match="read other data"):
        _fit(model, other, store=store2, module_partitions=2, target_module_partitions=[1])
    # one changed example is named
    changed = TensorDataset(data.tensors[0].clone(), data.tensors[1].clone())
    changed.tensors[0][9, 2] += 1e-9
    with pytest.raises(InfluenceError, match="example 9 "):
        _fit(model, changed, store=store2, module_partitions=2, target_module_partitions=[1])


def test_a_model_with_one_changed_weight_is_refused_naming_it(tmp_path):
    torch.manual_seed(0)
    model = float64(mlp(hidden=700))  # 4200 weights in layer 0: more than a sample of 4096 would see
    data = classification_data(n=8)
    factors = _fit(model, data, store=tmp_path / "f")
    _pairwise(model, factors, Subset(data, range(2)), data, store=tmp_path / "s")
    with torch.no_grad():
        model[0].weight.view(-1)[4150] += 1e-6
    with pytest.raises(InfluenceError, match=r"(?s)model.*0\.weight"):
        _fit(model, data, store=tmp_path / "f")
    with pytest.raises(InfluenceError, match=r"(?s)model.*0\.weight"):
        _pairwise(model, factors, Subset(data, range(2)), data, store=tmp_path / "s")


# -- C: a rerun with a complete store reads no data ------------------------------------------------

class Counting(Dataset):
    """``data`` that counts the items read."""

    def __init__(self, data):
        self.data, self.reads = data, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.reads += 1
        return self.data[i]


def test_a_rerun_with_a_complete_store_reads_no_data(workload, tmp_path):
    model, data = workload
    train, queries = Counting(data), Counting(Subset(data, range(Q)))
    factors = _fit(model, train, store=tmp_path / "f", data_partitions=2)
    scores = _pairwise(model, factors, queries, train, store=tmp_path / "s", data_partitions=2)
    per_module = _pairwise(model, factors, queries, train, store=tmp_path / "m", per_module=True)
    self_influence = fi.self_scores(model, ClassificationTask(), factors, train, batch_size=4, store=tmp_path / "self",
                                    **QUIET)
    train.reads = queries.reads = 0
    _same_factors(factors, _fit(model, train, store=tmp_path / "f", data_partitions=2))
    assert torch.equal(_pairwise(model, factors, queries, train, store=tmp_path / "s", data_partitions=2), scores)
    again = _pairwise(model, factors, queries, train, store=tmp_path / "m", per_module=True)
    assert again.keys() == per_module.keys() and all(torch.equal(again[k], v) for k, v in per_module.items())
    assert torch.equal(fi.self_scores(model, ClassificationTask(), factors, train, batch_size=4,
                                      store=tmp_path / "self", **QUIET), self_influence)
    assert (train.reads, queries.reads) == (0, 0)
    # a rerun with other arguments still reads (a batch, to say what differs) and refuses
    with pytest.raises(InfluenceError, match="damping"):
        _pairwise(model, factors, queries, train, store=tmp_path / "s", data_partitions=2, damping=0.5)


def test_compat_reruns_with_complete_stores_read_no_data(tmp_path):
    from fninfluence.compat import kronfluence as compat

    task = ClassificationTask()
    torch.manual_seed(0)
    model = compat.prepare_model(float64(mlp()), task)
    analyzer = compat.Analyzer("a", model, task, cpu=True, disable_tqdm=True, output_dir=str(tmp_path))
    train = Counting(classification_data(n=32))
    queries = Counting(classification_data(n=8, seed=3))
    args = compat.FactorArguments(strategy="ekfac", use_empirical_fisher=True)
    analyzer.fit_all_factors("f", train, factor_args=args)
    scores = analyzer.compute_pairwise_scores("s", "f", queries, train, per_device_query_batch_size=4)
    train.reads = queries.reads = 0
    analyzer.fit_all_factors("f", train, factor_args=args)
    again = analyzer.compute_pairwise_scores("s", "f", queries, train, per_device_query_batch_size=4)
    assert torch.equal(again["all_modules"], scores["all_modules"])
    assert (train.reads, queries.reads) == (0, 0)


def test_a_damaged_index_cell_is_reported_and_rebuilt(workload, tmp_path):
    from fninfluence.index import build_index, index_scores
    from fninfluence.store.index_store import load_index

    model, data = workload
    task, store = ClassificationTask(), tmp_path / "index"
    common = dict(rank=None, dtype=torch.float64, batch_size=4, data_partitions=2, progress=False)
    build_index(model, task, data, store, **common)
    factors, queries = _fit(model, data), Subset(data, range(Q))
    expected = index_scores(model, task, factors, queries, store, progress=False)
    next(p for p in sorted((store / "g").rglob("*")) if p.is_file() and p.name != "zarr.json").unlink()
    with pytest.raises(InfluenceError, match=r"(?s)damaged.*index-data0.*missing.*build_index"):
        load_index(store)
    build_index(model, task, data, store, **common)
    assert torch.equal(index_scores(model, task, factors, queries, store, progress=False), expected)


def test_an_array_that_is_not_numbers_is_not_read(workload, tmp_path, monkeypatch):
    import pickle

    model, data = workload
    _fit(model, data).save(tmp_path / "f")
    meta = next((tmp_path / "f" / "layers").glob("*/lambda/zarr.json"))
    record = json.loads(meta.read_text())
    record.update(data_type="string", fill_value="", codecs=[{"name": "vlen-utf8", "configuration": {}}])
    meta.write_text(json.dumps(record))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("loading must not unpickle"))
    with pytest.raises(InfluenceError, match=r"(?s)stored as .* through codecs.*only\s+numbers"):
        fi.Factors.load(tmp_path / "f")
