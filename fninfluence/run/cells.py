"""Where a cell's result goes, and how a pass's cells become one result.

Every pass over the data (a fitting pass, a scoring call) is split into cells: data partition x module
partition (:mod:`fninfluence.partitions`). Which cells this process computes, where each finished cell is
kept, and how the cells are brought together is a choice of four places, each a small class with the same
methods, picked once per call by :func:`fit_cells` / :func:`score_cells`:

=============  ===============================  ================================================================
place          keeps a cell                     brings the cells together
=============  ===============================  ================================================================
memory         a list per layer                 sums the partial states in partition order (``stack().sum(0)``),
                                                finalizes / joins the score blocks
store          writes and certifies its chunks  the same sum read back from the store; the store's aggregate
ranks          in this rank's memory            each layer's owner receives its partials, finalizes, broadcasts;
                                                score cells are broadcast by their owners
ranks + store  this rank writes its own cells   owners sum from the store and write the outputs; rank 0 aggregates
=============  ===============================  ================================================================

All four give the same bits: one reduction order everywhere (see :func:`fninfluence.distributed.sum_in_order`).
The fit and score code above them never asks which place it has.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence

import torch

from . import ranks as parallel
from .ranks import Ranks
from ..errors import InfluenceError, Interrupted
from ..partitions import Cell
from ..store.describe import describe
from ..store.fingerprint import DataDigest
from ..store.scores_store import read_scores

logger = logging.getLogger("fninfluence")

States = Dict[str, Dict[str, torch.Tensor]]  # {layer: {name: tensor}}
PerLayer = Dict[str, torch.Tensor]


# -- fitting -----------------------------------------------------------------------------------------

class PassCells(NamedTuple):
    """The cells of one fitting pass this call computes (``cells``, its targets), with the pass's data partition
    count and module partitions (``partition_layers``: the layers of each)."""

    name: str
    cells: List[Cell]
    data_parts: int
    partition_layers: List[List[str]]

    def keys(self) -> List[tuple]:
        return [(cell.module_partition, cell.data_partition) for cell in self.cells]


class FitInMemory:
    """One process, no store: partial states kept per layer, summed in partition order."""

    def __init__(self):
        self.partials: Dict[str, List[Dict[str, torch.Tensor]]] = {}

    def resume(self, pass_name: str, factors: States) -> Optional[States]:
        return None  # nothing survives a call

    def todo(self, cells: Sequence[Cell]) -> List[Cell]:
        return list(cells)

    def keep(self, cell: Cell, states: States, examples: int, seen: DataDigest) -> None:
        for layer, state in states.items():
            self.partials.setdefault(layer, []).append(state)

    def examples(self, count: int) -> int:
        return count

    def reduce(self, pass_cells: PassCells, fit_passes, earlier: States) -> Optional[States]:
        """``{layer: finalize(sum of its cells' states)}``, or None while cells are missing."""
        summed = {layer: parallel.sum_in_order(states) for layer, states in self.partials.items()}
        self.partials = {}
        return {layer: fit_pass.finalize(summed[layer], earlier[layer]) for layer, fit_pass in fit_passes.items()}

    def keep_outputs(self, pass_name: str, outputs: States) -> None:
        pass

    def num_examples(self, seen: int) -> int:
        return seen

    def finish(self) -> None:
        pass


class FitInStore(FitInMemory):
    """One process with a store: every cell is written and certified, the sums are read back from it."""

    def __init__(self, saved):
        super().__init__()
        self.saved = saved

    def resume(self, pass_name: str, factors: States) -> Optional[States]:
        return self.saved.merge_pass_outputs(pass_name, factors) if self.saved.pass_complete(pass_name) else None

    def todo(self, cells: Sequence[Cell]) -> List[Cell]:
        return [cell for cell in cells if not self.saved.cell_done(cell)]

    def keep(self, cell: Cell, states: States, examples: int, seen: DataDigest) -> None:
        self.saved.write_cell(cell, states, examples, seen)

    def _complete(self, pass_cells: PassCells) -> bool:
        missing = self.saved.missing_cells(pass_cells.name, pass_cells.data_parts, len(pass_cells.partition_layers))
        if missing:
            logger.info("%s: pass %s has missing cells %s; rerun to complete it.", self.saved.path, pass_cells.name,
                        missing)
        return not missing

    def reduce(self, pass_cells: PassCells, fit_passes, earlier: States) -> Optional[States]:
        if not self._complete(pass_cells):
            return None
        summed = self.saved.sum_partials(pass_cells.name)
        return {layer: fit_pass.finalize(summed[layer], earlier[layer]) for layer, fit_pass in fit_passes.items()}

    def keep_outputs(self, pass_name: str, outputs: States) -> None:
        self.saved.write_pass_outputs(pass_name, outputs)

    def num_examples(self, seen: int) -> int:
        return self.saved.num_examples()

    def finish(self) -> None:
        self.saved.mark_complete()


class FitOnRanks(FitInMemory):
    """Several ranks, no store: each computes every ``world``-th cell; layer owners finalize and broadcast."""

    def __init__(self, ranks: Ranks, device: torch.device):
        super().__init__()
        self.ranks, self.device = ranks, device
        self.computed: Dict[tuple, States] = {}

    def todo(self, cells: Sequence[Cell]) -> List[Cell]:
        return self.ranks.mine(list(cells))

    def keep(self, cell: Cell, states: States, examples: int, seen: DataDigest) -> None:
        self.computed[(cell.module_partition, cell.data_partition)] = states

    def examples(self, count: int) -> int:
        return self.ranks.total(count)

    def reduce(self, pass_cells: PassCells, fit_passes, earlier: States) -> Optional[States]:
        computed, self.computed = self.computed, {}
        return parallel.finalize_pass(self.ranks, fit_passes, pass_cells.keys(), pass_cells.partition_layers, computed,
                                      earlier, self.device)


class FitOnRanksInStore(FitInStore):
    """Several ranks sharing a store: each writes its own cells, layer owners finalize from the store."""

    def __init__(self, saved, ranks: Ranks, device: torch.device):
        super().__init__(saved)
        self.ranks, self.device = ranks, device

    def todo(self, cells: Sequence[Cell]) -> List[Cell]:
        return [cell for cell in self.ranks.mine(list(cells)) if not self.saved.cell_done(cell)]

    def examples(self, count: int) -> int:
        return self.ranks.total(count)

    def reduce(self, pass_cells: PassCells, fit_passes, earlier: States) -> Optional[States]:
        self.ranks.barrier()  # every rank's cells are written
        if not self._complete(pass_cells):
            return None
        parallel.finalize_stored_pass(self.ranks, self.saved, pass_cells.name, fit_passes, earlier)
        stored = self.saved.merge_pass_outputs(pass_cells.name, {})
        return {layer: {k: v.to(self.device) for k, v in stored[layer].items()} for layer in fit_passes}

    def keep_outputs(self, pass_name: str, outputs: States) -> None:
        pass  # written by each layer's owner in reduce


def fit_cells(open_store: Optional[Callable[[bool], Any]], overwrite: bool, ranks: Optional[Ranks],
              device: torch.device):
    """The place a fit's cells go: memory, a store (``open_store(overwrite)`` opens it), ranks, or both."""
    if open_store is None:
        return FitInMemory() if ranks is None else FitOnRanks(ranks, device)
    saved = parallel.open_in_turn(ranks, open_store, overwrite)
    return FitInStore(saved) if ranks is None else FitOnRanksInStore(saved, ranks, device)


# -- scoring -----------------------------------------------------------------------------------------

class Scores(NamedTuple):
    """A scoring call's result: per layer, and summed over layers where a store summed them itself."""

    per_layer: PerLayer
    summed: Optional[torch.Tensor] = None

class ScoresInMemory:
    """One process, no store: each cell's per-layer scores kept, joined along the training axis."""

    def __init__(self, join: Callable[[List[torch.Tensor]], torch.Tensor]):
        self.join = join  # the data partitions' blocks of one layer, in order -> the layer's scores
        self.cells: Dict[Cell, PerLayer] = {}

    def todo(self, cells: Sequence[Cell]) -> List[Cell]:
        return list(cells)

    def keep(self, cell: Cell, per_layer: PerLayer, train: DataDigest, query: Optional[DataDigest]) -> None:
        self.cells[cell] = per_layer

    def _joined(self, cells: Dict[Cell, PerLayer]) -> PerLayer:
        by_layer: Dict[str, List[tuple]] = {}
        for cell, per_layer in cells.items():
            for layer, block in per_layer.items():
                by_layer.setdefault(layer, []).append((cell.data_partition, block))
        return {layer: self.join([block for _, block in sorted(blocks, key=lambda item: item[0])])
                for layer, blocks in by_layer.items()}

    def result(self) -> Optional[Scores]:
        """The scores of every cell brought together, or None while cells are missing."""
        return Scores(self._joined(self.cells))


class ScoresOnRanks(ScoresInMemory):
    """Several ranks, no store: each scores every ``world``-th cell; every cell is broadcast by its owner."""

    def __init__(self, join, ranks: Ranks, device: torch.device, cells: Sequence[Cell],
                 partition_layers: List[List[str]]):
        super().__init__(join)
        self.ranks, self.device, self.all_cells, self.partition_layers = ranks, device, list(cells), partition_layers

    def todo(self, cells: Sequence[Cell]) -> List[Cell]:
        return self.ranks.mine(list(cells))

    def result(self) -> Optional[Scores]:
        keys = [(c.module_partition, c.data_partition) for c in self.all_cells]
        mine = {(c.module_partition, c.data_partition): v for c, v in self.cells.items()}
        shared = parallel.share_cells(self.ranks, keys, self.partition_layers, mine, self.device)
        return Scores(self._joined({cell: shared[(cell.module_partition, cell.data_partition)]
                                    for cell in self.all_cells}))


class ScoresInStore:
    """A store, on one rank or several: each cell's chunks written by the rank that scored it; rank 0 writes
    the final arrays once every cell is certified, and the other ranks read them back."""

    def __init__(self, saved, ranks: Optional[Ranks] = None):
        self.saved, self.ranks = saved, ranks

    def todo(self, cells: Sequence[Cell]) -> List[Cell]:
        mine = list(cells) if self.ranks is None else self.ranks.mine(list(cells))
        return [cell for cell in mine if not self.saved.cell_done(cell)]

    def keep(self, cell: Cell, per_layer: PerLayer, train: DataDigest, query: Optional[DataDigest]) -> None:
        self.saved.write_cell(cell, per_layer, train, query)

    def result(self) -> Optional[Scores]:
        if self.ranks is not None:
            self.ranks.barrier()  # every rank's chunks and markers are written
        if not self.saved.all_cells_done():
            logger.info("%s: cells %s are missing; rerun to complete the scores.", self.saved.path,
                        self.saved.missing_cells())
            return None
        leader = self.ranks is None or self.ranks.leader
        result = self.saved.aggregate() if leader else None
        if self.ranks is not None:
            self.ranks.barrier()  # rank 0 has written the final arrays
            if not leader:
                result = read_scores(self.saved.path)
        summed = result.pop("all_modules")
        return Scores(result, summed)


def score_cells(open_store: Optional[Callable[[bool], Any]], overwrite: bool, ranks: Optional[Ranks],
                device: torch.device, join, cells: Sequence[Cell], partition_layers: List[List[str]]):
    """The place a scoring call's cells go: memory, a store, ranks, or ranks sharing a store."""
    if open_store is not None:
        return ScoresInStore(parallel.open_in_turn(ranks, open_store, overwrite), ranks)
    return ScoresInMemory(join) if ranks is None else ScoresOnRanks(join, ranks, device, cells, partition_layers)


# -- Ctrl-C ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def reported_interrupts(store: Optional[Path]) -> Iterator[None]:
    """Ctrl-C during a call with a store: re-raised as :class:`~fninfluence.errors.Interrupted` (a
    ``KeyboardInterrupt``) whose message says how many cells the store has kept and that the same call resumes,
    instead of a traceback through the library. Nothing is caught: every certified cell stays certified, a cell
    being written when the interrupt came has no marker and is computed again by the rerun."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        message = None if store is None or isinstance(interrupt, Interrupted) else interrupted_message(Path(store))
        if message is None:
            raise
        raise Interrupted(message) from None


def interrupted_message(store: Path) -> Optional[str]:
    """What an interrupted call with ``store`` has kept, and how to go on; None when the store says nothing (it was
    never laid out, or cannot be read)."""
    try:
        info = describe(store) if store.exists() else None
    except (InfluenceError, OSError):
        return None
    if info is None or info.get("kind") == "unfinished":
        return None
    if info["kind"] == "factors":
        parts = [(entry["name"], entry.get("cells_done", []), entry.get("cells_missing", []))
                 for entry in info["passes"]]
    else:
        parts = [(info["kind"], info.get("cells_done", []), info.get("cells_missing", []))]
    done = sum(len(d) for _, d, _ in parts)
    total = sum(len(d) + len(m) for _, d, m in parts)
    detail = ", ".join(f"{name} {len(d)}/{len(d) + len(m)}" for name, d, m in parts)
    advice = " (more data_partitions= make smaller cells, so less is lost)" if total == len(parts) else ""
    return (f"{store} keeps {done} of {total} cells ({detail}). Run the same call again to resume: only the missing "
            f"cells are computed{advice}.")
