"""Wall time and agreement of 1 vs 2 data-parallel ranks (torchrun, gloo, CPU).

    python benchmarks/distributed_scaling.py [--examples 4096] [--threads 1]

Runs the same EKFAC fit, pairwise and self scores as one process and as two ranks started by torchrun,
each rank with ``--threads`` intra-op threads, and prints the wall time of each phase (rank 0, between
barriers) and the largest difference between the two runs. The one-process run uses as many data
partitions as there are ranks, so the two should agree bit for bit; the difference to a one-process run
over a single partition is printed too (rounding only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Subset, TensorDataset


def workload(examples: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)).eval()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(examples, 64, generator=g), torch.randint(0, 10, (examples,), generator=g))
    return model, data, Subset(data, range(64))


def worker(out: Path, examples: int, threads: int, partitions: int) -> None:
    import fninfluence as fi

    import torch._dynamo  # noqa: F401  (torch.func imports it on first use: seconds, once per process; not timed)

    torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    model, data, queries = workload(examples)
    task = fi.classification_task()
    common = dict(batch_size=256, progress=False, data_partitions=partitions)

    cpu = {}

    def timed(fn, phase):
        """``fn()`` and its wall time between barriers; ``cpu[phase]``: CPU seconds of the busiest rank."""
        if world > 1:
            dist.barrier()
        started, started_cpu = time.perf_counter(), time.process_time()
        result = fn()
        spent = torch.tensor([time.process_time() - started_cpu], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(spent, op=dist.ReduceOp.MAX)
        cpu[phase] = float(spent)
        return result, time.perf_counter() - started

    factors, fit_s = timed(lambda: fi.fit_factors(model, task, data, strategy="ekfac", use_empirical_fisher=True,
                                                  **common), "fit")
    pairwise, pairwise_s = timed(lambda: fi.pairwise_scores(model, task, factors, queries, data, **common), "pairwise")
    self_influence, self_s = timed(lambda: fi.self_scores(model, task, factors, data, **common), "self")
    if world == 1 or dist.get_rank() == 0:
        torch.save({"pairwise": pairwise, "self": self_influence,
                    **{f"{layer}/{name}": v for layer, t in factors.tensors.items() for name, v in t.items()}},
                   out / "results.pt")
        (out / "times.json").write_text(json.dumps({"fit": fit_s, "pairwise": pairwise_s, "self": self_s,
                                                    **{f"{k} cpu": v for k, v in cpu.items()}}))
    if world > 1:
        dist.destroy_process_group()


def launch(ranks: int, out: Path, examples: int, threads: int, partitions: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    script = [str(Path(__file__).resolve()), "--worker", str(out), "--examples", str(examples), "--threads",
              str(threads), "--partitions", str(partitions)]
    command = [sys.executable] + script if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] + script
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    times = json.loads((out / "times.json").read_text())
    times["process"] = time.perf_counter() - started
    return times


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def max_relative(a: dict, b: dict, keys) -> float:
    """max |a - b| / max |b| over the entries ``keys``."""
    return max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-30))
               for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", default=None)
    parser.add_argument("--examples", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--partitions", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.examples, args.threads, args.partitions)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        one = launch(1, root / "one", args.examples, args.threads, 2)
        two = launch(2, root / "two", args.examples, args.threads, 1)  # raised to 2 partitions, one per rank
        launch(1, root / "single", args.examples, args.threads, 1)  # one partition: agreement up to rounding
        load = lambda name: torch.load(root / name / "results.pt", weights_only=True)  # noqa: E731
        two_ranks, single_partition = load("two"), load("single")
        same_cells = max_difference(two_ranks, load("one"))
        factor_keys = [k for k in two_ranks if "/" in k and "eigenvectors" not in k]  # signs are arbitrary
        drift = {what: max_relative(two_ranks, single_partition, keys) for what, keys in
                 (("pairwise", ["pairwise"]), ("self", ["self"]), ("factors", factor_keys))}
    print(f"{args.examples} training examples, 64 queries, MLP 64-256-256-10 (float32), EKFAC, "
          f"{args.threads} thread(s) per rank, gloo on CPU")
    print("wall: seconds between barriers (process: the whole launch, with imports and torchrun); cpu: CPU seconds "
          "of the busiest rank, which is what scales when the cores are not shared with other work")
    print(f"{'phase':<14}{'1 rank (s)':>12}{'2 ranks (s)':>13}{'speed-up':>10}")
    for phase in ("fit", "pairwise", "self", "fit cpu", "pairwise cpu", "self cpu", "process"):
        print(f"{phase:<14}{one[phase]:>12.2f}{two[phase]:>13.2f}{one[phase] / two[phase]:>10.2f}")
    print(f"max |2 ranks - 1 rank, same 2 partitions| = {same_cells:.3g}")
    print("max |difference| / max |value| to 1 rank over 1 partition (rounding): "
          + ", ".join(f"{what} {value:.2g}" for what, value in drift.items()))
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
