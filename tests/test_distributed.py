"""torch.distributed data parallelism: two gloo ranks (separate processes, started the way torchrun starts
them) give the same factors and scores as one process, with and without a store, through the native and the
Kronfluence-compatible API; a crashed rank leaves a store that the next run completes; DDP models, FSDP and
DistributedSampler are handled; job arrays fill one store and missing_cells says what is left."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import fninfluence as fi
from fninfluence import InfluenceError
from fninfluence import distributed as parallel
from fninfluence.store.zarr_io import done_cells
import distributed_job as job

JOB = Path(__file__).with_name("distributed_job.py")
REPO = Path(__file__).resolve().parents[1]
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out: Path, scenario: str, store: Path, fail_rank=None, **env_vars):
    """Start WORLD ranks like torchrun does; return their processes."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(WORLD),
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               OMP_NUM_THREADS="1", **env_vars)
    if fail_rank is not None:
        env["FAIL_RANK"] = str(fail_rank)
    return [subprocess.Popen([sys.executable, str(JOB), str(out), scenario, str(store)],
                             env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stderr=subprocess.PIPE, text=True)
            for r in range(WORLD)]


def _launch(out: Path, scenario: str, store: Path, fail_rank=None):
    """Start WORLD ranks like torchrun does; return their (return code, stderr)."""
    ranks = _start(out, scenario, store, fail_rank)
    return [(p.wait(timeout=240), p.stderr.read()) for p in ranks]


def _flat(factors, prefix: str) -> dict:
    return {f"{prefix}/{k}": v for k, v in job.flat(factors).items()}


