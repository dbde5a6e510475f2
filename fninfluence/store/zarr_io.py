"""Zarr v3 on a local directory: layouts created once, chunks written by many, completion markers.

Concurrency model (several processes filling one store):

* the layout (groups, arrays, attributes) is written once, by whichever process wins an exclusive
  lock file; the others wait for its ``.fninfluence-ready`` file and then only check the attributes;
* after that, processes write only array chunks that belong to their own cells (data partitions are
  chunk-aligned) and one marker file per finished cell, so no two processes write the same file;
* zarr's LocalStore and the markers write to a temporary file and rename it, so a reader (or a process
  killed at any moment) never sees half a file. A cell whose marker is missing is recomputed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Set, Tuple

import numpy as np
import torch
import zarr

from ..errors import InfluenceError
from .fingerprint import differences

FORMAT_VERSION = 1
_READY = ".fninfluence-ready"
_LOCK = ".fninfluence-create.lock"
_DONE = "_done"
LOCK_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ArraySpec:
    shape: Tuple[int, ...]
    chunks: Tuple[int, ...]
    dtype: str
    fill_value: float = 0.0


# Zarr v3 has no bfloat16: such arrays hold the raw 16 bits as uint16, with this attribute naming the dtype.
DTYPE_ATTRIBUTE = "fninfluence_dtype"
_STORED_DTYPES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
                  torch.bfloat16: "bfloat16"}
_AS_BITS = {"bfloat16": ("uint16", torch.bfloat16, torch.int16)}  # name -> (zarr dtype, torch dtype, same-size int)


def numpy_dtype(dtype: torch.dtype) -> str:
    """The name an :class:`ArraySpec` gives to the dtype of a tensor stored as ``dtype`` (others: float32).

    ``"bfloat16"`` is laid out as raw ``uint16`` bits (see :func:`write_array`, :func:`read_array`)."""
    return _STORED_DTYPES.get(dtype, "float32")


def _zarr_layout(spec: ArraySpec) -> Tuple[str, Any, Dict[str, str]]:
    """``(zarr dtype, fill value, attributes)`` of an array spec: a bfloat16 fill value becomes its bits."""
    if spec.dtype not in _AS_BITS:
        return spec.dtype, spec.fill_value, {}
    stored, dtype, bits = _AS_BITS[spec.dtype]
    fill = int(torch.tensor(spec.fill_value, dtype=dtype).view(bits).item()) & 0xFFFF
    return stored, fill, {DTYPE_ATTRIBUTE: spec.dtype}


def _raw_bits_of(array) -> Optional[Tuple[str, torch.dtype, torch.dtype]]:
    name = array.attrs.get(DTYPE_ATTRIBUTE)
    if name is None:
        return None
    if name not in _AS_BITS or str(array.dtype) != _AS_BITS[name][0]:
        raise InfluenceError(f"Array {array.path!r} says it holds {name!r} as {array.dtype}, which this version "
                             "cannot decode: recompute it, or read it with the fninfluence version that wrote it.")
    return _AS_BITS[name]


def encode(array, value: torch.Tensor) -> np.ndarray:
    """``value`` as the numpy data of ``array``: cast to the array's dtype, bfloat16 as its raw bits."""
    data = value.detach().to("cpu")
    layout = _raw_bits_of(array)
    if layout is not None:
        _, dtype, bits = layout
        return data.to(dtype).contiguous().view(bits).numpy().view(np.uint16)
    if data.dtype == torch.bfloat16:  # numpy has no bfloat16; the array's own dtype decides what is kept
        data = data.float()
    return data.numpy()


