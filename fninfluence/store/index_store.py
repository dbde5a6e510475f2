"""A training-gradient index on disk: each example's per-layer gradient, dense or as factored pseudo-tokens.

Layout (a Zarr v3 group; see docs/storage.md)::

    <store>/zarr.json             attributes["fninfluence"]: kind "index", rank, dtype, layers (name, key,
                                  form, width, groups, out, in), partitions, chunk_rows, fingerprints of the
                                  model and the training data, library and format versions
    <store>/g/<layer key>         [N, K, G, out]  left factors   (layers of form "factored")
    <store>/a/<layer key>         [N, K, G, in]   right factors  (layers of form "factored")
    <store>/grads/<layer key>     [N, G, out, in] the gradients  (layers of form "dense")
    <store>/residual/<layer key>  [N]  relative squared Frobenius error of the truncation (0 where exact)
    <store>/_done/index-data<d>.json, complete.json

Every array is chunked along N by ``chunk_rows`` examples, and data partitions are whole chunks (the last
partition ends at N). The rows of a batch are buffered until a chunk is whole, so each chunk file is
written once: the build costs a constant per example, whatever the partition size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import zarr

from ..core.algebra import DenseStats, ExampleGrads, require_dense
from ..errors import InfluenceError
from ..partitions import Cell, cell_grid
from ..version import __version__
from .factors_store import layer_keys
from .fingerprint import data_fingerprint, jsonable, model_fingerprint
from .zarr_io import (FORMAT_VERSION, ArraySpec, Markers, chunk_files, decode, identity_digest, numpy_dtype,
                      open_store, read_array, read_header, write_array)

IDENTITY = ("kind", "rank", "dtype", "layers", "partitions", "train_data", "model", "arguments")
DENSE, FACTORED = "dense", "factored"


def layer_form(record: Mapping[str, Any]) -> str:
    """``"dense"`` or ``"factored"`` (indexes written before the dense form hold factored layers only)."""
    return record.get("form", FACTORED)


def layer_arrays(record: Mapping[str, Any]) -> List[str]:
    """The kinds of array that hold a layer's rows (besides ``residual``)."""
    return ["grads"] if layer_form(record) == DENSE else ["g", "a"]


