"""A training-gradient index on disk: each example's per-layer gradient as factored pseudo-tokens.

Layout (a Zarr v3 group; see docs/storage.md)::

    <store>/zarr.json             attributes["fninfluence"]: kind "index", rank, dtype, layers (name, key,
                                  width, groups, out, in, exact), partitions, fingerprints of the model and
                                  the training data, library and format versions
    <store>/g/<layer key>         [N, K, G, out]  left factors (chunked along N by data partition)
    <store>/a/<layer key>         [N, K, G, in]   right factors
    <store>/residual/<layer key>  [N]  relative squared Frobenius error of the truncation (0 where exact)
    <store>/_done/index-data<d>.json, complete.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

import torch
import zarr

from ..core.algebra import DenseStats, require_dense
from ..errors import InfluenceError
from ..partitions import Cell, cell_grid
from ..version import __version__
from .factors_store import layer_keys
from .fingerprint import data_fingerprint, jsonable, model_fingerprint
from .zarr_io import (FORMAT_VERSION, ArraySpec, Markers, chunk_files, identity_digest, numpy_dtype, open_store,
                      read_array, read_header, write_array)

IDENTITY = ("kind", "rank", "dtype", "layers", "partitions", "train_data", "model", "arguments")


def _cell(data_index: int) -> Cell:
    """The index's cells split the training data only."""
    return Cell("index", data_index, None)


def _parse(name: str) -> Cell:
    """The index cell a marker names (KeyError for any other name: the marker certifies nothing)."""
    cell = Cell.parse(name)
    if cell is None or cell.kind != "index" or cell.module_partition is not None:
        raise KeyError(name)
    return cell


class IndexStore:
    def __init__(self, path: Path, group, header: Dict[str, Any]):
        self.path, self.group, self.header = Path(path), group, header
        self.layers = {record["name"]: record for record in header["layers"]}
        self.ranges = [range(start, stop) for start, stop in header["partitions"]["ranges"]]
        self.markers = Markers(self.path, identity_digest(header, IDENTITY), self._expected_chunks)

    def _expected_chunks(self, cell: str) -> List[str]:
        """A cell certifies its rows of every layer's arrays; ``complete`` every cell's."""
        cells = range(len(self.ranges)) if cell == "complete" else [_parse(cell).data_partition]
        rows = [self.ranges[d] for d in cells]
        return [chunk for r in rows for record in self.layers.values() for kind in ("g", "a", "residual")
                for chunk in chunk_files(self.group, f"{kind}/{record['key']}", (slice(r.start, r.stop),))]

    @property
    def examples(self) -> int:
        return self.header["examples"]

    def cell_done(self, data_index: int) -> bool:
        return self.markers.done(_cell(data_index).name)

    def missing_cells(self) -> List[str]:
        """The names of the cells not certified done, in data order."""
        return [cell.name for cell in cell_grid("index", len(self.ranges), None) if not self.markers.done(cell.name)]

    def write_rows(self, start: int, factored: Mapping[str, Mapping[str, torch.Tensor]],
                   residuals: Dict[str, torch.Tensor]) -> None:
        """Rows ``start:start + batch`` of every layer (within one data partition, so one writer per chunk)."""
        for layer, stats in factored.items():
            key = self.layers[layer]["key"]
            stats = require_dense(stats, "The training-gradient index")
            rows = slice(start, start + stats.g.shape[0])
            write_array(self.group, f"g/{key}", stats.g, (rows,))
            write_array(self.group, f"a/{key}", stats.a, (rows,))
            write_array(self.group, f"residual/{key}", residuals[layer], (rows,))

    def mark_cell(self, data_index: int) -> None:
        cell = _cell(data_index).name
        self.markers.mark(cell, self._expected_chunks(cell))
        if not self.missing_cells():
            self.markers.mark("complete", self._expected_chunks("complete"))

    def read_rows(self, layer: str, rows: slice) -> DenseStats:
        """The stored pseudo-tokens of examples ``rows``: stats whose per-example gradients are the index's."""
        key = self.layers[layer]["key"]
        return DenseStats(read_array(self.group, f"a/{key}", (rows,)), read_array(self.group, f"g/{key}", (rows,)))

    def residuals(self, layer: str) -> torch.Tensor:
        return read_array(self.group, f"residual/{self.layers[layer]['key']}")


def open_index(path: Path, *, model, train_data, layers: Dict[str, Dict[str, Any]], rank, dtype: torch.dtype,
               ranges: Sequence[range], arguments: Dict[str, Any], overwrite: bool) -> IndexStore:
    """Create (or reopen, checking it matches) the index store for ``layers`` ``{name: {width, groups, out, in}}``."""
    keys = layer_keys(list(layers))
    examples = ranges[-1].stop if ranges else 0
    size = max(1, len(ranges[0]))
    stored = numpy_dtype(dtype)
    arrays = {}
    records = []
    for name, layer in layers.items():
        key, width, groups = keys[name], layer["width"], layer["groups"]
        arrays[f"g/{key}"] = ArraySpec((examples, width, groups, layer["out"]), (size, width, groups, layer["out"]),
                                       stored)
        arrays[f"a/{key}"] = ArraySpec((examples, width, groups, layer["in"]), (size, width, groups, layer["in"]),
                                       stored)
        arrays[f"residual/{key}"] = ArraySpec((examples,), (size,), "float64", float("nan"))
        records.append({"name": name, "key": key, **layer})
    header = {
        "kind": "index",
        "format": FORMAT_VERSION,
        "library_version": __version__,
        "rank": rank,
        "dtype": str(dtype),
        "examples": examples,
        "layers": records,
        "arguments": jsonable(arguments),
        "partitions": {"data": len(ranges), "partition_size": size, "ranges": [[r.start, r.stop] for r in ranges]},
        "train_data": data_fingerprint(train_data),
        "model": model_fingerprint(model),
    }
    group = open_store(path, header, arrays, overwrite=overwrite, identity_keys=IDENTITY)
    return IndexStore(Path(path), group, header)


def load_index(path: Path) -> IndexStore:
    """Reopen a finished index for scoring (JSON and numeric arrays only)."""
    path = Path(path)
    header = read_header(path)
    if header.get("kind") != "index":
        raise InfluenceError(f"{path} holds {header.get('kind')!r} results, not a training-gradient index.")
    store = IndexStore(path, zarr.open_group(str(path), mode="r"), header)
    damaged = store.markers.damaged(cell.name for cell in cell_grid("index", len(store.ranges), None))
    if damaged:
        raise InfluenceError(f"The index at {path} is damaged: " + "; ".join(f"{c}: {p}" for c, p in damaged.items())
                             + ". Rerun build_index with the same arguments and store to rebuild those cells.")
    missing = store.missing_cells()
    if missing:
        raise InfluenceError(f"The index at {path} is incomplete (cells {missing} missing): rerun build_index with "
                             "the same arguments to finish it.")
    return store
