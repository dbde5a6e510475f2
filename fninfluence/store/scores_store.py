"""Scores on disk: one Zarr array of scores, chunked along the training axis by data partition.

Layout (a Zarr v3 group; see docs/storage.md)::

    <store>/zarr.json                     attributes["fninfluence"]: kind ("pairwise" | "self"), shape,
                                          layers, arguments, partitions, fingerprints of the factors, the
                                          query and training data and the model, library and format versions
    <store>/all_modules                   [Q, N] (pairwise), [Q, N, T] (per token) or [N] (self); NaN until written
    <store>/per_module/<layer key>        the same, per layer (when per-module scores were asked for)
    <store>/partials/modules<j>           with several module partitions: module partition j's part of all_modules
    <store>/partials/per_module/<key>     with aggregated training gradients: one column per data partition
    <store>/_done/<cell>.json, complete.json

With one module partition (and per-example training gradients) cells write straight into
``all_modules``, so the finished data partitions of a running job can already be read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import zarr

from ..errors import InfluenceError
from ..partitions import Cell, cell_grid, data_ranges, module_groups
from ..version import __version__
from .factors_store import layer_keys
from .fingerprint import DataDigest, data_fingerprint, factors_fingerprint, jsonable, model_fingerprint
from .zarr_io import (_READY, FORMAT_VERSION, ArraySpec, Markers, check_allocation, check_array, chunk_files,
                      done_cells, identity_digest, numpy_dtype, open_store, read_array, read_header, write_array)

IDENTITY = ("kind", "shape", "layers", "arguments", "partitions", "per_module", "factors", "query_data", "train_data",
            "model")
NAN = float("nan")


class ScoreStore:
    def __init__(self, path: Path, group, header: Dict[str, Any], ranges: Sequence[range], groups: List[List[str]]):
        self.path, self.group, self.header = path, group, header
        self.ranges, self.groups = list(ranges), groups
        self.keys = {record["name"]: record["key"] for record in header["layers"]}
        self.axis = 0 if header["kind"] == "self" else 1
        self.summed_train = bool(header["arguments"].get("aggregate_train"))
        self.direct = not self.summed_train and len(groups) == 1
        self.markers = Markers(path, identity_digest(header, IDENTITY), self._expected_chunks)

    def _expected_chunks(self, cell: str) -> List[str]:
        """The chunks a cell's marker must certify: its data partition of its module partition's arrays."""
        if cell == "complete":
            return self._final_chunks()
        parsed = Cell.parse(cell)
        if parsed is None or parsed.kind != self.header["kind"] or parsed.module_partition is None:
            raise KeyError(cell)
        d, m = parsed.data_partition, parsed.module_partition
        target = "all_modules" if self.direct else f"partials/modules{m}"
        ndim = len(self.group[target].shape)
        chunks = chunk_files(self.group, target, self._region(ndim, d))
        if self.header["per_module"]:
            for layer in self.groups[m]:
                name = (f"partials/per_module/{self.keys[layer]}" if self.summed_train
                        else f"per_module/{self.keys[layer]}")
                chunks += chunk_files(self.group, name, self._region(ndim, d))
        return chunks

    def _region(self, ndim: int, data_index: int) -> Tuple[slice, ...]:
        region = [slice(None)] * ndim
        if self.summed_train:
            region[self.axis] = slice(data_index, data_index + 1)
        else:
            r = self.ranges[data_index]
            region[self.axis] = slice(r.start, r.stop)
        return tuple(region)

    def cell_done(self, cell: Cell) -> bool:
        return self.markers.done(cell.name)

    def _check_same_data(self, cell: Cell, train: Optional[str], query: Optional[str]) -> None:
        """Every certified cell read the same queries, and the cells of one data partition the same training
        examples: else the store would combine scores of different data."""
        for other in sorted(done_cells(self.path)):
            parsed = Cell.parse(other)
            record = self.markers.record(other) if other != cell.name and parsed is not None else None
            if record is None:
                continue
            same_partition = (parsed.kind, parsed.data_partition) == (cell.kind, cell.data_partition) \
                and parsed.module_partition is not None
            for what, mine, theirs in (("query data", query, record.get("query")),
                                       ("training data", train if same_partition else None, record.get("train"))):
                if mine is not None and isinstance(theirs, str) and mine != theirs:
                    raise InfluenceError(
                        f"{self.path}: cell {cell} read other {what} than cell {other} of this store (same size, other "
                        "values or order), so the store would combine scores of different data. Pass the same "
                        "query_data and train_data (data= of self_scores) as the run that wrote it, or overwrite=True "
                        "(or another store) to compute "
                        "everything on the new data."
                    )

    def write_cell(self, cell: Cell, per_layer: Dict[str, torch.Tensor], train: Optional[DataDigest] = None,
                   query: Optional[DataDigest] = None) -> None:
        """Write a cell's scores and certify them, with the digests of the training (and query) data it read."""
        train_digest = None if train is None else train.hexdigest()
        query_digest = None if query is None else query.hexdigest()
        self._check_same_data(cell, train_digest, query_digest)
        values = list(per_layer.values())
        summed = sum(values[1:], values[0])
        data_index = cell.data_partition
        target = "all_modules" if self.direct else f"partials/modules{cell.module_partition}"
        region = self._region(summed.dim(), data_index)
        write_array(self.group, target, summed, region)
        chunks = chunk_files(self.group, target, region)
        if self.header["per_module"]:
            for layer, value in per_layer.items():
                name = (f"partials/per_module/{self.keys[layer]}" if self.summed_train
                        else f"per_module/{self.keys[layer]}")
                layer_region = self._region(value.dim(), data_index)
                write_array(self.group, name, value, layer_region)
                chunks += chunk_files(self.group, name, layer_region)
        self.markers.mark(cell.name, chunks, {"train": train_digest, "query": query_digest})

    def missing_cells(self) -> List[str]:
        """The names of the cells not certified done, in store order."""
        return [cell.name for cell in cell_grid(self.header["kind"], len(self.ranges), len(self.groups))
                if not self.markers.done(cell.name)]

    def all_cells_done(self) -> bool:
        return not self.missing_cells()

    def _final_chunks(self) -> List[str]:
        names = ["all_modules"] + ([f"per_module/{key}" for key in self.keys.values()] if self.header["per_module"]
                                   else [])
        return [chunk for name in names for chunk in chunk_files(self.group, name)]

    def aggregate(self) -> Dict[str, torch.Tensor]:
        """Write the final arrays from the partials (once) and return ``{"all_modules": ..., layer: ...}``."""
        if not self.markers.done("complete"):
            if not self.direct:
                parts = sum(read_array(self.group, f"partials/modules{j}") for j in range(len(self.groups)))
                if self.summed_train:
                    parts = parts.sum(self.axis, keepdim=True)
                write_array(self.group, "all_modules", parts)
            if self.header["per_module"] and self.summed_train:
                for key in self.keys.values():
                    partial = read_array(self.group, f"partials/per_module/{key}")
                    write_array(self.group, f"per_module/{key}", partial.sum(self.axis, keepdim=True))
            self.markers.mark("complete", self._final_chunks())
        return read_scores(self.path)


