"""How much the true Fisher's sampled labels move the scores, and what ``fit_factors(fisher_samples=S)`` buys.

    python -m benchmarks.fisher_samples                      # the table of docs/concepts.md (~4 minutes, 2 cores)
    python -m benchmarks.fisher_samples --seeds 2 --subsets 20 --draws 1 2   # a quick look

The workload is the LDS protocol of ``docs/examples/lds_digits.py`` (loaded from that file): an MLP 64-32-10
trained on 500 scikit-learn digits, 50 test images as queries, LDS over ``--subsets`` retrained halves. For each
estimator (EKFAC, KFAC, diagonal) and number of draws S, the factors are fitted with the true Fisher under
``--seeds`` seeds (0, 1, ...), the pairwise scores ``[50, 500]`` computed, and reported:

- ``top10``: the overlap of the top-10 proponents of a query between two seeds, averaged over queries and over
  every pair of seeds (1: the seed does not matter);
- ``change``: ``||scores_a - scores_b||_F / ||scores_b||_F`` between two seeds, averaged over the pairs;
- ``top10_ref``: the top-10 overlap with the scores of a fit with ``--reference-draws`` draws (seed 1000), a
  stand-in for the noise-free true Fisher, averaged over the seeds;
- ``lds``: the LDS (mean over queries), averaged over the seeds, with the spread (max - min) over the seeds;
- ``fit_x`` and ``total_x``: the wall time of the fit, and of the fit plus the pairwise scores of the 50 queries,
  relative to S = 1's (``fit_s``, ``total_s``: seconds), on the training set tiled ``--timing-copies`` times
  (8000 examples by default: on 500 the fixed costs of a call hide the passes), median of ``--repeats`` runs.

The empirical Fisher (``use_empirical_fisher=True``, deterministic) is reported on the same rows for comparison,
and so is the change of the S = 1 EKFAC scores between batch sizes 50 and 64 (the draws are keyed per example,
so it should be rounding only). Results go to ``benchmarks/results/fisher-samples-digits-cpu.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Dict, List

import torch
from torch.utils.data import TensorDataset

import fninfluence as fi
from fninfluence.eval import lds_from_measurements, random_subsets, retrain_measurements

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "lds_digits.py"
RESULTS = Path(__file__).resolve().parent / "results" / "fisher-samples-digits-cpu.json"
BATCH_SIZE = 100


def _protocol():
    """The module ``docs/examples/lds_digits.py`` (its data split, model and retraining), without running it."""
    spec = importlib.util.spec_from_file_location("lds_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """Mean over queries (rows) of ``|top-k(a) & top-k(b)| / k`` (proponents: the largest scores)."""
    top_a, top_b = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(top_a, top_b)) / (k * a.shape[0])


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class Bench:
    """The trained model, the data, the task and the retrained measurements the rows share."""

    def __init__(self, protocol, subsets: int):
        self.train_data, self.query_data = protocol.digits()
        self.model = protocol.train(self.train_data, torch.arange(protocol.TRAIN))
        self.task = fi.classification_task()
        self.subsets = random_subsets(protocol.TRAIN, subsets, 0.5, seed=0)
        started = time.perf_counter()
        self.measurements = retrain_measurements(lambda indices: protocol.train(self.train_data, indices),
                                                 self.subsets, task=self.task, query_data=self.query_data)
        self.retrain_seconds = time.perf_counter() - started

    def scores(self, strategy: str, batch_size: int = BATCH_SIZE, train=None, **options):
        """``(scores, fit seconds, fit and scores seconds)`` of one fit on ``train`` (default: the training set)."""
        train = self.train_data if train is None else train
        started = time.perf_counter()
        factors = fi.fit_factors(self.model, self.task, train, strategy=strategy, batch_size=batch_size,
                                 progress=False, **options)
        fitted = time.perf_counter()
        scores = fi.pairwise_scores(self.model, self.task, factors, self.query_data, train, batch_size=batch_size,
                                    progress=False)
        return scores, fitted - started, time.perf_counter() - started

    def timing(self, strategy: str, copies: int, repeats: int, **options) -> Dict[str, float]:
        """Median seconds of the fit and of the fit plus scores on the training set tiled ``copies`` times."""
        tiled = TensorDataset(*(t.repeat(copies, *([1] * (t.dim() - 1))) for t in self.train_data.tensors))
        runs = [self.scores(strategy, train=tiled, **options)[1:] for _ in range(repeats)]
        return {"fit": statistics.median(r[0] for r in runs), "total": statistics.median(r[1] for r in runs)}

    def lds(self, scores: torch.Tensor) -> float:
        return lds_from_measurements(scores, self.subsets, self.measurements).mean


def row(bench: Bench, strategy: str, label, runs: List[tuple], reference: torch.Tensor) -> Dict:
    """The numbers of one (strategy, draws) row from its runs ``[(scores, seconds)]``, one per seed."""
    scores = [run[0] for run in runs]
    pairs = list(itertools.combinations(scores, 2)) or [(scores[0], scores[0])]
    lds = [bench.lds(s) for s in scores]
    return {
        "strategy": strategy, "fisher_samples": label, "seeds": len(runs),
        "top10": statistics.mean(top_overlap(a, b) for a, b in pairs),
        "change": statistics.mean(relative_change(a, b) for a, b in pairs),
        "top10_ref": statistics.mean(top_overlap(s, reference) for s in scores),
        "lds": statistics.mean(lds), "lds_spread": max(lds) - min(lds),
    }


def measure(args) -> Dict:
    protocol = _protocol()
    torch.set_num_threads(1)  # tiny matrices: threads cost more than they give (and the machine is shared)
    bench = Bench(protocol, args.subsets)
    rows = []
    for strategy in args.strategies:
        true_fisher = {"use_empirical_fisher": False}  # the rows S = 1, 2, ... (the library's default is empirical)
        reference = bench.scores(strategy, seed=1000, fisher_samples=args.reference_draws, **true_fisher)[0]
        bench.timing(strategy, 1, 1, **true_fisher)  # warm-up
        variants = [(draws, {"fisher_samples": draws, **true_fisher}) for draws in args.draws]
        ours = []
        for label, options in variants + [("empirical", {"use_empirical_fisher": True})]:
            seeds = range(args.seeds) if label != "empirical" else range(2)  # deterministic: two runs suffice
            runs = [bench.scores(strategy, seed=seed, **options) for seed in seeds]
            timed = bench.timing(strategy, args.timing_copies, args.repeats, **options)
            ours.append({**row(bench, strategy, label, runs, reference), "fit_s": timed["fit"],
                         "total_s": timed["total"]})
        single = next((r for r in ours if r["fisher_samples"] == 1), ours[0])
        for r in ours:
            r.update(fit_x=r["fit_s"] / single["fit_s"], total_x=r["total_s"] / single["total_s"])
            print(_line(r), flush=True)
        rows += ours
    batch_50 = bench.scores("ekfac", batch_size=50)[0]
    batch_64 = bench.scores("ekfac", batch_size=64)[0]
    return {
        "workload": f"digits MLP 64-32-10, {protocol.TRAIN} train, {protocol.QUERIES} queries "
                    f"(docs/examples/lds_digits.py), batch {BATCH_SIZE}",
        "subsets": args.subsets, "seeds": args.seeds, "reference_draws": args.reference_draws,
        "timing_examples": args.timing_copies * protocol.TRAIN, "repeats": args.repeats,
        "retrain_seconds": bench.retrain_seconds, "rows": rows,
        "ekfac_batch_50_vs_64_change": relative_change(batch_50, batch_64),
        "torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
    }


def _line(r: Dict) -> str:
    return (f"{r['strategy']:<9} S={r['fisher_samples']!s:<9} top10 {r['top10']:.3f}  change {r['change']:.4f}  "
            f"top10_ref {r['top10_ref']:.3f}  LDS {r['lds']:.4f} (spread {r['lds_spread']:.4f})  "
            f"fit {r['fit_x']:.2f}x  fit + scores {r['total_x']:.2f}x")


def table(result: Dict) -> str:
    """The markdown table of docs/concepts.md."""
    lines = ["| estimator | fisher_samples | top-10 overlap, two seeds | score change, two seeds | "
             f"top-10 overlap with S={result['reference_draws']} | LDS (spread over seeds) | fit time | "
             "fit + scores time |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['strategy']} | {r['fisher_samples']} | {r['top10']:.2f} | {100 * r['change']:.0f} % | "
                     f"{r['top10_ref']:.2f} | {r['lds']:.3f} ({r['lds_spread']:.3f}) | {r['fit_x']:.1f}x | "
                     f"{r['total_x']:.1f}x |")
    return "\n".join(lines)


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=["ekfac", "kfac", "diagonal"])
    parser.add_argument("--draws", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--reference-draws", type=int, default=64)
    parser.add_argument("--timing-copies", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    result = measure(args)
    print()
    print(table(result))
    print(f"\nEKFAC, S=1: scores change {result['ekfac_batch_50_vs_64_change']:.2e} between batch sizes 50 and 64.")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
