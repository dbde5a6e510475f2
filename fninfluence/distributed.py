"""Data-parallel fitting and scoring under ``torchrun``: the names users and job scripts call (see
docs/distributed.md). The implementation, with the collectives that keep every route bit-identical to a
one-process run, is :mod:`fninfluence.run.ranks`."""

from .run.ranks import (RANK_TIMEOUT_VARIABLE, Heartbeat, Ranks, check_data, enough_partitions, missing_cells,
                        rank_timeout, ranks, sum_in_order, unwrap, wait)

__all__ = ["RANK_TIMEOUT_VARIABLE", "Heartbeat", "Ranks", "check_data", "enough_partitions", "missing_cells",
           "rank_timeout", "ranks", "sum_in_order", "unwrap", "wait"]
