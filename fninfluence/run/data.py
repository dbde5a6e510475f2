"""Turning a Dataset or a DataLoader into an ordered stream of batches on the model's device."""

from __future__ import annotations

from typing import Any, Iterator, Optional, Union

import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler,
                              SubsetRandomSampler, WeightedRandomSampler)
from torch.utils._pytree import tree_map

from ..errors import InfluenceError
from ..store.fingerprint import record

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
                "example, so the order must be fixed. Build it with shuffle=False (or pass the Dataset as "
                f"{argument})."
            )
        _check_in_order(data, argument)
        if batch_size is not None and data.batch_size is not None and batch_size != data.batch_size:
            raise InfluenceError(
                f"{argument} is a DataLoader with batch_size={data.batch_size}, but batch_size={batch_size} was "
                f"also given. Pass the Dataset as {argument} with batch_size=, or set the batch size on the "
                "DataLoader."
            )
        return data
    if isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise InfluenceError(f"batch_size must be a positive integer, got {batch_size!r}.")
        return DataLoader(data, batch_size=batch_size or DEFAULT_BATCH_SIZE, shuffle=False)
    raise InfluenceError(f"{argument} must be a torch Dataset or DataLoader, got {type(data).__name__}.")


def _check_in_order(loader: DataLoader, argument: str) -> None:
    """Refuse a DataLoader whose batches are not the examples ``0, 1, ..., N - 1`` in order, each once.

    A custom sampler (``sampler=reversed(...)``), ``drop_last=True`` or a batch sampler that skips or repeats
    examples would silently put scores in the wrong columns; the plain sequential loader is accepted without
    iterating its indices.
    """
    if isinstance(loader.dataset, IterableDataset):
        return  # no indices to check: the stream's order is the examples' order
    if loader.batch_size is None and loader.batch_sampler is None:
        raise InfluenceError(
            f"{argument} is a DataLoader with batch_size=None, which yields dataset items as they are, so items are "
            f"not examples. Pass as {argument} a Dataset of single examples with batch_size=, or a DataLoader with "
            "a batch_size."
        )
    if loader.drop_last:
        raise InfluenceError(
            f"{argument} is a DataLoader with drop_last=True: its last examples would get no scores. Build it with "
            f"drop_last=False (or pass the Dataset as {argument})."
        )
    batch_sampler = loader.batch_sampler
    if type(batch_sampler) is BatchSampler and type(batch_sampler.sampler) is SequentialSampler:
        return
    if not hasattr(loader.dataset, "__len__"):
        return
    order = [int(i) for indices in batch_sampler for i in indices]
    if order != list(range(len(loader.dataset))):
        first = next((k for k, (i, j) in enumerate(zip(order, range(len(loader.dataset)))) if i != j), min(
            len(order), len(loader.dataset)))
        raise InfluenceError(
            f"{argument} is a DataLoader whose sampler does not yield examples 0..{len(loader.dataset) - 1} in order "
            f"(position {first} holds {order[first] if first < len(order) else 'nothing'}): scores are indexed by "
            "example. Use the default sequential sampler, or reorder the Dataset itself (e.g. with Subset)."
        )


def to_device(batch: Any, device: torch.device) -> Any:
    return tree_map(lambda x: x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x, batch)


def batches(data: Data, batch_size: Optional[int], device: torch.device, argument: str = "data") -> Iterator[Any]:
    for batch in as_loader(data, batch_size, argument):
        record(batch)  # the content fingerprint a store checks, hashed on the host as the batch is read anyway
        yield to_device(batch, device)


def num_batches(data: Data, batch_size: Optional[int], argument: str = "data") -> Optional[int]:
    try:
        return len(as_loader(data, batch_size, argument))
    except TypeError:
        return None
