"""One rank of a multi-process gloo run, started by test_distributed.py the way torchrun starts ranks
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment).

    python distributed_job.py OUT SCENARIO [STORE]

SCENARIO "all" fits factors and computes pairwise and self scores, with and without a store, with a plain
and a DistributedDataParallel model, and saves every result to OUT/rank<r>.pt. "fail-factors" fits factors
into STORE, and the rank named by FAIL_RANK raises on its second training batch.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).parent))

import fninfluence as fi  # noqa: E402
from models import ClassificationTask, classification_data, mlp  # noqa: E402

QUIET = dict(progress=False)
BATCH = 4


class FailingTask(ClassificationTask):
    """Raises on its second training batch in the rank named by FAIL_RANK (a rank that crashes mid-run)."""

    def __init__(self, modules=None):
        super().__init__(modules)
        self.batches = 0

    def compute_train_loss(self, batch, model, sample=False):
        self.batches += 1
        if str(dist.get_rank() if dist.is_initialized() else -1) == os.environ.get("FAIL_RANK") and self.batches == 3:
            raise RuntimeError("simulated crash of this rank")  # batch 1 is the discovery pass, 3 the second real one
        return super().compute_train_loss(batch, model, sample)


class FreezingTask(FailingTask):
    """Stops its own process (SIGSTOP) on its second training batch in the rank named by FAIL_RANK."""

    def compute_train_loss(self, batch, model, sample=False):
        if str(dist.get_rank()) == os.environ.get("FAIL_RANK") and self.batches == 2:
            os.kill(os.getpid(), signal.SIGSTOP)
        self.batches += 1
        return ClassificationTask.compute_train_loss(self, batch, model, sample)


class CountingTask(ClassificationTask):
    """Counts the measurement's differentiated calls (one per query batch; discovery runs without grad)."""

    measured = 0

    def compute_measurement(self, batch, model):
        self.measured += int(torch.is_grad_enabled())
        return super().compute_measurement(batch, model)


def workload():
    torch.manual_seed(0)  # the same weights in every process
    model = mlp(d_in=6, hidden=5, classes=3).double().eval()
    data = classification_data(n=30)
    return model, data, Subset(data, range(5))


def fit(model, task, data, strategy="ekfac", **kwargs):
    return fi.fit_factors(model, task, data, strategy=strategy, use_empirical_fisher=True, batch_size=BATCH, **QUIET,
                          **kwargs)


def flat(factors) -> dict:
    out = {f"{layer}/{name}": value for layer, tensors in factors.tensors.items() for name, value in tensors.items()}
    out["num_examples"] = torch.tensor(factors.num_examples)
    return out


def run_all(out: Path, store_root: Path) -> None:
    model, data, queries = workload()
    task = ClassificationTask()
    results = {}
    factors = fit(model, task, data)
    results.update({f"factors/{k}": v for k, v in flat(factors).items()})
    stored = fit(model, task, data, store=store_root / "factors")
    results.update({f"stored_factors/{k}": v for k, v in flat(stored).items()})
    cells = fit(model, task, data, strategy="kfac", data_partitions=3, module_partitions=2)
    results.update({f"kfac_cells/{k}": v for k, v in flat(cells).items()})

    counting = CountingTask()
    results["pairwise"] = fi.pairwise_scores(model, counting, factors, queries, data, batch_size=BATCH, **QUIET)
    results["query_batches_computed"] = torch.tensor(counting.measured)
    per_module = fi.pairwise_scores(model, task, factors, queries, data, batch_size=BATCH, per_module=True,
                                    store=store_root / "pairwise", **QUIET)
    results.update({f"stored_pairwise/{k}": v for k, v in per_module.items()})
    results["pairwise_modules"] = fi.pairwise_scores(model, task, factors, queries, data, batch_size=BATCH,
                                                     data_partitions=3, module_partitions=2, **QUIET)
    results["self"] = fi.self_scores(model, task, factors, data, batch_size=BATCH, **QUIET)
    results["stored_self"] = fi.self_scores(model, task, factors, data, batch_size=BATCH, store=store_root / "self",
                                            **QUIET)

    # a DistributedDataParallel model, its tracked modules named with DDP's "module." prefix
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    ddp_task = ClassificationTask(modules=["module.0", "module.2"])
    ddp_factors = fit(wrapped, ddp_task, data)
    results.update({f"ddp_factors/{k}": v for k, v in flat(ddp_factors).items()})
    results["ddp_pairwise"] = fi.pairwise_scores(wrapped, ddp_task, ddp_factors, queries, data, batch_size=BATCH,
                                                 **QUIET)
    results["compat_pairwise"] = kronfluence_api_scores(wrapped, ClassificationTask(modules=["0", "2"]), data, queries,
                                                        store_root / "compat")
    results["opt_out_self"] = fi.self_scores(model, task, factors, data, batch_size=BATCH, distributed=False, **QUIET)
    torch.save(results, out / f"rank{dist.get_rank()}.pt")


