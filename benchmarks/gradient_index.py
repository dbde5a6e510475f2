"""The training-gradient index against a fresh pairwise pass: speed for a second query set, disk size per
example, and accuracy as a function of rank.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.gradient_index --workload transformer --size medium

For each rank the index is built once (one pass over the training data), then a *second* query set is
scored twice: by :func:`fninfluence.pairwise_scores` (a forward and backward pass over the training set)
and by :func:`fninfluence.index.index_scores` (contractions against the stored gradients). Accuracy is
measured against the exact pairwise scores: relative Frobenius error, mean Spearman correlation per
query, and the overlap of the top-10 proponents.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def _size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _spearman_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    def ranks(x):
        return x.argsort(dim=1).argsort(dim=1).double()

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return ((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))).mean().item()


def _top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    top_a, top_b = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(top_a, top_b)) / (k * a.shape[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="transformer")
    parser.add_argument("--size", default="medium")
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import fninfluence
    from fninfluence.index import build_index, index_scores

    from benchmarks.workloads import build

    work = build(args.workload, args.size)
    options = dict(batch_size=work.batch_size, progress=False)
    factors = fninfluence.fit_factors(work.model, work.task, work.train, strategy="ekfac", **options)
    g = torch.Generator().manual_seed(7)
    second_queries = torch.utils.data.Subset(work.train, torch.randperm(len(work.train), generator=g)[:len(work.queries)].tolist())
    fninfluence.pairwise_scores(work.model, work.task, factors, work.queries, work.train, **options)  # warm-up
    started = time.perf_counter()
    exact = fninfluence.pairwise_scores(work.model, work.task, factors, second_queries, work.train, **options)
    pairwise_seconds = time.perf_counter() - started
    results = {"workload": args.workload, "size": args.size, "examples": len(work.train),
               "queries": len(second_queries), "pairwise_seconds": pairwise_seconds, "ranks": []}
    print(f"{args.workload}/{args.size}: N={len(work.train)}, Q={len(second_queries)}; pairwise_scores "
          f"{pairwise_seconds:.2f} s", flush=True)
    directory = Path(tempfile.mkdtemp())
    try:
        for rank in args.ranks:
            path = directory / f"rank{rank}"
            started = time.perf_counter()
            index = build_index(work.model, work.task, work.train, path, rank=rank, **options)
            build_seconds = time.perf_counter() - started
            index_scores(work.model, work.task, factors, work.queries, index, **options)  # warm-up
            started = time.perf_counter()
            approximate = index_scores(work.model, work.task, factors, second_queries, index, **options)
            score_seconds = time.perf_counter() - started
            residual = torch.stack([index.residuals(layer) for layer in index.layers]).mean().item()
            row = {
                "rank": rank,
                "widths": sorted({layer["width"] for layer in index.layers.values()}),
                "build_seconds": build_seconds,
                "index_scores_seconds": score_seconds,
                "speedup": pairwise_seconds / score_seconds,
                "bytes_per_example": _size_bytes(path) / len(work.train),
                "relative_error": ((approximate - exact).norm() / exact.norm()).item(),
                "spearman": _spearman_rows(approximate, exact),
                "top10_overlap": _top_overlap(approximate, exact),
                "mean_gradient_residual": residual,
            }
            results["ranks"].append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
