"""The public functions' keywords, parsed once at the API boundary into small frozen records.

- :class:`Execution`: how to run (batch size, compilation, progress, precision, per-example vmap, ranks);
- :class:`Layout`: how the work is cut into cells and kept (partitions, targets, store, overwrite);
- :class:`PairwiseKind` / :class:`SelfKind`: which scores, with the options that change their values.

Every record is validated when it is built, so the code below the boundary takes records and trusts them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from . import arguments
from . import ranks as parallel
from .. import partitions as parts
from .. import postprocess
from .ranks import Ranks
from ..errors import InfluenceError
from ..precision import Precision
from .loop import CompileOption
from .tokens import token_count

PerPass = Union[int, None, Mapping[str, Optional[int]]]
Targets = Optional[Sequence[int]]


def per_pass(value: PerPass, name: str, default):
    """A setting given as one value or a dict per pass name: pass ``name``'s value."""
    if isinstance(value, Mapping):
        return value.get(name, default)
    return default if value is None else value


@dataclass(frozen=True)
class Execution:
    """How a call runs. ``ranks`` is this process's place among torchrun's ranks (None: alone); progress
    bars are shown by one rank only."""

    batch_size: Optional[int]
    compile: CompileOption
    progress: bool
    precision: Precision
    per_example_vmap: bool
    ranks: Optional[Ranks]

    @staticmethod
    def parse(batch_size, compile, progress, precision, per_example_vmap, distributed) -> "Execution":
        arguments.check_positive(batch_size, "batch_size")
        ranks = parallel.ranks(distributed)
        return Execution(batch_size, compile, bool(progress) and (ranks is None or ranks.leader),
                         precision or Precision(), per_example_vmap, ranks)


@dataclass(frozen=True)
class Layout:
    """How a call's work is cut into cells (data x module partitions, each an int or, for fitting, a dict per
    pass), which cells this process computes (``targets``), and where they are kept (``store``)."""

    store: Optional[Path]
    overwrite: bool
    data_partitions: PerPass
    module_partitions: PerPass
    target_data_partitions: Targets
    target_module_partitions: Targets

    @staticmethod
    def parse(store, overwrite, data_partitions, module_partitions, target_data_partitions,
              target_module_partitions) -> "Layout":
        return Layout(None if store is None else Path(store), bool(overwrite), data_partitions, module_partitions,
                      target_data_partitions, target_module_partitions)

    @property
    def targeted(self) -> bool:
        return self.target_data_partitions is not None or self.target_module_partitions is not None

    @property
    def single_cell(self) -> bool:
        return self.store is None and self.data_partitions == 1 and self.module_partitions == 1

    def with_ranks(self, ranks: Optional[Ranks], sharded: bool = False) -> "Layout":
        """At least one data partition per rank (scores: one count for the whole call); a multiple of the ranks
        for a model sharded by ``fully_shard``."""
        if ranks is None:
            return self
        return replace(self, data_partitions=parallel.enough_partitions(self.data_partitions, self.module_partitions,
                                                                         ranks, sharded))

    def cells(self, data_parts: int, module_parts: int) -> Tuple[list, list]:
        """``(data indices, module indices)`` this call computes; partial targets need a store."""
        data = parts.targets(self.target_data_partitions, data_parts, "data partitions")
        modules = parts.targets(self.target_module_partitions, module_parts, "module partitions")
        if self.store is None and (len(data) < data_parts or len(modules) < module_parts):
            raise InfluenceError("target partitions need a store to keep the other cells: pass store=...")
        return data, modules


@dataclass(frozen=True)
class PairwiseKind:
    """Pairwise scores ``[Q, N]`` and their options (see :func:`fninfluence.pairwise_scores`); ``tokens`` is the
    model's token count for per-token scores, found from the first training batch."""

    damping: Optional[float]
    query_batch_size: Optional[int]
    per_token: bool
    conv_tokens: bool
    rank: Optional[int]
    full_svd: bool
    aggregate_queries: bool
    aggregate_train: bool
    queries_per_pass: Optional[int]
    tokens: Optional[int] = None

    name = "pairwise"
    train_argument = "train_data"

    @staticmethod
    def parse(task, damping, query_batch_size, per_token, conv_tokens, rank, full_svd, aggregate_queries,
              aggregate_train, queries_per_pass) -> "PairwiseKind":
        arguments.check_damping(damping)
        for value, what in ((rank, "query_rank"), (query_batch_size, "query_batch_size"),
                            (queries_per_pass, "queries_per_pass")):
            arguments.check_positive(value, what)
        if per_token and aggregate_train:
            raise InfluenceError("per_token scores need per-example training gradients; drop aggregate_train.")
        if per_token and postprocess.post_process_of(task) is not None:
            raise InfluenceError(
                "per_token scores are not defined with post_process_per_sample_gradient: a post-processed gradient "
                "has no tokens. Drop per_token, or set enable_post_process_per_sample_gradient = False."
            )
        return PairwiseKind(damping, query_batch_size, per_token, conv_tokens, rank, full_svd, aggregate_queries,
                            aggregate_train, queries_per_pass)

    def recorded(self, precision: Precision) -> Dict[str, Any]:
        """The options a store records: those that change the scores."""
        return {"damping": self.damping, "per_token": self.per_token, "conv_tokens": self.conv_tokens,
                "rank": self.rank, "full_svd": self.full_svd, "aggregate_queries": self.aggregate_queries,
                "aggregate_train": self.aggregate_train, "precision": precision.as_dict()}

    def join(self, blocks):
        """One layer's score blocks of the data partitions, in order -> its scores."""
        return sum(blocks) if self.aggregate_train else torch.cat(blocks, dim=1)

    def shape(self, examples: int, queries: Callable[[], int], known: bool = True) -> Tuple[Optional[int], ...]:
        """The full score array's shape (``queries()``: the number of queries); ``known=False`` before any batch is
        read (the token count is then None)."""
        rows = 1 if self.aggregate_queries else queries()
        if self.aggregate_train:
            return (rows, 1)
        if self.per_token:
            return (rows, examples, self.tokens if known else None)
        return (rows, examples)

    def seen(self, tap, train_data, batch_size: Optional[int]) -> "PairwiseKind":
        """The kind once the tap is discovered: per-token scores learn the model's token count."""
        if not self.per_token:
            return self
        return replace(self, tokens=token_count(tap, train_data, batch_size, self.conv_tokens))


@dataclass(frozen=True)
class SelfKind:
    """Self-influence scores ``[N]`` (see :func:`fninfluence.self_scores`)."""

    damping: Optional[float]
    use_measurement: bool

    name = "self"
    train_argument = "data"

    def recorded(self, precision: Precision) -> Dict[str, Any]:
        return {"damping": self.damping, "use_measurement": self.use_measurement, "precision": precision.as_dict()}

    def join(self, blocks):
        return torch.cat(blocks)

    def shape(self, examples: int, queries: Callable[[], int], known: bool = True) -> Tuple[int, ...]:
        return (examples,)

    def seen(self, tap, train_data, batch_size: Optional[int]) -> "SelfKind":
        return self
