"""A job that fills a store, run as a separate process by test_store.py (killed, or run concurrently).

    python store_job.py STORE KIND [--targets 0,2] [--slow SECONDS]

KIND is "factors" (EKFAC, 6 data partitions per pass) or "pairwise" (6 data partitions).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import fninfluence as fi  # noqa: E402
from models import ClassificationTask, classification_data, mlp  # noqa: E402

PARTITIONS = 6


class SlowTask(ClassificationTask):
    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    def compute_train_loss(self, batch, model, sample=False):
        time.sleep(self.delay)
        return super().compute_train_loss(batch, model, sample)


def workload():
    torch.manual_seed(0)  # the same weights in every process
    return mlp().double().eval(), classification_data(n=30)


def run(store: str, kind: str, targets=None, delay: float = 0.0):
    model, data = workload()
    task = SlowTask(delay)
    queries = torch.utils.data.Subset(data, range(4))
    if kind == "factors":
        return fi.fit_factors(model, task, data, strategy="ekfac", use_empirical_fisher=True, batch_size=2,
                              store=store, data_partitions=PARTITIONS, target_data_partitions=targets, progress=False)
    factors = fi.fit_factors(model, ClassificationTask(), data, strategy="ekfac", use_empirical_fisher=True,
                             progress=False)
    return fi.pairwise_scores(model, task, factors, queries, data, batch_size=2, store=store,
                              data_partitions=PARTITIONS, target_data_partitions=targets, progress=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("kind", choices=["factors", "pairwise"])
    parser.add_argument("--targets", default=None)
    parser.add_argument("--slow", type=float, default=0.0)
    args = parser.parse_args()
    targets = None if args.targets is None else [int(t) for t in args.targets.split(",")]
    run(args.store, args.kind, targets, args.slow)
    print("finished")
