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
from typing import Any, Dict, List, Sequence, Tuple

import torch

from ..errors import InfluenceError
from .factors_store import layer_keys
from .fingerprint import data_fingerprint, factors_fingerprint, jsonable, model_fingerprint
from .zarr_io import (FORMAT_VERSION, ArraySpec, done_cells, mark_done, numpy_dtype, open_store, read_array,
                      read_header, write_array)

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

    def _region(self, ndim: int, data_index: int) -> Tuple[slice, ...]:
        region = [slice(None)] * ndim
        if self.summed_train:
            region[self.axis] = slice(data_index, data_index + 1)
        else:
            r = self.ranges[data_index]
            region[self.axis] = slice(r.start, r.stop)
        return tuple(region)

    def cell_done(self, cell: str) -> bool:
        return cell in done_cells(self.path)

    def write_cell(self, data_index: int, module_index: int, per_layer: Dict[str, torch.Tensor], cell: str) -> None:
        values = list(per_layer.values())
        summed = sum(values[1:], values[0])
        target = "all_modules" if self.direct else f"partials/modules{module_index}"
        write_array(self.group, target, summed, self._region(summed.dim(), data_index))
        if self.header["per_module"]:
            for layer, value in per_layer.items():
                name = (f"partials/per_module/{self.keys[layer]}" if self.summed_train
                        else f"per_module/{self.keys[layer]}")
                write_array(self.group, name, value, self._region(value.dim(), data_index))
        mark_done(self.path, cell)

    def missing_cells(self) -> List[str]:
        done = done_cells(self.path)
        kind = self.header["kind"]
        return [f"{kind}-data{d}-modules{m}" for m in range(len(self.groups)) for d in range(len(self.ranges))
                if f"{kind}-data{d}-modules{m}" not in done]

    def all_cells_done(self) -> bool:
        return not self.missing_cells()

    def aggregate(self) -> Dict[str, torch.Tensor]:
        """Write the final arrays from the partials (once) and return ``{"all_modules": ..., layer: ...}``."""
        if "complete" not in done_cells(self.path):
            if not self.direct:
                parts = sum(read_array(self.group, f"partials/modules{j}") for j in range(len(self.groups)))
                if self.summed_train:
                    parts = parts.sum(self.axis, keepdim=True)
                write_array(self.group, "all_modules", parts)
            if self.header["per_module"] and self.summed_train:
                for key in self.keys.values():
                    partial = read_array(self.group, f"partials/per_module/{key}")
                    write_array(self.group, f"per_module/{key}", partial.sum(self.axis, keepdim=True))
            mark_done(self.path, "complete")
        return read_scores(self.path)


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
    header = {
        "kind": kind,
        "format": FORMAT_VERSION,
        "library_version": _version(),
        "shape": list(shape),
        "dtype": str(dtype),
        "layers": [{"name": name, "key": keys[name]} for name in specs],
        "arguments": jsonable(arguments),
        "partitions": {"data": len(ranges), "partition_size": size, "modules": groups},
        "per_module": bool(per_module),
        "factors": factors_fingerprint(factors),
        "query_data": None if query_data is None else data_fingerprint(query_data),
        "train_data": data_fingerprint(train_data),
        "model": model_fingerprint(model),
    }
    group = open_store(path, header, arrays, overwrite=overwrite, identity_keys=IDENTITY)
    return ScoreStore(Path(path), group, header, ranges, groups)


def _version() -> str:
    from .. import __version__

    return __version__


def read_scores(path: Path, allow_partial: bool = False) -> Dict[str, torch.Tensor]:
    """``{"all_modules": scores, <layer name>: scores ...}`` from a scores store.

    Incomplete stores raise an error unless ``allow_partial=True``; then missing entries read as NaN.
    """
    import zarr

    path = Path(path)
    header = read_header(path)
    if header.get("kind") not in ("pairwise", "self"):
        raise InfluenceError(f"{path} holds {header.get('kind')!r} results, not scores.")
    complete = "complete" in done_cells(path)
    direct = not header["arguments"].get("aggregate_train") and len(header["partitions"]["modules"]) == 1
    if not complete and not (allow_partial and direct):
        raise InfluenceError(
            f"{path} is incomplete: some cells are missing. Rerun the same call to finish it"
            + (", or pass allow_partial=True to read what is there (NaN where missing)." if direct else
               "; partial results of several module partitions or of summed training gradients are not readable.")
        )
    group = zarr.open_group(str(path), mode="r")
    result = {"all_modules": read_array(group, "all_modules")}
    if header["per_module"]:
        for record in header["layers"]:
            result[record["name"]] = read_array(group, f"per_module/{record['key']}")
    return result
