"""Splitting work into cells: contiguous data partitions (chunk-aligned) x contiguous module partitions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

from .errors import InfluenceError


def partition_size(examples: int, partitions: int) -> int:
    """Examples per data partition; every partition but the last has exactly this many (Zarr chunk size)."""
    return max(1, math.ceil(examples / partitions))


def data_ranges(examples: int, partitions: int) -> List[range]:
    """``partitions`` contiguous ranges covering ``range(examples)``, all of one size but the last."""
    check_count(partitions, "data partitions")
    size = partition_size(examples, partitions)
    return [range(min(i * size, examples), min((i + 1) * size, examples)) for i in range(partitions)]


def module_groups(layers: Sequence[str], partitions: int) -> List[List[str]]:
    """``partitions`` contiguous, near-equal groups of layer names (in model order)."""
    check_count(partitions, "module partitions")
    if partitions > len(layers):
        raise InfluenceError(
            f"{partitions} module partitions were asked for, but only {len(layers)} layers are tracked: "
            f"use at most {len(layers)}."
        )
    bounds = [round(i * len(layers) / partitions) for i in range(partitions + 1)]
    return [list(layers[bounds[i]:bounds[i + 1]]) for i in range(partitions)]


def check_count(value: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InfluenceError(f"The number of {what} must be a positive integer, got {value!r}.")


def targets(requested: Optional[Sequence[int]], partitions: int, what: str) -> List[int]:
    """The partition indices to compute: all of them, or the requested ones after checking their range."""
    if requested is None:
        return list(range(partitions))
    chosen = sorted({int(i) for i in requested})
    bad = [i for i in chosen if not 0 <= i < partitions]
    if bad:
        raise InfluenceError(f"target {what} {bad} are out of range: there are {partitions} {what} (0 to {partitions - 1}).")
    return chosen


def cell_name(kind: str, data_index: int, module_index: int) -> str:
    return f"{kind}-data{data_index}-modules{module_index}"


@dataclass(frozen=True)
class Cell:
    """One unit of work of a pass: data partition ``data`` x module partition ``module`` of pass or score kind
    ``kind``; stores, markers and job arrays know it by :attr:`name`."""

    kind: str
    data: int
    module: int

    @property
    def name(self) -> str:
        return cell_name(self.kind, self.data, self.module)