def example_bytes(layer: Mapping[str, Any], itemsize: int) -> int:
    """Bytes per example of one layer as stored: ``G*out*in`` dense, ``K*G*(out+in)`` factored (+ its residual)."""
    groups, out, inp = layer["groups"], layer["out"], layer["in"]
    numbers = groups * out * inp if layer_form(layer) == DENSE else layer["width"] * groups * (out + inp)
    return numbers * itemsize + 8


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
        self._pending: Optional[Dict[str, Any]] = None  # rows written but not yet a whole chunk
        self._memory: Optional[Dict[str, torch.Tensor]] = None  # every array, once load_into_memory ran
        self.cache: Dict[Any, Any] = {}  # what retrieval derives from the index (sketches), per process

    def _expected_chunks(self, cell: str) -> List[str]:
        """A cell certifies its rows of every layer's arrays; ``complete`` every cell's."""
        cells = range(len(self.ranges)) if cell == "complete" else [_parse(cell).data_partition]
        rows = [self.ranges[d] for d in cells]
        return [chunk for r in rows for record in self.layers.values()
                for kind in layer_arrays(record) + ["residual"]
                for chunk in chunk_files(self.group, f"{kind}/{record['key']}", (slice(r.start, r.stop),))]

    @property
    def examples(self) -> int:
        return self.header["examples"]

    @property
    def chunk_rows(self) -> int:
        """Examples per chunk of every array (reads of whole chunks decompress nothing twice)."""
        if "_chunk_rows" not in self.cache:
            record = next(iter(self.layers.values()), None)
            self.cache["_chunk_rows"] = (int(self.group[f"residual/{record['key']}"].chunks[0]) if record is not None
                                         else max(1, self.examples))
        return self.cache["_chunk_rows"]

    @property
    def identity(self) -> str:
        """The digest of the index's identity (arguments, layers, data and model fingerprints)."""
        return self.markers.identity

    def cell_done(self, data_index: int) -> bool:
        return self.markers.done(_cell(data_index).name)

    def missing_cells(self) -> List[str]:
        """The names of the cells not certified done, in data order."""
        return [cell.name for cell in cell_grid("index", len(self.ranges), None) if not self.markers.done(cell.name)]

    def write_rows(self, start: int, values: Mapping[str, Mapping[str, torch.Tensor]],
                   residuals: Dict[str, torch.Tensor]) -> None:
        """Rows ``start:start + batch`` of every layer (within one data partition, so one writer per chunk):
        ``{"grads"}`` for a dense layer, ``{"g", "a"}`` for a factored one.

        Rows are kept in memory (on the CPU) until they fill whole chunks, which are then written once; rows that
        do not follow the previous ones, and :meth:`flush`, write what is pending as it is."""
        arrays: Dict[str, torch.Tensor] = {}
        for layer, value in values.items():
            record = self.layers[layer]
            key = record["key"]
            if layer_form(record) == DENSE:
                arrays[f"grads/{key}"] = value["grads"]
            else:
                stats = require_dense(value, "The training-gradient index")
                arrays[f"g/{key}"], arrays[f"a/{key}"] = stats.g, stats.a
            arrays[f"residual/{key}"] = residuals[layer]
        rows = next(iter(arrays.values())).shape[0]
        if self._pending is not None and self._pending["stop"] != start:
            self.flush()
        if self._pending is None:
            self._pending = {"start": start, "stop": start, "arrays": {name: [] for name in arrays}}
        for name, value in arrays.items():
            self._pending["arrays"][name].append(value.detach().to("cpu"))
        self._pending["stop"] = start + rows
        stop = self._pending["stop"]
        whole = stop if stop >= self.examples else stop - stop % self.chunk_rows
        if whole > self._pending["start"]:
            self._write_pending(whole)

    def _write_pending(self, stop: int) -> None:
        """Write the pending rows up to ``stop``; keep the rest pending."""
        pending = self._pending
        start = pending["start"]
        kept = {}
        for name, parts in pending["arrays"].items():
            rows = torch.cat(parts) if len(parts) > 1 else parts[0]
            write_array(self.group, name, rows[:stop - start], (slice(start, stop),))
            kept[name] = [rows[stop - start:]] if stop < pending["stop"] else []
        self._pending = None if stop >= pending["stop"] else {"start": stop, "stop": pending["stop"], "arrays": kept}

    def flush(self) -> None:
        """Write the pending rows, whole chunks or not."""
        if self._pending is not None:
            self._write_pending(self._pending["stop"])

    def mark_cell(self, data_index: int) -> None:
        self.flush()
        cell = _cell(data_index).name
        self.markers.mark(cell, self._expected_chunks(cell))
        if not self.missing_cells():
            self.markers.mark("complete", self._expected_chunks("complete"))

    def _read(self, name: str, rows: Union[slice, torch.Tensor]) -> torch.Tensor:
        if self._memory is not None:
            return self._memory[name][rows]
        if isinstance(rows, slice):
            return read_array(self.group, name, (rows,))
        array = self.group[name]
        return decode(array, array.get_orthogonal_selection((rows.cpu().numpy(),)))

    def read_rows(self, layer: str, rows: Union[slice, torch.Tensor]) -> Union[DenseStats, ExampleGrads]:
        """The stored gradients of examples ``rows`` (a slice, or a 1-d tensor of indices): stats whose
        per-example gradients are the index's (``ExampleGrads`` for a dense layer, ``DenseStats`` pseudo-tokens
        for a factored one)."""
        record = self.layers[layer]
        key = record["key"]
        if layer_form(record) == DENSE:
            return ExampleGrads(self._read(f"grads/{key}", rows))
        return DenseStats(self._read(f"a/{key}", rows), self._read(f"g/{key}", rows))

    def read_gradients(self, layer: str, rows: Union[slice, torch.Tensor]) -> torch.Tensor:
        """``[n, G, out, in]``: the stored per-example gradients of ``rows``, dense (factored layers multiplied out)."""
        stats = self.read_rows(layer, rows)
        if isinstance(stats, ExampleGrads):
            return stats.grads
        return torch.einsum("nkgo,nkgi->ngoi", stats.g, stats.a)

    def load_into_memory(self) -> "IndexStore":
        """Read every array once and serve later reads from memory (for many small reads: retrieval reranking)."""
        if self._memory is None:
            self._memory = {f"{kind}/{record['key']}": read_array(self.group, f"{kind}/{record['key']}")
                            for record in self.layers.values() for kind in layer_arrays(record)}
        return self

    def stored_bytes_per_example(self) -> int:
        """Bytes per example of the arrays as laid out (before compression)."""
        itemsize = torch.empty((), dtype=getattr(torch, self.header["dtype"].replace("torch.", ""))).element_size()
        return sum(example_bytes(record, itemsize) for record in self.layers.values())

    def residuals(self, layer: str) -> torch.Tensor:
        return read_array(self.group, f"residual/{self.layers[layer]['key']}")


def open_index(path: Path, *, model, train_data, layers: Dict[str, Dict[str, Any]], rank, dtype: torch.dtype,
               ranges: Sequence[range], arguments: Dict[str, Any], overwrite: bool,
               chunk_rows: Optional[int] = None) -> IndexStore:
    """Create (or reopen, checking it matches) the index store for ``layers``
    ``{name: {form, width, groups, out, in}}``. ``chunk_rows`` (default: the partition size) must divide the
    size of every partition but the last."""
    keys = layer_keys(list(layers))
    examples = ranges[-1].stop if ranges else 0
    size = max(1, len(ranges[0]))
    rows = size if chunk_rows is None else int(chunk_rows)
    if any(r.start % rows for r in ranges if len(r)):
        raise InfluenceError(f"Index chunks of {rows} examples do not align with the data partitions {list(ranges)}.")
    stored = numpy_dtype(dtype)
    arrays = {}
    records = []
    for name, layer in layers.items():
        key, width, groups = keys[name], layer["width"], layer["groups"]
        if layer_form(layer) == DENSE:
            shape = (groups, layer["out"], layer["in"])
            arrays[f"grads/{key}"] = ArraySpec((examples, *shape), (rows, *shape), stored)
        else:
            arrays[f"g/{key}"] = ArraySpec((examples, width, groups, layer["out"]),
                                           (rows, width, groups, layer["out"]), stored)
            arrays[f"a/{key}"] = ArraySpec((examples, width, groups, layer["in"]),
                                           (rows, width, groups, layer["in"]), stored)
        arrays[f"residual/{key}"] = ArraySpec((examples,), (rows,), "float64", float("nan"))
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
        "chunk_rows": rows,
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
