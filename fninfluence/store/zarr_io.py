"""Zarr v3 on a local directory: layouts created once, chunks written by many, completion markers.

Concurrency model (several processes filling one store):

* the layout (groups, arrays, attributes) is written once, by whichever process wins an exclusive
  lock file (it records the owner's pid and host, so a lock left by a killed process is broken); the
  others wait for its ``.fninfluence-ready`` file and then only check the attributes;
* after that, processes write only array chunks that belong to their own cells (data partitions are
  chunk-aligned) and one marker file per finished cell, so no two processes write the same file;
* zarr's LocalStore and the markers write to a temporary file and rename it, so a reader (or a process
  killed at any moment) never sees half a file. A cell whose marker is missing is recomputed.

Trust: every chunk ends with a CRC32C checksum (zarr's ``crc32c`` codec), and a marker certifies what it
covers: the digest of the store's identity (arguments, data and model fingerprints) and a SHA-256 digest
of every chunk file it covers (``None`` for a chunk zarr did not write because it equals the fill value).
A marker whose chunks are missing, changed, or that belongs to another store certifies nothing: its cell
counts as missing and is recomputed (or reading it raises an error that names it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from ..errors import InfluenceError
from .fingerprint import differences

FORMAT_VERSION = 2
_READY = ".fninfluence-ready"
_LOCK = ".fninfluence-create.lock"
_DONE = "_done"
LOCK_TIMEOUT_S = 300.0
MAX_DIFFERENCE_LINES = 12


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
    values = np.asarray(values, order="C")  # not ascontiguousarray: it turns a 0-d array into 1-d
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


# -- what is a store, and deleting one ---------------------------------------------------------------

def store_header(path: Path) -> Optional[Dict[str, Any]]:
    """The ``fninfluence`` attributes of the Zarr group at ``path``, or None if it is not one of our stores."""
    meta = Path(path) / "zarr.json"
    try:
        record = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    attributes = record.get("attributes") if isinstance(record, dict) else None
    header = attributes.get("fninfluence") if isinstance(attributes, dict) else None
    return dict(header) if isinstance(header, dict) else None


def is_store(path: Path) -> bool:
    """Whether ``path`` is recognisably an fninfluence store: our Zarr attributes, or our ready or lock file
    (a layout whose creation was interrupted)."""
    path = Path(path)
    return path.is_dir() and (store_header(path) is not None or (path / _READY).exists() or (path / _LOCK).exists())


def remove_store(path: Path) -> None:
    """Delete the store at ``path`` (for ``overwrite=True``); refuse to delete anything that is not one.

    A missing path or an empty folder is fine. A folder without fninfluence's metadata may hold the user's
    own files (code, papers): it is never deleted.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return
    if path.is_symlink() or not path.is_dir() or not is_store(path):
        held = sorted(p.name for p in path.iterdir())[:5] if path.is_dir() and not path.is_symlink() else []
        raise InfluenceError(
            f"overwrite=True would delete {path}, which is not an fninfluence store (no zarr.json with fninfluence "
            f"attributes{'; it holds ' + ', '.join(held) + ', ...' if held else ''}), so it is left alone. Choose "
            "another path for the store, or move that folder away yourself."
        )
    shutil.rmtree(path)


# -- the layout, created once under a lock ----------------------------------------------------------

def _codecs() -> List[Any]:
    """Compression, then a CRC32C of the compressed bytes: a flipped byte fails to decode instead of
    reading as another number."""
    return [ZstdCodec(level=0, checksum=False), Crc32cCodec()]


