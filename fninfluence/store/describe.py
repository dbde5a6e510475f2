"""What a store holds, for people: ``fninfluence inspect`` and ``fninfluence top``.

Everything here reads JSON attributes, completion markers and numeric Zarr arrays, read-only: nothing is
unpickled or executed, and a store that is incomplete, being filled, or half-created is described as such.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..errors import InfluenceError
from ..partitions import cell_grid
from . import factors_store, index_store, scores_store
from .zarr_io import _LOCK, _READY, Markers, done_cells, identity_digest, read_header

MAX_SEARCH_DEPTH = 3


def is_store(path: Path) -> bool:
    """Whether ``path`` is a Zarr group carrying fninfluence attributes (finished or not)."""
    return _attributes(Path(path)) is not None


def _attributes(path: Path) -> Optional[Dict[str, Any]]:
    meta = path / "zarr.json"
    if not meta.is_file():
        return None
    try:
        record = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    attributes = record.get("attributes", {}) if isinstance(record, dict) else {}
    header = attributes.get("fninfluence")
    return dict(header) if isinstance(header, dict) else None


def find_stores(path: Path, depth: int = MAX_SEARCH_DEPTH) -> List[Path]:
    """``path`` itself if it is a store, else the stores below it (up to ``depth`` folders down), sorted."""
    path = Path(path)
    if not path.exists():
        raise InfluenceError(f"{path} does not exist.")
    if is_store(path) or (path / _READY).exists() or (path / _LOCK).exists():
        return [path]
    found: List[Path] = []
    if depth > 0 and path.is_dir():
        try:
            children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:  # an unreadable folder holds no store we can show
            return found
        for child in children:
            found.extend(find_stores(child, depth - 1))
    return found


def _array_shapes(path: Path, folder: str) -> Dict[str, List[int]]:
    """``{array name: shape}`` of the arrays directly inside ``path/folder``, from their ``zarr.json``."""
    shapes = {}
    base = path / folder
    if base.is_dir():
        for meta in sorted(base.glob("*/zarr.json")):
            record = json.loads(meta.read_text())
            if isinstance(record, dict) and record.get("node_type") == "array":
                shapes[meta.parent.name] = list(record.get("shape", []))
    return shapes


def describe(path: Path) -> Dict[str, Any]:
    """A JSON-able summary of the store at ``path``: kind, arguments, layers, cells done and missing.

    Odd or truncated metadata raises an :class:`InfluenceError` that names the store (never another error)."""
    path = Path(path)
    try:
        return _describe(path)
    except InfluenceError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OSError) as error:
        raise InfluenceError(f"{path}: its metadata is odd or truncated ({type(error).__name__}: {error}), so it "
                             "cannot be described: it was damaged or not written by fninfluence. Recompute it "
                             "(overwrite=True), or restore it from a copy.") from None


def _describe(path: Path) -> Dict[str, Any]:
    header = _attributes(path)
    if header is None or not (path / _READY).exists():
        return {"path": str(path), "kind": "unfinished",
                "note": "its layout was never completed (a process stopped while creating it): delete it and rerun"}
    done = written_for_this_store(path, header)
    common = {"path": str(path), "kind": header.get("kind"), "library_version": header.get("library_version"),
              "format": header.get("format"), "arguments": header.get("arguments", {}),
              "complete": "complete" in done}
    if header.get("kind") == "factors":
        return {**common, **_describe_factors(path, header, done)}
    if header.get("kind") in ("pairwise", "self"):
        return {**common, **_describe_scores(header, done)}
    if header.get("kind") == "index":
        return {**common, **_describe_index(header, done)}
    raise InfluenceError(f"{path} holds {header.get('kind')!r} results, which this version does not know.")


def written_for_this_store(path: Path, header: Dict[str, Any]) -> set:
    """The cells whose markers were written for this store and cell (markers of other metadata, forged or
    copied ones count as missing). Cheap: their chunks are checked when the store is read or resumed."""
    keys = {"factors": factors_store.IDENTITY, "pairwise": scores_store.IDENTITY, "self": scores_store.IDENTITY,
            "index": index_store.IDENTITY}.get(header.get("kind"))
    if keys is None:
        return done_cells(path)
    markers = Markers(path, identity_digest(header, keys))
    return {cell for cell in done_cells(path) if markers.record(cell) is not None}


def _describe_factors(path: Path, header: Dict[str, Any], done) -> Dict[str, Any]:
    strategies = header.get("strategies") or {}
    plan = header.get("plan") or {}
    passes = []
    for name in header.get("passes", []):
        entry: Dict[str, Any] = {"name": name, "aggregated": f"pass-{name}" in done}
        if name in plan:
            data_parts, module_parts = plan[name]["data_partitions"], plan[name]["module_partitions"]
            cells = [cell.name for cell in cell_grid(name, data_parts, module_parts)]
            entry.update(examples=plan[name]["examples"], data_partitions=data_parts, module_partitions=module_parts,
                         cells_done=[c for c in cells if c in done], cells_missing=[c for c in cells if c not in done])
        passes.append(entry)
    aggregated = any(p["aggregated"] for p in passes)
    layers = []
    for record in header.get("layers", []):
        layers.append({
            "name": record["name"], "key": record["key"], "op": record.get("op"),
            "shape": [record.get("groups"), record.get("out_features"), record.get("in_features")],
            "strategy": strategies.get(record["name"], header.get("strategy")),
            "factors": _array_shapes(path, f"layers/{record['key']}") if aggregated else {},
        })
    return {"strategy": header.get("strategy"), "passes": passes, "layers": layers,
            "num_examples": header.get("num_examples")}


def _describe_scores(header: Dict[str, Any], done) -> Dict[str, Any]:
    partitions = header.get("partitions", {})
    data_parts, groups = partitions.get("data", 1), partitions.get("modules", [[]])
    kind = header["kind"]
    cells = [cell.name for cell in cell_grid(kind, data_parts, len(groups))]
    return {
        "shape": header.get("shape"), "dtype": header.get("dtype"), "per_module": header.get("per_module"),
        "layers": [record["name"] for record in header.get("layers", [])],
        "data_partitions": data_parts, "partition_size": partitions.get("partition_size"),
        "module_partitions": groups,
        "cells_done": [c for c in cells if c in done], "cells_missing": [c for c in cells if c not in done],
    }


def _describe_index(header: Dict[str, Any], done) -> Dict[str, Any]:
    cells = [cell.name for cell in cell_grid("index", header.get("partitions", {}).get("data", 1), None)]
    return {
        "rank": header.get("rank"), "dtype": header.get("dtype"), "examples": header.get("examples"),
        "layers": [{"name": r["name"], "width": r["width"], "shape": [r["groups"], r["out"], r["in"]]}
                   for r in header.get("layers", [])],
        "cells_done": [c for c in cells if c in done], "cells_missing": [c for c in cells if c not in done],
    }


def _format_index(info: Dict[str, Any], lines) -> str:
    total = len(info["cells_done"]) + len(info["cells_missing"])
    lines.append(f"  training-gradient index: {info['examples']} examples, rank {info['rank']}, stored as {info['dtype']}; "
                 f"{len(info['cells_done'])}/{total} cells done"
                 + (f"; missing: {', '.join(info['cells_missing'])}" if info["cells_missing"] else ""))
    lines.append(f"  layers ({len(info['layers'])}):")
    for layer in info["layers"]:
        groups, out, inp = layer["shape"]
        lines.append(f"    {layer['name'] or '(root)'}  groups {groups}, out {out}, in {inp}  pairs per example "
                     f"{layer['width']}")
    return "\n".join(lines)


def format_description(info: Dict[str, Any]) -> str:
    """``describe``'s summary as indented text."""
    lines = [f"{info['path']}: {info['kind']} store" + ("" if info["kind"] == "unfinished" else
             f" ({'complete' if info['complete'] else 'INCOMPLETE'}; written by fninfluence {info['library_version']})")]
    if info["kind"] == "unfinished":
        return "\n".join(lines + [f"  {info['note']}"])
    lines.append(f"  arguments: {_arguments_text(info['arguments'])}")
    if info["kind"] == "index":
        return _format_index(info, lines)
    if info["kind"] == "factors":
        lines.append(f"  strategy: {info['strategy']}")
        for entry in info["passes"]:
            status = "aggregated" if entry["aggregated"] else "not aggregated"
            if "cells_done" in entry:
                total = len(entry["cells_done"]) + len(entry["cells_missing"])
                lines.append(f"  pass {entry['name']}: {status}; {entry['examples']} examples in "
                             f"{entry['data_partitions']} data x {entry['module_partitions']} module partitions, "
                             f"{len(entry['cells_done'])}/{total} cells done"
                             + (f"; missing: {', '.join(entry['cells_missing'])}" if entry["cells_missing"] else ""))
            else:
                lines.append(f"  pass {entry['name']}: {status}")
        lines.append(f"  layers ({len(info['layers'])}):")
        for layer in info["layers"]:
            groups, out, inp = layer["shape"]
            lines.append(f"    {layer['name']}  [{layer['key']}]  {layer['op']}  groups {groups}, out {out}, in {inp}"
                         f"  strategy {layer['strategy']}")
            for name, shape in layer["factors"].items():
                lines.append(f"      {name} {shape or 'scalar'}")
        return "\n".join(lines)
    total = len(info["cells_done"]) + len(info["cells_missing"])
    lines.append(f"  scores: shape {info['shape']} ({_axes(info)}), {info['dtype']}"
                 + (", per module too" if info["per_module"] else ""))
    lines.append(f"  partitions: {info['data_partitions']} data (size {info['partition_size']}) x "
                 f"{len(info['module_partitions'])} module; {len(info['cells_done'])}/{total} cells done"
                 + (f"; missing: {', '.join(info['cells_missing'])}" if info["cells_missing"] else ""))
    lines.append(f"  layers ({len(info['layers'])}): {', '.join(name or '(root)' for name in info['layers'])}")
    return "\n".join(lines)


