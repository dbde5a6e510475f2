"""What the trust checks cost beside the work they guard, on the benchmark workloads (CPU, float32).

Per workload it times, in one process:

- ``covariance pass``: ``fit_factors(strategy="kfac", use_empirical_fisher=True)`` over the training set;
- ``data digests``: the per-example content digests a store records for that pass
  (``fninfluence.store.fingerprint.example_digests`` over the same batches);
- ``model hash``: ``fninfluence.store.fingerprint.model_fingerprint`` (every parameter and buffer);
- ``exactness check``: discovery's comparison of the tap's summed gradient with autograd's, once per
  objective (``ModelTap._check_exact`` on the first batch), beside one whole discovery.

    python -m benchmarks.trust_overhead [--size small|medium] [--repeats 3]

Times are the median of the repeats; ratios are what to read (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import statistics
import time


import fninfluence as fi
from fninfluence.capture import ModelTap
from fninfluence.run.data import as_loader
from fninfluence.store.fingerprint import example_digests, model_fingerprint

from .workloads import build

WORKLOADS = ("mlp", "cnn", "transformer", "gpt2")


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(name: str, size: str, repeats: int) -> dict:
    w = build(name, size)
    fit = lambda: fi.fit_factors(w.model, w.task, w.train, strategy="kfac", use_empirical_fisher=True,  # noqa: E731
                                 batch_size=w.batch_size, progress=False)
    fit()  # warm-up
    digests = lambda: [example_digests(batch) for batch in as_loader(w.train, w.batch_size)]  # noqa: E731
    first = next(iter(as_loader(w.train, w.batch_size)))

    def discovery():
        ModelTap(w.model, w.task).probes_for("train", first)

    engine = ModelTap(w.model, w.task)
    probes = engine.probes_for("train", first)
    return {
        "covariance pass": _median_seconds(fit, repeats),
        "data digests": _median_seconds(digests, repeats),
        "model hash": _median_seconds(lambda: model_fingerprint(w.model), repeats),
        "discovery": _median_seconds(discovery, repeats),
        "exactness check": _median_seconds(lambda: engine._check_exact("train", first, probes), repeats),
        "examples": len(w.train),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["small", "medium"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"| workload ({args.size}) | examples | covariance pass s | data digests s (ratio) | model hash s "
          "| discovery s | exactness check s (share of discovery) |")
    print("|---|---|---|---|---|---|---|")
    for name in WORKLOADS:
        r = measure(name, args.size, args.repeats)
        print(f"| {name} | {r['examples']} | {r['covariance pass']:.3f} | {r['data digests']:.4f} "
              f"({r['data digests'] / r['covariance pass']:.1%}) | {r['model hash']:.4f} | {r['discovery']:.3f} "
              f"| {r['exactness check']:.3f} ({r['exactness check'] / r['discovery']:.0%}) |", flush=True)


if __name__ == "__main__":
    main()