def decode(array, values) -> torch.Tensor:
    """The tensor of ``values`` read from ``array`` (bfloat16 arrays from their raw bits). Nothing is executed:
    the dtype attribute is only looked up in a fixed table."""
    values = np.asarray(values)  # not ascontiguousarray: that turns a 0-d array into a 1-d one
    layout = _raw_bits_of(array)
    if layout is None:
        return torch.from_numpy(values)
    _, dtype, bits = layout
    return torch.from_numpy(values.copy(order="C").view(np.int16)).view(dtype)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _create(path: Path, header: Dict[str, Any], arrays: Dict[str, ArraySpec]) -> None:
    # mode "a", not "w": "w" empties the directory, deleting the lock file that other processes wait on
    root = zarr.open_group(str(path), mode="a")
    for name, spec in arrays.items():
        dtype, fill_value, attributes = _zarr_layout(spec)
        root.create_array(name, shape=spec.shape, chunks=spec.chunks, dtype=dtype, fill_value=fill_value,
                          attributes=attributes, overwrite=True)
    root.attrs["fninfluence"] = header
    _atomic_write_text(path / _READY, json.dumps({"created": time.time()}))


def _check_header(path: Path, stored: Dict[str, Any], header: Dict[str, Any], identity_keys: Iterable[str]) -> None:
    if stored.get("kind") != header.get("kind"):
        raise InfluenceError(
            f"{path} holds {stored.get('kind')!r} results, not {header.get('kind')!r}. Use another name, or "
            "overwrite=True to replace it."
        )
    lines = differences({k: stored.get(k) for k in identity_keys}, {k: header.get(k) for k in identity_keys})
    if lines:
        raise InfluenceError(
            f"{path} was computed with different arguments or data:\n  " + "\n  ".join(lines)
            + "\nPass overwrite=True (Kronfluence API: overwrite_output_dir=True) to recompute it, or use another name."
        )


def open_store(path: Path, header: Dict[str, Any], arrays: Dict[str, ArraySpec], *, overwrite: bool,
               identity_keys: Iterable[str]) -> zarr.Group:
    """Open the store at ``path``, creating its layout if it does not exist yet.

    An existing store must have been made with the same ``identity_keys`` of ``header`` (arguments,
    data and model fingerprints), or this raises an error that lists what differs.
    """
    path = Path(path)
    if overwrite and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / _READY).exists():
        lock = path / _LOCK
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            _wait_for_layout(path, lock)
        else:
            try:
                os.write(descriptor, json.dumps({"pid": os.getpid(), "time": time.time()}).encode())
                os.close(descriptor)
                _create(path, header, arrays)
                return zarr.open_group(str(path), mode="r+")
            finally:
                lock.unlink(missing_ok=True)
    group = zarr.open_group(str(path), mode="r+")
    _check_header(path, dict(group.attrs.get("fninfluence", {})), header, identity_keys)
    return group


def _wait_for_layout(path: Path, lock: Path) -> None:
    started = time.monotonic()
    while not (path / _READY).exists():
        if not lock.exists() and not (path / _READY).exists():
            raise InfluenceError(f"Another process started creating {path} and stopped before finishing; rerun.")
        if time.monotonic() - started > LOCK_TIMEOUT_S:
            raise InfluenceError(
                f"Waited {LOCK_TIMEOUT_S:.0f} s for another process to create the layout of {path}. If no other "
                f"process is creating it, delete {lock} and rerun."
            )
        time.sleep(0.05)


def read_header(path: Path) -> Dict[str, Any]:
    path = Path(path)
    if not (path / _READY).exists():
        raise InfluenceError(f"{path} is not a fninfluence store (or its creation did not finish).")
    return dict(zarr.open_group(str(path), mode="r").attrs.get("fninfluence", {}))


def write_array(group: zarr.Group, name: str, value: torch.Tensor, region: Optional[Tuple[slice, ...]] = None) -> None:
    array = group[name]
    array[region if region is not None else ...] = encode(array, value)


def read_array(group: zarr.Group, name: str, region=None) -> torch.Tensor:
    array = group[name]
    return decode(array, array[region if region is not None else ...])


def mark_done(path: Path, cell: str, info: Optional[Dict[str, Any]] = None) -> None:
    """Record that ``cell`` is complete. Written after the cell's arrays, and atomically."""
    _atomic_write_text(Path(path) / _DONE / f"{cell}.json", json.dumps({"time": time.time(), **(info or {})}))


def done_cells(path: Path) -> Set[str]:
    folder = Path(path) / _DONE
    if not folder.exists():
        return set()
    return {p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json") and not p.name.startswith(".")}
