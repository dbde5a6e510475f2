"""Turning a Dataset or a DataLoader into an ordered stream of batches on the model's device."""

from __future__ import annotations

from typing import Any, Iterator, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, SubsetRandomSampler, WeightedRandomSampler
from torch.utils._pytree import tree_map

from .errors import InfluenceError

DEFAULT_BATCH_SIZE = 64
_RANDOM_SAMPLERS = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)

Data = Union[Dataset, DataLoader]


def as_loader(data: Data, batch_size: Optional[int], argument: str = "data") -> DataLoader:
    """A DataLoader that yields ``data`` in order. A shuffling loader is refused: scores are per index."""
    if isinstance(data, DataLoader):
        samplers = [data.sampler, getattr(data.batch_sampler, "sampler", None)]
        if any(isinstance(s, _RANDOM_SAMPLERS) for s in samplers):
            raise InfluenceError(
                f"{argument} is a DataLoader that shuffles or samples at random; influence scores are indexed by "
                "example, so the order must be fixed. Build it with shuffle=False (or pass the Dataset)."
            )
        if batch_size is not None and data.batch_size is not None and batch_size != data.batch_size:
            raise InfluenceError(
                f"{argument} is a DataLoader with batch_size={data.batch_size}, but batch_size={batch_size} was "
                "also given. Pass the Dataset with batch_size, or set the batch size on the DataLoader."
            )
        return data
    if isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise InfluenceError(f"batch_size must be a positive integer, got {batch_size!r}.")
        return DataLoader(data, batch_size=batch_size or DEFAULT_BATCH_SIZE, shuffle=False)
    raise InfluenceError(f"{argument} must be a torch Dataset or DataLoader, got {type(data).__name__}.")


def to_device(batch: Any, device: torch.device) -> Any:
    return tree_map(lambda x: x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x, batch)


def batches(data: Data, batch_size: Optional[int], device: torch.device, argument: str = "data") -> Iterator[Any]:
    for batch in as_loader(data, batch_size, argument):
        yield to_device(batch, device)


def num_batches(data: Data, batch_size: Optional[int], argument: str = "data") -> Optional[int]:
    try:
        return len(as_loader(data, batch_size, argument))
    except TypeError:
        return None
