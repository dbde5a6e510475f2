"""Slices of the user's data: its length, a contiguous range of its examples, its first batch."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Subset

from .data import Data, batches
from ..errors import InfluenceError


def length(data: Data, argument: str) -> int:
    """The number of examples of ``data``, or an error naming the argument when it has no length."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if not hasattr(dataset, "__len__"):
        raise InfluenceError(f"{argument} has no length; partitions, max_examples and stores need a sized Dataset.")
    return len(dataset)


def subset(data: Data, indices: range) -> Data:
    """The examples ``indices`` of ``data``, keeping a DataLoader's batching and collation."""
    if isinstance(data, DataLoader):
        settings = {name: getattr(data, name) for name in (
            "batch_size", "collate_fn", "num_workers", "pin_memory", "drop_last", "timeout", "worker_init_fn",
            "generator", "persistent_workers", "pin_memory_device", "multiprocessing_context")}
        if data.num_workers > 0:
            settings["prefetch_factor"] = data.prefetch_factor
        return DataLoader(Subset(data.dataset, indices), **settings)
    return Subset(data, indices)


def first_batch(data: Data, batch_size: Optional[int], device: torch.device, argument: str) -> Any:
    """The first batch of ``data`` on ``device``; an empty ``data`` is an error."""
    first = next(iter(batches(data, batch_size, device, argument)), None)
    if first is None:
        raise InfluenceError(f"{argument} is empty: there is nothing to compute on.")
    return first