def _same_array(array: Any, spec: ArraySpec) -> bool:
    try:
        check_array(Path("."), "", array)
        dtype, fill_value, attributes = _zarr_layout(spec)  # as stored: bfloat16 as raw bits
        fill = np.asarray(array.fill_value, dtype=np.float64)
        return (tuple(array.shape) == tuple(spec.shape) and tuple(array.chunks) == tuple(spec.chunks)
                and np.dtype(array.dtype) == np.dtype(dtype)
                and array.attrs.get(DTYPE_ATTRIBUTE) == attributes.get(DTYPE_ATTRIBUTE)
                and np.array_equal(fill, np.asarray(fill_value, dtype=np.float64), equal_nan=True)
                and any(isinstance(c, Crc32cCodec) for c in array.metadata.codecs))
    except (TypeError, ValueError, AttributeError, InfluenceError):
        return False


def _existing_array(root: zarr.Group, name: str) -> Optional[Any]:
    try:
        node = root[name]
    except (KeyError, ValueError, OSError, TypeError):
        return None
    return node if isinstance(node, zarr.Array) else None


def _create(path: Path, header: Dict[str, Any], arrays: Dict[str, ArraySpec], identity_keys: Iterable[str]) -> None:
    """Write the layout. An array already there with the same spec is kept, never reset: a store copied
    without its ready file, or a creation that was interrupted, keeps its chunks (and the markers that
    certify them)."""
    # mode "a", not "w": "w" empties the directory, deleting the lock file that other processes wait on
    root = zarr.open_group(str(path), mode="a")
    stored = root.attrs.get("fninfluence")
    if isinstance(stored, dict):
        _check_header(path, dict(stored), header, identity_keys)
    for name, spec in arrays.items():
        existing = _existing_array(root, name)
        if existing is not None and _same_array(existing, spec):
            continue
        dtype, fill_value, attributes = _zarr_layout(spec)
        root.create_array(name, shape=spec.shape, chunks=spec.chunks, dtype=dtype, fill_value=fill_value,
                          attributes=attributes, compressors=_codecs(), overwrite=True)
    root.attrs["fninfluence"] = header
    _atomic_write_text(path / _READY, json.dumps({"created": time.time()}))


def _check_header(path: Path, stored: Dict[str, Any], header: Dict[str, Any], identity_keys: Iterable[str]) -> None:
    if stored.get("kind") != header.get("kind"):
        raise InfluenceError(
            f"{path} holds {stored.get('kind')!r} results, not {header.get('kind')!r}. Use another name, or "
            "overwrite=True to replace it."
        )
    if stored.get("format") != header.get("format"):
        raise InfluenceError(
            f"{path} was written in store format {stored.get('format')!r} (this version writes "
            f"{header.get('format')!r}, with chunk checksums and data fingerprints). Pass overwrite=True to recompute "
            "it, or use another name."
        )
    lines = differences({k: stored.get(k) for k in identity_keys}, {k: header.get(k) for k in identity_keys})
    if lines:
        shown = lines[:MAX_DIFFERENCE_LINES] + ([f"... and {len(lines) - MAX_DIFFERENCE_LINES} more"]
                                                if len(lines) > MAX_DIFFERENCE_LINES else [])
        raise InfluenceError(
            f"{path} was computed with different arguments, data or model:\n  " + "\n  ".join(shown)
            + _fisher_default_hint(lines)
            + "\nPass overwrite=True (Kronfluence API: overwrite_output_dir=True) to recompute it, or use another name."
        )


def _fisher_default_hint(difference_lines: Iterable[str]) -> str:
    """Stores written before 0.2 fitted the true Fisher by default; a call with today's default is refused by
    them, and the refusal should say which argument brings the old result back."""
    if any(line.endswith("use_empirical_fisher: False (stored) vs True (now)") for line in difference_lines):
        return ("\nThe store fitted the true Fisher, and fit_factors now fits the empirical Fisher by default (since "
                "fninfluence 0.2): pass use_empirical_fisher=False to reuse it.")
    return ""


def _start_time(pid: int) -> Optional[str]:
    """The start time of process ``pid`` (Linux), so a pid reused by another process is not taken for the owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner() -> Dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()), "time": time.time()}


def _owner_alive(record: Dict[str, Any]) -> bool:
    """False only when the owner is known dead: on this host, with its pid gone (or reused by another process)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return True  # another machine (a shared file system): only the timeout can tell
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = _start_time(record["pid"])
    return record.get("start") is None or started is None or started == record["start"]


