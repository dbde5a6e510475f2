"""LDS of the damping chosen from data (``fninfluence.damping.choose_damping``, the stationarity criterion)
against the fixed heuristic (``damping=None``: 0.1 x mean eigenvalue per layer) and a sweep of fixed dampings.

    python -m benchmarks.lds_damping                    # both workloads (~2 minutes with a warm retraining cache)
    python -m benchmarks.lds_damping --workloads digits --subsets 50

The workloads, retrained subsets and cache are those of ``benchmarks/lds_options.py`` (imported from there):
EKFAC factors of the true Fisher (seed 0), 50 queries, the LDS over ``--subsets`` random halves. The sweep is
``fninfluence.damping.default_candidates`` (the heuristic and ``m x 10^k``, ``k = -4 .. 1`` in half decades, ``m`` the
mean of the layers' mean eigenvalues); its best row is the oracle in hindsight, which needs the retrainings.
``x pairwise``: the median time of ``choose_damping`` over the median time of one ``fi.pairwise_scores`` call.
Results: ``benchmarks/results/lds-damping-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path
from typing import Dict, List

import torch

import fninfluence as fi
from fninfluence.damping import choose_damping
from fninfluence.eval import lds_from_measurements, random_subsets, retrain_measurements

from .lds_options import BATCH_SIZE, DEFAULT_WORKLOADS, RESULTS, WORKLOADS, Workload, _fit, _timed


def _scores(w: Workload, factors, damping):
    return fi.pairwise_scores(w.model, w.task, factors, w.query_data, w.train_data, batch_size=BATCH_SIZE,
                              damping=damping, progress=False)


def measure(w: Workload, args) -> Dict:
    subsets = random_subsets(len(w.train_data), args.subsets, 0.5, seed=0)
    measurements = retrain_measurements(w.retrain, subsets, task=w.task, query_data=w.query_data,
                                        cache_dir=args.cache, cache_key=w.cache_key)
    factors = _fit(w, {})
    choose = lambda: choose_damping(w.model, w.task, factors, w.train_data, batch_size=BATCH_SIZE)  # noqa: E731
    _timed(lambda: _scores(w, factors, None), 2)  # warm-up
    _timed(choose, 2)
    _, pairwise_seconds = _timed(lambda: _scores(w, factors, None), args.repeats)
    choice, choose_seconds = _timed(choose, args.repeats)
    rows, per_query = [], {}
    for candidate, value in zip(choice.candidates, choice.values):
        lds = lds_from_measurements(_scores(w, factors, candidate), subsets, measurements)
        per_query[candidate] = lds.per_query
        rows.append({"damping": candidate, "criterion": value, "lds": lds.mean, "stderr": lds.stderr,
                     "chosen": candidate == choice.damping})
        label = "None (heuristic)" if candidate is None else f"{candidate:.3g}"
        print(f"{w.name:<9} {label:<18} criterion {value:10.4g}  LDS {lds.mean:.3f} ± {lds.stderr:.3f}"
              f"{'  <- chosen' if candidate == choice.damping else ''}", flush=True)
    heuristic = next(r for r in rows if r["damping"] is None)
    chosen = next(r for r in rows if r["chosen"])
    oracle = max(rows, key=lambda r: r["lds"])
    diff = (per_query[chosen["damping"]] - per_query[None]).double()
    diff = diff[~diff.isnan()]
    paired = {"mean": diff.mean().item(), "stderr": (diff.std() / len(diff) ** 0.5).item()}
    layer_heuristic = {layer: 0.1 * t["lambda"].double().mean().item() for layer, t in factors.tensors.items()}
    return {"workload": w.name, "train": len(w.train_data), "queries": len(w.query_data), "subsets": args.subsets,
            "heuristic_per_layer": layer_heuristic, "stationarity_estimate": choice.estimate,
            "heuristic": heuristic, "chosen": chosen, "oracle": oracle, "rows": rows,
            "chosen_minus_heuristic": paired,
            "pairwise_seconds": pairwise_seconds, "choose_seconds": choose_seconds,
            "choose_x_pairwise": choose_seconds / pairwise_seconds, "repeats": args.repeats}


def table(results: List[Dict]) -> str:
    lines = ["| workload | heuristic (None) | data-chosen (stationarity) | chosen − heuristic (paired) "
             "| best fixed in hindsight | choice × pairwise |", "|---|---|---|---|---|---|"]
    fmt = lambda r: ("None" if r["damping"] is None else f"{r['damping']:.3g}") + \
        f": {r['lds']:.3f} ± {r['stderr']:.3f}"  # noqa: E731
    for res in results:
        lines.append(f"| {res['workload']} | {fmt(res['heuristic'])} | {fmt(res['chosen'])} "
                     f"| {res['chosen_minus_heuristic']['mean']:+.3f} ± {res['chosen_minus_heuristic']['stderr']:.3f} "
                     f"| {fmt(res['oracle'])} "
                     f"| {res['choose_x_pairwise']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=DEFAULT_WORKLOADS, choices=list(WORKLOADS))
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "fninfluence-lds-cache"))
    parser.add_argument("--out", default=str(RESULTS / "lds-damping-cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = [measure(WORKLOADS[name](), args) for name in args.workloads]
    print("\n" + table(results) + "\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "machine": platform.processor() or platform.machine(),
                               "torch": torch.__version__, "command": "python -m benchmarks.lds_damping"},
                              indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
