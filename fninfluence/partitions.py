"""Splitting work into cells: contiguous data partitions (chunk-aligned) x contiguous module partitions."""

from __future__ import annotations

import math
import re
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


@dataclass(frozen=True)
class Cell:
    """One unit of work: data partition ``data_partition`` of module partition ``module_partition`` of a
    fitting pass or a score kind (``kind``: ``"covariance"``, ``"lambda"``, a custom pass's name,
    ``"pairwise"``, ``"self"`` or ``"index"``). The training-gradient index splits data only: its cells have
    ``module_partition=None``.

    :attr:`name` is the one naming rule for cells: completion markers (``_done/<name>.json``), progress
    labels, log records and :func:`fninfluence.distributed.missing_cells` all use it.
    """

    kind: str
    data_partition: int
    module_partition: Optional[int]

    @property
    def name(self) -> str:
        modules = "" if self.module_partition is None else f"-modules{self.module_partition}"
        return f"{self.kind}-data{self.data_partition}{modules}"

    def __str__(self) -> str:
        return self.name

    @staticmethod
    def parse(name: str) -> Optional["Cell"]:
        """The cell called ``name`` (the inverse of :attr:`name`); None for other marker names
        (``complete``, ``pass-<pass>``) and for names this rule never writes (``data01``). A pass name may
        itself contain ``-data``: the last one counts."""
        match = _CELL_NAME.fullmatch(name)
        if match is None:
            return None
        module = match["module"]
        cell = Cell(match["kind"], int(match["data"]), None if module is None else int(module))
        return cell if cell.name == name else None


_CELL_NAME = re.compile(r"(?P<kind>.+)-data(?P<data>\d+)(?:-modules(?P<module>\d+))?", re.DOTALL)


def cell_grid(kind: str, data_partitions: int, module_partitions: Optional[int]) -> List[Cell]:
    """Every cell of a pass or score kind, module partition by module partition and within each in data
    order (the order stores list them in); ``module_partitions=None`` for the index's data-only cells."""
    if module_partitions is None:
        return [Cell(kind, d, None) for d in range(data_partitions)]
    return [Cell(kind, d, m) for m in range(module_partitions) for d in range(data_partitions)]