def _assert_same(got: dict, expected: dict, prefix: str) -> None:
    keys = sorted(k for k in expected if k.startswith(prefix))
    assert keys and keys == sorted(k for k in got if k.startswith(prefix)), prefix
    for key in keys:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    codes = _launch(tmp_path, "all", tmp_path / "stores")
    assert [c for c, _ in codes] == [0, 0], codes[0][1][-3000:] + codes[1][1][-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    # one process, the same cells (two data partitions: one per rank)
    model, data, queries = job.workload()
    task = job.ClassificationTask()
    factors = job.fit(model, task, data, data_partitions=2)
    kfac = job.fit(model, task, data, strategy="kfac", data_partitions=3, module_partitions=2)
    expected = {**_flat(factors, "factors"), **_flat(factors, "stored_factors"), **_flat(factors, "ddp_factors"),
                **_flat(kfac, "kfac_cells")}
    score = dict(batch_size=job.BATCH, **job.QUIET)
    expected["pairwise"] = fi.pairwise_scores(model, task, factors, queries, data, data_partitions=2, **score)
    expected["ddp_pairwise"] = expected["pairwise"]
    per_module = fi.pairwise_scores(model, task, factors, queries, data, data_partitions=2, per_module=True, **score)
    expected.update({f"stored_pairwise/{k}": v for k, v in per_module.items()})
    expected["pairwise_modules"] = fi.pairwise_scores(model, task, factors, queries, data, data_partitions=3,
                                                      module_partitions=2, **score)
    expected["self"] = fi.self_scores(model, task, factors, data, data_partitions=2, **score)
    expected["stored_self"] = expected["self"]
    expected["opt_out_self"] = fi.self_scores(model, task, factors, data, **score)  # distributed=False: all of it
    expected["compat_pairwise"] = job.kronfluence_api_scores(model, job.ClassificationTask(modules=["0", "2"]), data,
                                                             queries, tmp_path / "compat")

    # the 5 queries make 2 batches of 4: each rank computed one and received the other (plus two differentiated
    # calls of the measurement in discovery's exactness check, once per objective: autograd's weight gradients,
    # then the tap's sums)
    assert [int(got.pop("query_batches_computed")) for got in ranks] == [1 + 2, 1 + 2]
    for got in ranks:  # every rank returns the whole result, bit for bit the one-process one
        assert sorted(got) == sorted(expected)
        for prefix in ("factors/", "stored_factors/", "ddp_factors/", "kfac_cells/", "stored_pairwise/"):
            _assert_same(got, expected, prefix)
        for key in ("pairwise", "ddp_pairwise", "pairwise_modules", "self", "stored_self", "opt_out_self",
                    "compat_pairwise"):
            assert torch.equal(got[key], expected[key]), key
    assert int(ranks[0]["factors/num_examples"]) == factors.num_examples
    assert ranks[0]["pairwise"].shape == (5, 30) and ranks[0]["self"].shape == (30,)

    # and, up to rounding, the one-process run over a single partition
    whole = job.fit(model, task, data)
    for layer, tensors in whole.tensors.items():
        for name, value in tensors.items():
            torch.testing.assert_close(ranks[1][f"factors/{layer}/{name}"], value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ranks[1]["pairwise"], fi.pairwise_scores(model, task, whole, queries, data, **score),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_a_frozen_rank_is_named_by_the_others_after_the_rank_timeout(tmp_path):
    """Rank 1 stops itself (SIGSTOP) mid-pass; rank 0, waiting for it, fails naming it after
    FNINFLUENCE_RANK_TIMEOUT=5 s instead of gloo's timeout (60 s in this job, 30 minutes by default)."""
    healthy, frozen = _start(tmp_path, "freeze-factors", tmp_path / "factors", fail_rank=1,
                             FNINFLUENCE_RANK_TIMEOUT="5")
    try:
        code = healthy.wait(timeout=240)
        message = healthy.stderr.read()
    finally:
        frozen.kill()
        frozen.wait()
    # gloo's own timeout would fail with its own message; this one is the heartbeat's
    assert code != 0 and "rank 1 stopped answering" in message, message[-2000:]
    assert "FNINFLUENCE_RANK_TIMEOUT" in message


@pytest.mark.slow
def test_crashed_rank_leaves_a_store_that_the_next_run_completes(tmp_path):
    store = tmp_path / "factors"
    codes = _launch(tmp_path, "fail-factors", store, fail_rank=1)
    assert codes[1][0] != 0 and "simulated crash of this rank" in codes[1][1]
    assert codes[0][0] != 0  # the healthy rank stops too (its peer is gone), rather than hanging
    done = done_cells(store)
    assert "complete" not in done and "covariance-data1-modules0" not in done
    finished = {name: (store / "_done" / f"{name}.json").stat().st_mtime_ns for name in done if "-data" in name}

    # one process resumes the two-rank store (two data partitions, as the ranks used)
    model, data, _ = job.workload()
    task = job.ClassificationTask()
    resumed = job.fit(model, task, data, store=store, data_partitions=2)
    reference = job.fit(model, task, data, data_partitions=2)
    for layer, tensors in reference.tensors.items():
        for name, value in tensors.items():
            assert torch.equal(resumed[layer][name], value), (layer, name)
    assert "complete" in done_cells(store) and resumed.num_examples == 30
    for name, mtime in finished.items():  # the cell the healthy rank finished was not recomputed
        assert (store / "_done" / f"{name}.json").stat().st_mtime_ns == mtime


# -- in one process ------------------------------------------------------------------------------------

@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank in this process (enough to wrap a model in DDP)."""
    store = dist.FileStore(str(tmp_path / "rendezvous"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def test_ddp_model_and_prefixed_names_give_the_plain_model_results(one_rank_group):
    model, data, queries = job.workload()
    plain = job.fit(model, job.ClassificationTask(modules=["0", "2"]), data)
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    for names in (["module.0", "module.2"], ["0", "2"]):
        task = job.ClassificationTask(modules=names)
        factors = job.fit(wrapped, task, data)
        assert list(factors.layers) == ["0", "2"]
        for layer, tensors in plain.tensors.items():
            for name, value in tensors.items():
                assert torch.equal(factors[layer][name], value), (names, layer, name)
    assert parallel.ranks(None) is None  # one rank: nothing to spread
    scores = fi.self_scores(wrapped, job.ClassificationTask(modules=["module.2"]), plain, data, **job.QUIET)
    assert torch.equal(scores, fi.self_scores(model, job.ClassificationTask(modules=["2"]), plain, data, **job.QUIET))


@pytest.mark.slow
def test_fsdp_sharded_model_on_two_gloo_ranks_equals_one_process(tmp_path):
    """A model sharded by fully_shard (FSDP2) is analysed as it is, each rank holding half of every weight, with
    the data spread over the same ranks (uneven: one rank pads its last step): factors and scores equal a
    one-process run of the unsharded model over the same data partitions (two, one per rank)."""
    codes = _launch(tmp_path, "fsdp", tmp_path / "unused")
    assert [c for c, _ in codes] == [0, 0], codes[0][1][-3000:] + codes[1][1][-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    model, data, queries = job.fsdp_workload()
    task, score = job.StackTask(), dict(batch_size=job.BATCH, **job.QUIET)
    true_fisher = dict(use_empirical_fisher=False, data_partitions=2)  # as the ranks fit (sampled labels per example)
    factors = fi.fit_factors(model, task, data, strategy="ekfac", **true_fisher, **score)
    kfac = fi.fit_factors(model, task, data, strategy="kfac", module_partitions=2, **true_fisher, **score)
    expected = {**_flat(factors, "factors"), **_flat(kfac, "kfac_modules"),
                "pairwise": fi.pairwise_scores(model, task, factors, queries, data, data_partitions=2, **score),
                "per_token": fi.pairwise_scores(model, task, factors, queries, data, data_partitions=2,
                                                per_token=True, **score),
                "self": fi.self_scores(model, task, factors, data, data_partitions=2, **score),
                "self_measured": fi.self_scores(model, task, factors, data, data_partitions=2, use_measurement=True,
                                                **score)}
    for got in ranks:
        assert sorted(got) == sorted(expected)
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-13, msg=lambda m: f"{key}: {m}")


def test_fsdp2_model_on_one_rank_equals_the_plain_model_and_fsdp1_is_refused(one_rank_group):
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    model, data, queries = job.fsdp_workload()
    expected = job.fsdp_results(model, data, queries)
    sharded, _, _ = job.fsdp_workload()
    for block in sharded.blocks:
        fully_shard(block)
    fully_shard(sharded)
    got = job.fsdp_results(sharded, data, queries)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-13, msg=lambda m: f"{key}: {m}")
    with pytest.raises(InfluenceError, match="FSDP1.*fully_shard"):
        job.fit(FullyShardedDataParallel(job.workload()[0], device_id=torch.device("cpu")), job.ClassificationTask(),
                data)


def test_bad_settings_are_refused():
    _, data, _ = job.workload()
    with pytest.raises(InfluenceError, match="init_process_group"):
        parallel.ranks(True)
    with pytest.raises(InfluenceError, match="distributed must be"):
        parallel.ranks("yes")
    loader = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, num_replicas=2, rank=0))
    with pytest.raises(InfluenceError, match="DistributedSampler"):
        parallel.check_data(loader, "train_data")


def test_every_rank_gets_a_cell():
    group = parallel.Ranks(rank=1, world=4, device=torch.device("cpu"))
    assert parallel.enough_partitions(1, 1, group) == 4
    assert parallel.enough_partitions(1, 2, group) == 2
    assert parallel.enough_partitions(3, 2, group) == 3
    assert parallel.enough_partitions(1, 1, None) == 1
    assert group.mine(list(range(10))) == [1, 5, 9]


def test_job_array_cells_fill_one_store_and_missing_cells_says_what_is_left(tmp_path):
    model, data, queries = job.workload()
    task = job.ClassificationTask()
    factors = job.fit(model, task, data)
    score = dict(batch_size=job.BATCH, data_partitions=3, **job.QUIET)
    store = tmp_path / "scores"
    for task_id in (2, 0):  # two "array tasks" of three
        assert fi.self_scores(model, task, factors, data, store=store, target_data_partitions=[task_id], **score) is None
    assert parallel.missing_cells(store) == ["self-data1-modules0"]
    forged = store / "_done" / "self-data1-modules0.json"  # a marker written by hand certifies nothing
    forged.write_text('{"time": 0}')
    assert parallel.missing_cells(store) == ["self-data1-modules0"]
    forged.unlink()
    fi.self_scores(model, task, factors, data, store=store, target_data_partitions=[1], **score)
    assert parallel.missing_cells(store) == []
    merged = fi.self_scores(model, task, factors, data, store=store, **score)  # only aggregates
    assert torch.equal(merged, fi.self_scores(model, task, factors, data, **score))

    fit_store = tmp_path / "factors"
    assert job.fit(model, task, data, store=fit_store, data_partitions=2, target_data_partitions=[0]) is None
    assert parallel.missing_cells(fit_store) == ["covariance-data1-modules0", "lambda-data0-modules0",
                                                 "lambda-data1-modules0"]