def _acquire(lock: Path) -> bool:
    """Create ``lock`` holding this process's pid and host, atomically (a hard link of a complete file):
    True if this process now owns it."""
    text = json.dumps(_owner())
    tmp = lock.with_name(f"{lock.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: an exclusive create, then the record
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.write(descriptor, text.encode())
        os.close(descriptor)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _break_if_stale(lock: Path) -> bool:
    """Remove ``lock`` if its owner is dead; True if it was removed (by this process or another)."""
    try:
        text = lock.read_text()
        record = json.loads(text)
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or _owner_alive(record):
        return False
    stale = lock.with_name(f"{lock.name}.{uuid.uuid4().hex}.stale")
    try:
        os.rename(lock, stale)
    except FileNotFoundError:
        return True
    if stale.read_text() != text:  # another waiter broke it and a new owner took it meanwhile: give it back
        try:
            os.link(stale, lock)
        except FileExistsError:
            pass
    stale.unlink(missing_ok=True)
    return True


def open_store(path: Path, header: Dict[str, Any], arrays: Dict[str, ArraySpec], *, overwrite: bool,
               identity_keys: Iterable[str]) -> zarr.Group:
    """Open the store at ``path``, creating its layout if it does not exist yet.

    An existing store must have been made with the same ``identity_keys`` of ``header`` (arguments,
    data and model fingerprints), or this raises an error that lists what differs. ``overwrite`` deletes
    the store first, and refuses to delete a folder that is not a store.
    """
    path = Path(path)
    if overwrite:
        remove_store(path)
    path.mkdir(parents=True, exist_ok=True)
    lock = path / _LOCK
    started = time.monotonic()
    while not (path / _READY).exists():
        if _acquire(lock):
            try:
                if not (path / _READY).exists():
                    _create(path, header, arrays, identity_keys)
            finally:
                lock.unlink(missing_ok=True)
            break
        if _break_if_stale(lock):
            continue
        if time.monotonic() - started > LOCK_TIMEOUT_S:
            raise InfluenceError(
                f"Waited {LOCK_TIMEOUT_S:.0f} s for another process to create the layout of {path} (its lock {lock} "
                "names a live process or another host). If no other process is creating it, delete the lock and rerun."
            )
        time.sleep(0.05)
    group = zarr.open_group(str(path), mode="r+")
    _check_header(path, dict(group.attrs.get("fninfluence", {})), header, identity_keys)
    return group


def read_header(path: Path) -> Dict[str, Any]:
    path = Path(path)
    if not (path / _READY).exists():
        raise InfluenceError(f"{path} is not a fninfluence store (or its creation did not finish).")
    header = store_header(path)
    if header is None:
        raise InfluenceError(f"{path} has no readable fninfluence metadata (zarr.json is missing or damaged): "
                             "recompute it with overwrite=True.")
    return header


def write_array(group: zarr.Group, name: str, value: torch.Tensor, region: Optional[Tuple[slice, ...]] = None) -> None:
    array = group[name]
    array[region if region is not None else ...] = encode(array, value)


def read_array(group: zarr.Group, name: str, region=None) -> torch.Tensor:
    array = group[name]
    return decode(array, array[region if region is not None else ...])


# -- completion markers that certify their chunks --------------------------------------------------

def identity_digest(header: Dict[str, Any], identity_keys: Iterable[str]) -> str:
    """SHA-256 of the identity fields of ``header``: a marker carries it, so a marker copied from another
    store (other arguments, data or model) certifies nothing here."""
    fields = {k: header.get(k) for k in identity_keys}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def chunk_files(group: zarr.Group, name: str, region: Optional[Tuple[slice, ...]] = None) -> List[str]:
    """The chunk files (relative to the store) that hold ``region`` of array ``name`` (all of it if None)."""
    array = group[name]
    shape, chunks = tuple(array.shape), tuple(array.chunks)
    region = tuple(region or ()) + (slice(None),) * (len(shape) - len(region or ()))
    ranges = []
    for size, chunk, part in zip(shape, chunks, region):
        start, stop, _ = part.indices(size)
        ranges.append(range(start // chunk, -(-stop // chunk)) if stop > start else range(0))
    coords: List[Tuple[int, ...]] = [()]
    for r in ranges:
        coords = [c + (i,) for c in coords for i in r]
    return [f"{name}/{array.metadata.encode_chunk_key(c)}" for c in coords]


_DIGESTS: Dict[Tuple[str, int, int, int], str] = {}
_MAX_CACHED_DIGESTS = 1 << 16
_RECENT_NS = 5_000_000_000


def _file_digest(path: Path) -> Optional[str]:
    """SHA-256 (32 hex) of a chunk file; None if it does not exist. A file is hashed once while its inode, size
    and modification time stay the same (zarr replaces chunks by renaming, so a rewrite is a new key); files
    modified in the last seconds are not cached, since file systems keep coarse times (an edit in place within
    the same tick would keep the key)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None  # zarr does not write a chunk equal to the fill value: it reads back as exactly that
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:32]
        except FileNotFoundError:
            return None
        if time.time_ns() - stat.st_mtime_ns < _RECENT_NS:
            return digest
        if len(_DIGESTS) >= _MAX_CACHED_DIGESTS:
            _DIGESTS.clear()
        _DIGESTS[key] = digest
    return _DIGESTS[key]


def mark_done(path: Path, cell: str, info: Optional[Dict[str, Any]] = None, *, chunks: Sequence[str] = (),
              identity: Optional[str] = None) -> None:
    """Record that ``cell`` is complete, certifying ``chunks`` (written before it) and the store identity."""
    record = {"time": time.time(), **(info or {}), "cell": cell, "identity": identity,
              "chunks": {name: _file_digest(Path(path) / name) for name in chunks}}
    _atomic_write_text(Path(path) / _DONE / f"{cell}.json", json.dumps(record))


def done_cells(path: Path) -> Set[str]:
    """Every cell with a marker file (certified or not: see :class:`Markers`)."""
    folder = Path(path) / _DONE
    if not folder.exists():
        return set()
    return {p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json") and not p.name.startswith(".")}


def marker_problem(path: Path, cell: str, identity: str, expected: Optional[Sequence[str]] = None) -> Optional[str]:
    """None if ``cell``'s marker certifies its chunks as they are now (exactly the ``expected`` chunks, when
    given: a marker copied from another cell certifies the wrong ones), else what is wrong with it."""
    try:
        record = json.loads((Path(path) / _DONE / f"{cell}.json").read_text())
    except FileNotFoundError:
        return "no marker"
    except (OSError, ValueError):
        return "its marker is not readable JSON"
    if not isinstance(record, dict) or not isinstance(record.get("chunks"), dict):
        return "its marker certifies no chunks (written by hand or by an older version)"
    if record.get("identity") != identity:
        return ("its marker was written for other metadata (arguments, layers, data or model): the metadata changed, "
                "or the marker comes from another store")
    if record.get("cell") != cell or (expected is not None and set(record["chunks"]) != set(expected)):
        return "its marker certifies the chunks of another cell"
    for name, digest in record["chunks"].items():
        if not isinstance(name, str) or ".." in name.split("/") or name.startswith("/"):
            return f"its marker names an invalid chunk {name!r}"
        now = _file_digest(Path(path) / name)
        if now != digest:
            return f"chunk {name} is {'missing' if now is None else 'changed' if digest else 'unexpected'}"
    return None


def read_marker(path: Path, cell: str) -> Dict[str, Any]:
    try:
        record = json.loads((Path(path) / _DONE / f"{cell}.json").read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


class Markers:
    """The certified markers of one store, each checked once while its file stays the same."""

    def __init__(self, path: Path, identity: str, expected: Optional[Callable[[str], Optional[Sequence[str]]]] = None):
        self.path, self.identity, self.expected = Path(path), identity, expected
        self._checked: Dict[str, Tuple[Any, Optional[str]]] = {}

    def problem(self, cell: str) -> Optional[str]:
        marker = self.path / _DONE / f"{cell}.json"
        try:
            stat = marker.stat()
            key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except FileNotFoundError:
            return "no marker"
        cached = self._checked.get(cell)
        if cached is None or cached[0] != key:
            try:
                expected = None if self.expected is None else self.expected(cell)
            except (KeyError, ValueError, IndexError, TypeError, AttributeError):
                cached = (key, "its marker names a cell this store does not have (or the metadata is damaged)")
            else:
                cached = (key, marker_problem(self.path, cell, self.identity, expected))
            self._checked[cell] = cached
        return cached[1]

    def done(self, cell: str) -> bool:
        return self.problem(cell) is None

    def record(self, cell: str) -> Optional[Dict[str, Any]]:
        """``cell``'s marker if it was written for this store and this cell, without reading its chunks (enough to
        compare the data fingerprints it records); None otherwise."""
        record = read_marker(self.path, cell)
        return record if record.get("identity") == self.identity and record.get("cell") == cell else None

    def damaged(self, cells: Iterable[str]) -> Dict[str, str]:
        """``{cell: problem}`` of the cells among ``cells`` that have a marker which certifies nothing."""
        return {cell: problem for cell in cells if (problem := self.problem(cell)) not in (None, "no marker")}

    def mark(self, cell: str, chunks: Sequence[str], info: Optional[Dict[str, Any]] = None) -> None:
        mark_done(self.path, cell, info, chunks=chunks, identity=self.identity)


def memory_bytes() -> int:
    """This machine's physical memory (a bound on what a store may ask to allocate)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def check_allocation(path: Path, arrays: Sequence[Tuple[Sequence[int], Any]]) -> None:
    """Refuse to read arrays (``(shape, dtype)`` pairs) whose total size exceeds this machine's memory: the
    metadata of a damaged or crafted store would otherwise allocate it (or fail deep inside numpy)."""
    total = 0
    for shape, dtype in arrays:
        count = 1
        for size in shape:
            if not isinstance(size, (int, np.integer)) or size < 0:
                raise InfluenceError(f"{path}: an array has shape {list(shape)} in its metadata, which is not a shape: "
                                     "the store is damaged or crafted. Recompute it (overwrite=True).")
            count *= int(size)
        total += count * np.dtype(dtype).itemsize
    if total > memory_bytes():
        raise InfluenceError(
            f"{path}: reading it would allocate {total / 2 ** 30:.1f} GiB, more than this machine's "
            f"{memory_bytes() / 2 ** 30:.1f} GiB of memory: its metadata is damaged or crafted, or it belongs on a "
            "larger machine. Check the store (fninfluence inspect), or recompute it (overwrite=True)."
        )


SAFE_CODECS = ("BytesCodec", "ZstdCodec", "Crc32cCodec", "GzipCodec", "BloscCodec", "TransposeCodec")


def check_array(path: Path, name: str, array: Any) -> None:
    """Refuse an array whose metadata asks for anything but numbers through plain codecs: a crafted store
    could name a codec that unpickles (numcodecs registers one), and loading must never execute code."""
    codecs = [type(codec).__name__ for codec in getattr(array.metadata, "codecs", ())]
    unsafe = [c for c in codecs if c not in SAFE_CODECS]
    if unsafe or np.dtype(array.dtype).kind not in "fiub":
        raise InfluenceError(
            f"{path}: the array {name} is stored as {array.dtype} through codecs {codecs}; fninfluence stores only "
            f"numbers through {', '.join(SAFE_CODECS)}, so it is not read (the store is crafted or damaged). "
            "Recompute it (overwrite=True)."
        )
