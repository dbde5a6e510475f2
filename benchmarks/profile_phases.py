"""Where fninfluence's time goes: a torch.profiler table of one phase of a benchmark workload.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/profile_phases.py cnn --phase fit --examples 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=("mlp", "cnn", "transformer", "gpt2"))
    parser.add_argument("--size", default="medium")
    parser.add_argument("--phase", choices=("fit", "pairwise", "self"), default="fit")
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import fninfluence
    from benchmarks.workloads import build

    work = build(args.workload, args.size)
    train = Subset(work.train, range(min(args.examples, len(work.train))))
    options = dict(batch_size=work.batch_size, progress=False)
    fit = dict(strategy="ekfac", use_empirical_fisher=False)  # the true Fisher, as benchmarks.run compares
    factors = fninfluence.fit_factors(work.model, work.task, train, **fit, **options)  # also a warm-up
    run = {
        "fit": lambda: fninfluence.fit_factors(work.model, work.task, train, **fit, **options),
        "pairwise": lambda: fninfluence.pairwise_scores(work.model, work.task, factors, work.queries, train, **options),
        "self": lambda: fninfluence.self_scores(work.model, work.task, factors, train, **options),
    }[args.phase]
    with torch.profiler.profile() as profile:
        run()
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