def _scores_header(kind: str, names: Sequence[str], shape: Tuple[int, ...], dtype: torch.dtype,
                   arguments: Dict[str, Any], partitions: Dict[str, Any], per_module,
                   fingerprints: Dict[str, Any]) -> Dict[str, Any]:
    keys = layer_keys(list(names))
    return {
        "kind": kind,
        "format": FORMAT_VERSION,
        "library_version": __version__,
        "shape": list(shape),
        "dtype": str(dtype),
        "layers": [{"name": name, "key": keys[name]} for name in names],
        "arguments": jsonable(arguments),
        "partitions": partitions,
        "per_module": bool(per_module),
        **fingerprints,
    }


def _partitions(ranges: Sequence[range], groups: List[List[str]]) -> Dict[str, Any]:
    """The header's record of the cells: data partitions (count and size) and the module partitions' layers."""
    return {"data": len(ranges), "partition_size": max(1, len(ranges[0])), "modules": groups}


def _fingerprints(model, factors, train_data, query_data) -> Dict[str, Any]:
    """What the scores were computed from, as the header records it."""
    return {
        "factors": factors_fingerprint(factors),
        "query_data": None if query_data is None else data_fingerprint(query_data),
        "train_data": data_fingerprint(train_data),
        "model": model_fingerprint(model),
    }