def _arguments_text(arguments: Dict[str, Any]) -> str:
    """Arguments as ``key=value`` pairs; the precision shows only the dtypes that were set."""
    shown = dict(arguments)
    if isinstance(shown.get("precision"), dict):
        chosen = {k: v for k, v in shown["precision"].items() if v is not None}
        shown["precision"] = chosen or "default"
    return ", ".join(f"{key}={json.dumps(value)}" for key, value in sorted(shown.items()))


def _axes(info: Dict[str, Any]) -> str:
    if info["kind"] == "self":
        return "training examples"
    return "queries x training examples" + (" x tokens" if len(info["shape"]) == 3 else "")


def read_ranked_scores(path: Path) -> Tuple[Dict[str, Any], torch.Tensor]:
    """``(header, scores)`` of a scores store as a ``[rows, N]`` float64 matrix with NaN where missing.

    Pairwise stores give ``[Q, N]`` (per-token scores summed over tokens); self-influence stores give
    ``[1, N]``. Incomplete stores are read as far as they are written (one module partition only).
    """
    header = _attributes(Path(path))
    if header is None or not isinstance(header.get("kind"), str) or header.get("kind") not in ("pairwise", "self"):
        kind = None if header is None else header.get("kind")
        raise InfluenceError(f"{path} is not a scores store (it holds {kind!r}); `top` ranks the training examples "
                             "of a pairwise or self-influence scores store.")
    scores = scores_store.read_scores(Path(path), allow_partial=True)["all_modules"].to(torch.float64)
    if header["kind"] == "self":
        scores = scores[None]
    elif scores.dim() == 3:
        scores = scores.sum(-1)  # NaN stays NaN: a missing example has every token missing
    return header, scores


def missing_cells(store) -> List[str]:
    """The cells of a factors or scores store that no job has finished yet (an empty list: all are done).

    For job arrays that fill one store through ``target_data_partitions`` / ``target_module_partitions``:
    once this is empty, one more call with the same arguments and no targets only aggregates (it sums the
    partial states or score partitions and marks the store ``complete``) and returns the result.
    Reads the store's JSON attributes and marker files only: a marker written for other metadata or another
    store (copied, forged) counts as missing; damaged chunks are found when the store is read or resumed.
    (Documented as :func:`fninfluence.distributed.missing_cells`, which re-exports it.)
    """
    header = read_header(Path(store))
    done = written_for_this_store(Path(store), header)
    if header.get("kind") == "factors":
        cells = [cell for name, plan in header["plan"].items()
                 for cell in cell_grid(name, plan["data_partitions"], plan["module_partitions"])]
    elif header.get("kind") in ("pairwise", "self"):
        partitions = header["partitions"]
        cells = cell_grid(header["kind"], partitions["data"], len(partitions["modules"]))
    else:
        raise InfluenceError(f"{store} holds {header.get('kind')!r} results, not factors or scores.")
    return [cell.name for cell in cells if cell.name not in done]
