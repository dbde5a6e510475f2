"""The training-gradient index against a fresh pairwise pass: speed for a second query set, disk size per
example, accuracy as a function of rank, the build's cost against the partition size, and retrieval.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.gradient_index --workload transformer --size medium
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.gradient_index --workload cnn --size medium --ranks 8 --retrieval
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.gradient_index --workload digits --size cnn --ranks 8 --retrieval
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.gradient_index --build-scaling 2000 4000 8000

For each rank the index is built once (one pass over the training data), then a *second* query set is
scored twice: by :func:`fninfluence.pairwise_scores` (a forward and backward pass over the training set)
and by :func:`fninfluence.index.index_scores` (contractions against the stored gradients). Accuracy is
measured against the exact pairwise scores: relative Frobenius error, mean Spearman correlation per
query, and the overlap of the top-10 proponents.

``--retrieval`` adds :func:`fninfluence.index.top_influences`: recall@k of the approximate search (sketch
candidates, exact rerank) against the exact top k of the index's own scores, for proponents and opponents,
and the latency of one query: approximate (each backend), exact (a streamed read of the index),
``index_scores`` and ``pairwise_scores``, all with the IndexStore loaded and the sketch built (its build
time is reported apart).

``--workload digits --size mlp|cnn`` are small *trained* models on scikit-learn's digits (1500 training
images, 32 test queries), where influence is structured; the other workloads have random weights and
random data, where the top scores hardly stand out (the hard case for any approximate search).

``--build-scaling N ...`` builds a rank-8 index of the small CNN on N random images, in one data partition
and in 250-example partitions: the build time should grow linearly in N either way.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.lds_options import _timed  # (result, median seconds)


def _size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and "retrieval" not in p.parts)


def _spearman_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    def ranks(x):
        return x.argsort(dim=1).argsort(dim=1).double()

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return ((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))).mean().item()


def _overlap(found: torch.Tensor, expected: torch.Tensor) -> float:
    """Mean over rows of |found ∩ expected| / k."""
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(found, expected)) / expected.numel()


def _top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    return _overlap(a.topk(k, dim=1).indices, b.topk(k, dim=1).indices)


def _digits(kind: str):
    """A small model trained on scikit-learn's digits (the demo's data and training loop); ``cnn-large`` indexes
    13 jittered copies of each training digit (19,500 examples: shifted by up to a pixel, pixel noise 0.1) to
    measure latency at a larger N, the model trained on the originals."""
    from torch import nn
    from torch.utils.data import TensorDataset

    import fninfluence
    from fninfluence.demo import _load_digits, _train

    from benchmarks.workloads import Workload

    x, y = _load_digits()
    torch.manual_seed(0)
    copies = 1
    if kind == "cnn-large":
        kind, copies = "cnn", 13
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    elif kind == "cnn":
        x = x.view(-1, 1, 8, 8)
        model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    else:
        raise ValueError(f"Unknown digits model {kind!r}: choose mlp or cnn.")
    _train(model, x[:1500], y[:1500])
    task = fninfluence.classification_task()
    train_x, train_y = x[:1500], y[:1500]
    if copies > 1:
        g = torch.Generator().manual_seed(1)
        jittered = []
        for _ in range(copies - 1):
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()
            moved = torch.roll(x[:1500], shifts=shift, dims=(-2, -1))
            jittered.append(moved + 0.1 * torch.randn(moved.shape, generator=g))
        train_x, train_y = torch.cat([train_x] + jittered), y[:1500].repeat(copies)
    return Workload(f"digits-{kind}", model, model, task, task, TensorDataset(train_x, train_y),
                    TensorDataset(x[1500:1532], y[1500:1532]), 100)


def retrieval(work, factors, index, exact_scores: torch.Tensor, options, single: int = 8, dim: int = 512) -> dict:
    """Recall@k of the approximate search against the exact top k of ``exact_scores`` (the index's own scores
    of ``work.queries``), and single-query latencies."""
    import fninfluence
    from fninfluence.index import index_scores, top_influences
    from fninfluence.index.retrieval import index_sketch

    _, sketch_seconds = _timed(lambda: index_sketch(index, factors, dim, save=False))
    result = {"sketch_dim": dim, "sketch_seconds": sketch_seconds, "recall": [], "latency": {}}
    common = dict(sketch_dim=dim, batch_size=options["batch_size"])
    backends = ["torch"]
    try:
        import faiss  # noqa: F401
        backends += ["faiss", "faiss-hnsw"]
    except ImportError:
        pass
    n = exact_scores.shape[1]
    for k in (10, 100):
        if 4 * k > n:
            continue
        expected_up, expected_down = exact_scores.topk(k, 1).indices, (-exact_scores).topk(k, 1).indices
        for candidates in (k, 4 * k, 10 * k):
            if 2 * candidates >= n:
                continue
            for backend in (backends if candidates == 4 * k else ["torch"]):
                found = top_influences(work.model, work.task, factors, work.queries, index, k=k, candidates=candidates,
                                       backend=backend, **common)
                result["recall"].append({"k": k, "candidates": candidates, "backend": backend,
                                         "proponents": _overlap(found.proponents, expected_up),
                                         "opponents": _overlap(found.opponents, expected_down)})
                print(json.dumps(result["recall"][-1]), flush=True)
    one = [torch.utils.data.Subset(work.queries, [i]) for i in range(min(single, len(work.queries)))]

    def each(fn):
        fn(one[0])  # warm-up
        return statistics.median(_timed(lambda: fn(q))[1] for q in one)

    from fninfluence.index import prepared_queries

    result["latency"]["query gradient alone"] = each(
        lambda q: prepared_queries(work.model, work.task, factors, q, index, None, options["batch_size"], False, False,
                                   None))
    for backend in backends:
        result["latency"][f"approximate ({backend}), k=10"] = each(
            lambda q: top_influences(work.model, work.task, factors, q, index, k=10, backend=backend, **common))
    result["latency"]["exact top_influences, k=10"] = each(
        lambda q: top_influences(work.model, work.task, factors, q, index, k=10, approximate=False, **common))
    result["latency"]["index_scores"] = each(lambda q: index_scores(work.model, work.task, factors, q, index, **options))
    index.load_into_memory()
    result["latency"]["approximate (torch), k=10, index in memory"] = each(
        lambda q: top_influences(work.model, work.task, factors, q, index, k=10, backend="torch", **common))
    result["latency"]["exact top_influences, k=10, index in memory"] = each(
        lambda q: top_influences(work.model, work.task, factors, q, index, k=10, approximate=False, **common))
    started = time.perf_counter()
    fninfluence.pairwise_scores(work.model, work.task, factors, one[0], work.train, **options)
    result["latency"]["pairwise_scores"] = time.perf_counter() - started
    print(json.dumps(result["latency"]), flush=True)
    return result


def build_scaling(sizes, rank: int = 8, partition: int = 250) -> list:
    """Build time of a rank-``rank`` index of the small CNN against the number of examples, in one data partition
    and in ``partition``-example partitions."""
    from benchmarks.workloads import CNN, ClassificationTask, _images
    from fninfluence.index import build_index

    torch.manual_seed(0)
    model, task = CNN(16).eval(), ClassificationTask()
    directory = Path(tempfile.mkdtemp())
    rows = []
    try:
        build_index(model, task, _images(200, 16, 3), directory / "warm-up", rank=rank, batch_size=50, progress=False)
        for n in sizes:
            data = _images(n, 16, 1)
            for partitions in (1, max(1, n // partition)):
                path = directory / f"{n}-{partitions}"
                _, seconds = _timed(lambda: build_index(model, task, data, path, rank=rank, batch_size=50,
                                                        data_partitions=partitions, progress=False))
                rows.append({"examples": n, "partitions": partitions, "build_seconds": seconds})
                print(json.dumps(rows[-1]), flush=True)
                shutil.rmtree(path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="transformer")
    parser.add_argument("--size", default="medium")
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1,
                        help="time pairwise_scores and index_scores this many times each (median; on a shared machine)")
    parser.add_argument("--retrieval", nargs="*", type=int, default=None, metavar="RANK",
                        help="also measure top_influences (recall, latency), at these ranks (none named: every rank)")
    parser.add_argument("--build-scaling", nargs="+", type=int, metavar="N",
                        help="only measure the build time on N examples (one partition and 250-example partitions)")
    parser.add_argument("--empirical-fisher", action="store_true",
                        help="fit the factors with the empirical Fisher (fit_factors' default since 0.2); without it "
                             "the true Fisher, as the committed results were measured")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.build_scaling:
        results = {"build_scaling": build_scaling(args.build_scaling)}
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
        return 0

    import fninfluence
    from fninfluence.index import build_index, index_scores

    from benchmarks.workloads import build

    work = _digits(args.size) if args.workload == "digits" else build(args.workload, args.size)
    options = dict(batch_size=work.batch_size, progress=False)
    factors = fninfluence.fit_factors(work.model, work.task, work.train, strategy="ekfac",
                                      use_empirical_fisher=args.empirical_fisher, **options)
    g = torch.Generator().manual_seed(7)
    second_queries = torch.utils.data.Subset(work.train, torch.randperm(len(work.train), generator=g)[:len(work.queries)].tolist())
    fninfluence.pairwise_scores(work.model, work.task, factors, work.queries, work.train, **options)  # warm-up
    exact, pairwise_seconds = _timed(lambda: fninfluence.pairwise_scores(work.model, work.task, factors, second_queries,
                                                                          work.train, **options), args.repeats)
    results = {"workload": args.workload, "size": args.size, "empirical_fisher": args.empirical_fisher,
               "examples": len(work.train),
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
            approximate, score_seconds = _timed(lambda: index_scores(work.model, work.task, factors, second_queries, index,
                                                                     **options), args.repeats)
            residual = torch.stack([index.residuals(layer) for layer in index.layers]).mean().item()
            row = {
                "rank": rank,
                "widths": sorted({layer["width"] for layer in index.layers.values()}),
                "forms": {name: layer.get("form", "factored") for name, layer in index.layers.items()},
                "chunk_rows": getattr(index, "chunk_rows", None),
                "build_seconds": build_seconds,
                "index_scores_seconds": score_seconds,
                "speedup": pairwise_seconds / score_seconds,
                "bytes_per_example": _size_bytes(path) / len(work.train),
                "relative_error": ((approximate - exact).norm() / exact.norm()).item(),
                "spearman": _spearman_rows(approximate, exact),
                "top10_overlap": _top_overlap(approximate, exact),
                "mean_gradient_residual": residual,
            }
            print(json.dumps(row), flush=True)
            if args.retrieval is not None and (not args.retrieval or rank in args.retrieval):
                own = index_scores(work.model, work.task, factors, work.queries, index, **options)
                row["retrieval"] = retrieval(work, factors, index, own, options)
            results["ranks"].append(row)
            shutil.rmtree(path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