def open_scores(path: Path, *, kind: str, model, factors, specs, train_data, query_data, ranges, groups, per_module,
                shape: Tuple[int, ...], arguments: Dict[str, Any], overwrite: bool, dtype: torch.dtype) -> ScoreStore:
    keys = layer_keys(list(specs))
    axis = 0 if kind == "self" else 1
    summed_train = bool(arguments.get("aggregate_train"))
    size = max(1, len(ranges[0]))
    chunks = list(shape)
    chunks[axis] = 1 if summed_train else size
    final = ArraySpec(tuple(shape), tuple(chunks), numpy_dtype(dtype), NAN)
    partial_shape = list(shape)
    if summed_train:
        partial_shape[axis] = len(ranges)
    partial = ArraySpec(tuple(partial_shape), tuple(chunks), numpy_dtype(dtype), NAN)
    arrays = {"all_modules": final}
    if summed_train or len(groups) > 1:
        arrays.update({f"partials/modules{j}": partial for j in range(len(groups))})
    if per_module:
        arrays.update({f"per_module/{key}": final for key in keys.values()})
        if summed_train:
            arrays.update({f"partials/per_module/{key}": partial for key in keys.values()})
    header = _scores_header(kind, list(specs), shape, dtype, arguments, _partitions(ranges, groups), per_module,
                            _fingerprints(model, factors, train_data, query_data))
    group = open_store(path, header, arrays, overwrite=overwrite, identity_keys=IDENTITY)
    return ScoreStore(Path(path), group, header, ranges, groups)


def reuse_complete(path: Path, *, kind: str, model, factors, train_data, query_data, ranges, module_partitions: int,
                   per_module, shape: Tuple[Optional[int], ...], arguments: Dict[str, Any],
                   dtype: torch.dtype) -> Optional[Dict[str, torch.Tensor]]:
    """The scores of a complete, intact store at ``path`` made with these arguments, data (size and indices),
    factors and model, found without reading any data (the tracked layers are the stored ones, which must be
    layers of ``factors``); None when the store must be opened the usual way. ``shape`` may end in None (the
    token count of per-token scores, known only from a batch): the stored one is taken."""
    path = Path(path)
    if not (path / _READY).exists():
        return None
    try:
        header = read_header(path)
        if header.get("kind") != kind or header.get("format") != FORMAT_VERSION:
            return None
        names = [record["name"] for record in header["layers"]]
        if not set(names) <= set(factors.layers) or not factors.complete:
            return None
        stored_shape = tuple(header["shape"])
        if len(stored_shape) != len(shape) or any(a is not None and a != b for a, b in zip(shape, stored_shape)):
            return None
        partitions = _partitions(ranges, module_groups(names, module_partitions))
        expected = _scores_header(kind, names, stored_shape, dtype, arguments, partitions, per_module,
                                  _fingerprints(model, factors, train_data, query_data))
    except (InfluenceError, KeyError, TypeError, ValueError):
        return None
    if any(expected.get(k) != header.get(k) for k in IDENTITY):
        return None
    if not _opened(path, header).markers.done("complete"):
        return None
    return read_scores(path)


def _opened(path: Path, header: Dict[str, Any]) -> ScoreStore:
    """A finished store, read-only, with its partitions from the header."""
    partitions = header["partitions"]
    axis = 0 if header["kind"] == "self" else 1
    examples = int(header["shape"][axis]) if not header["arguments"].get("aggregate_train") else \
        int(partitions["data"])
    ranges = data_ranges(examples, int(partitions["data"]))
    return ScoreStore(path, zarr.open_group(str(path), mode="r"), header, ranges, partitions["modules"])


def _crafted(path: Path, what: str) -> InfluenceError:
    return InfluenceError(f"{path}: {what}: the store is damaged or crafted. Recompute it (overwrite=True).")