def kronfluence_api_scores(model, task, data, queries, output_dir: Path) -> torch.Tensor:
    """Pairwise scores through the Kronfluence-compatible Analyzer (two data partitions per pass)."""
    from fninfluence.compat.kronfluence import Analyzer, FactorArguments, ScoreArguments

    analyzer = Analyzer("distributed", model, task, cpu=True, output_dir=str(output_dir), disable_tqdm=True)
    analyzer.fit_all_factors("ekfac", data, per_device_batch_size=BATCH, factor_args=FactorArguments(
        strategy="ekfac", use_empirical_fisher=True, covariance_data_partitions=2, lambda_data_partitions=2))
    analyzer.compute_pairwise_scores("scores", "ekfac", queries, data, per_device_query_batch_size=BATCH,
                                     per_device_train_batch_size=BATCH, score_args=ScoreArguments(data_partitions=2))
    return analyzer.load_pairwise_scores("scores")["all_modules"]


class Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up, self.down = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


class Stack(torch.nn.Module):
    """An embedding, two residual MLP blocks and a head: sharded per block by fully_shard in the "fsdp" scenario."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(Block(d) for _ in range(2))
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class StackTask(fi.Task):
    def compute_train_loss(self, batch, model, sample=False):
        (ids,) = batch
        logits = model(ids)[:, :-1].flatten(0, 1)
        targets = ids[:, 1:].flatten()
        if sample:
            with torch.no_grad():
                targets = torch.multinomial(logits.detach().softmax(-1), 1).flatten()
        return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def tracked_modules(self):
        return ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down", "head"]


def fsdp_workload():
    """9 sequences: with two ranks and batches of 4, one rank has two batches (4 + 1) and the other one (4)."""
    torch.manual_seed(0)
    model = Stack().double().eval()
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randint(0, 11, (9, 5), generator=g))
    return model, data, Subset(data, range(3))


def fsdp_results(model, data, queries) -> dict:
    """Factors (true Fisher, EKFAC; KFAC in two module partitions), pairwise, per-token and self scores."""
    task, score = StackTask(), dict(batch_size=BATCH, **QUIET)
    factors = fi.fit_factors(model, task, data, strategy="ekfac", use_empirical_fisher=False, batch_size=BATCH, **QUIET)
    results = {f"factors/{k}": v for k, v in flat(factors).items()}
    kfac = fi.fit_factors(model, task, data, strategy="kfac", use_empirical_fisher=False, module_partitions=2,
                          batch_size=BATCH, **QUIET)
    results.update({f"kfac_modules/{k}": v for k, v in flat(kfac).items()})
    results["pairwise"] = fi.pairwise_scores(model, task, factors, queries, data, **score)
    results["per_token"] = fi.pairwise_scores(model, task, factors, queries, data, per_token=True, **score)
    results["self"] = fi.self_scores(model, task, factors, data, **score)
    results["self_measured"] = fi.self_scores(model, task, factors, data, use_measurement=True, **score)
    return results


def run_fsdp(out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, data, queries = fsdp_workload()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    shard = {name: p.to_local().clone() for name, p in model.named_parameters()}
    results = fsdp_results(model, data, queries)
    # the model is as it was: the same shards, no gradients, and a training step still works
    assert all(torch.equal(p.to_local(), shard[name]) and p.grad is None for name, p in model.named_parameters())
    StackTask().compute_train_loss(data[:4], model).backward()
    torch.save(results, out / f"rank{dist.get_rank()}.pt")


def run_failing(store: Path, task=None) -> None:
    model, data, _ = workload()
    fit(model, task or FailingTask(), data, store=store)


if __name__ == "__main__":
    out, scenario = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        if scenario == "all":
            run_all(out, Path(sys.argv[3]))
        elif scenario == "fsdp":
            run_fsdp(out)
        elif scenario == "freeze-factors":
            run_failing(Path(sys.argv[3]), FreezingTask())
        else:
            run_failing(Path(sys.argv[3]))
    finally:
        dist.destroy_process_group()
