"""One rank of a two-process gloo run for test_sampling.py: a true-Fisher fit, saved to OUT/rank<r>.pt.

    python sampling_job.py OUT
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

import fninfluence as fi  # noqa: E402
from models import ClassificationTask, classification_data, mlp  # noqa: E402


def fit_true_fisher(**kwargs) -> fi.Factors:
    torch.manual_seed(0)  # the same weights in every process
    model = mlp(d_in=6, hidden=5, classes=3).double().eval()
    return fi.fit_factors(model, ClassificationTask(), classification_data(n=18), batch_size=4, progress=False,
                          data_partitions=2, seed=3, use_empirical_fisher=False, **kwargs)


if __name__ == "__main__":
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(100 + dist.get_rank())  # each rank's global generator elsewhere: it must not matter
    factors = fit_true_fisher()
    torch.save(factors.tensors, Path(sys.argv[1]) / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