def _check_arrays(path: Path, group, header: Dict[str, Any], names: Sequence[str]) -> None:
    """The metadata agree with each other (header shape, data sizes, partitions, every array's shape and
    chunks) and the arrays fit in memory: checked before anything is allocated."""
    shape, kind = header.get("shape"), header["kind"]
    ranks = (1,) if kind == "self" else (2, 3)
    if not isinstance(shape, list) or len(shape) not in ranks or \
            not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise _crafted(path, f"its metadata gives the scores shape {shape!r}, which is not a {kind} scores shape")
    axis = 0 if kind == "self" else 1
    arguments, partitions = header["arguments"], header["partitions"]
    parts, size = partitions.get("data"), partitions.get("partition_size")
    if not all(isinstance(n, int) and n >= 1 for n in (parts, size)):
        raise _crafted(path, f"its partitions {partitions!r} are not positive counts")
    train = (header.get("train_data") or {}).get("size")
    query = (header.get("query_data") or {}).get("size") if kind == "pairwise" else None
    examples = shape[axis] if not arguments.get("aggregate_train") else train
    if isinstance(train, int) and examples != train:
        raise _crafted(path, f"its scores shape {shape} does not match its {train} training examples")
    if isinstance(query, int) and shape[0] != (1 if arguments.get("aggregate_queries") else query):
        raise _crafted(path, f"its scores shape {shape} does not match its {query} queries")
    if isinstance(examples, int) and size != max(1, -(-examples // parts)):
        raise _crafted(path, f"its partition size {size} does not split {examples} examples into {parts} partitions")
    chunks = list(shape)
    chunks[axis] = 1 if arguments.get("aggregate_train") else size
    found = []
    for name in names:
        if name not in group:
            raise _crafted(path, f"the array {name} is missing")
        array = group[name]
        if list(array.shape) != shape or list(array.chunks) not in (chunks, [max(1, c) for c in chunks]):
            raise _crafted(path, f"the array {name} has shape {list(array.shape)} in chunks {list(array.chunks)}, but "
                                 f"the store's metadata says {shape} in chunks {chunks}")
        check_array(path, name, array)
        found.append((tuple(array.shape), array.dtype))
    check_allocation(path, found)


def _read(path: Path, group, name: str, region=None) -> torch.Tensor:
    try:
        return read_array(group, name, region)
    except InfluenceError:
        raise
    except Exception as error:  # noqa: BLE001 - zarr's decoding errors (a checksum mismatch, a truncated chunk)
        raise InfluenceError(f"{path}: the array {name} could not be decoded ({type(error).__name__}: {error}): the "
                             "store is damaged. Rerun the same call with this store to recompute its damaged cells."
                             ) from None


def read_scores(path: Path, allow_partial: bool = False) -> Dict[str, torch.Tensor]:
    """``{"all_modules": scores, <layer name>: scores ...}`` from a scores store.

    Incomplete stores raise an error unless ``allow_partial=True``; then the entries of cells not (or not
    intactly) written read as NaN. A complete store whose chunks are missing or changed raises an error.
    """
    path = Path(path)
    header = read_header(path)
    if header.get("kind") not in ("pairwise", "self"):
        raise InfluenceError(f"{path} holds {header.get('kind')!r} results, not scores.")
    if header.get("format") != FORMAT_VERSION:
        raise InfluenceError(f"{path} was written in store format {header.get('format')!r}; this version reads "
                             f"format {FORMAT_VERSION}. Recompute it with this version (overwrite=True).")
    try:
        partitions = header["partitions"]
        direct = not header["arguments"].get("aggregate_train") and len(partitions["modules"]) == 1
        names = {"all_modules": "all_modules"}
        if header["per_module"]:
            names.update({record["name"]: f"per_module/{record['key']}" for record in header["layers"]})
        group = zarr.open_group(str(path), mode="r")
        _check_arrays(path, group, header, list(names.values()))
        markers = _opened(path, header).markers
        complete = markers.done("complete")
        if "complete" in done_cells(path) and not complete and not (allow_partial and direct):
            raise InfluenceError(
                f"{path} is damaged ({markers.problem('complete')}). Rerun the same call with this store to recompute "
                "the damaged cells."
            )
        if not complete and not (allow_partial and direct):
            raise InfluenceError(
                f"{path} is incomplete: some cells are missing. Rerun the same call to finish it"
                + (", or pass allow_partial=True to read what is there (NaN where missing)." if direct else
                   "; partial results of several module partitions or of summed training gradients are not readable.")
            )
        if complete:
            return {key: _read(path, group, name) for key, name in names.items()}
        return _read_certified_cells(path, header, group, markers, names)
    except (KeyError, TypeError, AttributeError, IndexError) as error:
        raise InfluenceError(f"{path} has malformed fninfluence metadata ({type(error).__name__}: {error}): it was "
                             "damaged or not written by fninfluence. Recompute it (overwrite=True).") from None


def _read_certified_cells(path: Path, header, group, markers: Markers,
                          names: Dict[str, str]) -> Dict[str, torch.Tensor]:
    """An incomplete store of one module partition: NaN everywhere but the columns of certified cells."""
    kind, axis = header["kind"], 0 if header["kind"] == "self" else 1
    size, parts = int(header["partitions"]["partition_size"]), int(header["partitions"]["data"])
    result = {}
    for key, name in names.items():
        array = group[name]
        values = torch.full(tuple(array.shape), NAN, dtype=torch.from_numpy(np.zeros(0, array.dtype)).dtype)
        for d in range(parts):
            if markers.done(Cell(kind, d, 0).name):
                region = [slice(None)] * len(array.shape)
                region[axis] = slice(d * size, min((d + 1) * size, array.shape[axis]))
                values[tuple(region)] = _read(path, group, name, tuple(region))
        result[key] = values
    return result
