"""Fingerprints of data and models, and arguments as JSON, so a store can tell when a rerun differs.

* ``data_fingerprint``: the size of the data and which examples of the base dataset (cheap: no reads);
* ``recording``: the content of the data, hashed as its batches are read anyway: one 8-byte BLAKE2b
  digest per example, of the bytes of every tensor of the batch at that example's row;
* ``model_fingerprint``: a SHA-256 of every parameter and buffer (all their bytes, not a sample), and a
  short digest per tensor so that an error can name what changed;
* ``weights_fingerprint``: two float64 sums per tracked parameter, which :class:`fninfluence.Factors` keep so that
  factors used with another model's weights are refused (cheap enough for every scoring call).
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import hashlib
import json
import math
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader, Subset

from ..capture import batch_examples
from ..errors import InfluenceError


def _indices(data: Any) -> Optional[list]:
    """The chain of Subset indices over the base dataset, flattened to base indices, or None."""
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, Subset):
        inner = _indices(data.dataset)
        own = [int(i) for i in data.indices]
        return own if inner is None else [inner[i] for i in own]
    return None


def _base(data: Any) -> Any:
    if isinstance(data, DataLoader):
        data = data.dataset
    while isinstance(data, Subset):
        data = data.dataset
    return data


def data_fingerprint(data: Any) -> Dict[str, Any]:
    """``{"size", "base_size", "indices_sha256"}``: how many examples, of what, and which ones."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    base = _base(data)
    indices = _indices(data)
    return {
        "size": len(dataset) if hasattr(dataset, "__len__") else None,
        "base_size": len(base) if hasattr(base, "__len__") else None,
        "indices_sha256": None if indices is None else hashlib.sha256(json.dumps(indices).encode()).hexdigest(),
    }


def _tensor_bytes(value: torch.Tensor) -> memoryview:
    """The raw bytes of ``value`` in row-major order (any dtype, bfloat16 included), without a copy on the host."""
    flat = value.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def model_fingerprint(model: nn.Module) -> Dict[str, Any]:
    """A SHA-256 of every parameter and buffer (name, dtype, shape and all bytes), and a 16-hex digest of
    each, so that a store can name the tensors that changed. Costs one read of the model's bytes (one copy
    to the host for a model on an accelerator)."""
    digest = hashlib.sha256()
    tensors: Dict[str, str] = {}
    named = list(model.named_parameters()) + [(f"buffer:{n}", b) for n, b in model.named_buffers()]
    for name, value in named:
        own = hashlib.sha256(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
        own.update(_tensor_bytes(value))
        tensors[name] = own.hexdigest()[:16]
        digest.update(own.digest())
    return {"parameters": sum(1 for n in tensors if not n.startswith("buffer:")), "values_sha256": digest.hexdigest(),
            "tensors": tensors}


# -- the content of the data, as it is read --------------------------------------------------------

EXAMPLE_DIGEST_BYTES = 8


class DataDigest:
    """Per-example digests of the batches read while it is recording, in order."""

    def __init__(self):
        self.raw = bytearray()  # EXAMPLE_DIGEST_BYTES per example, in order

    def update(self, batch: Any) -> None:
        for digest in example_digests(batch):
            self.raw += digest

    def hexdigest(self) -> str:
        """One digest of all the examples read (their number and content, in order)."""
        return hashlib.sha256(self.raw).hexdigest()

    def encoded(self) -> str:
        """The per-example digests, base64 (8 bytes each), for a marker."""
        return base64.b64encode(bytes(self.raw)).decode()


def example_digests(batch: Any) -> List[bytes]:
    """One digest per example of ``batch``: every tensor (or array) with the batch in dimension 0 contributes
    its row; other leaves (strings, scalars, tensors without a batch dimension) go into every example's digest."""
    leaves, spec = tree_flatten(batch)
    try:
        n = batch_examples(batch)
    except InfluenceError:
        return []  # the data loop refuses such a batch itself
    shared = hashlib.blake2b(str(spec).encode(), digest_size=16)
    rows = []
    for leaf in leaves:
        if hasattr(leaf, "__array__") and not isinstance(leaf, torch.Tensor):
            leaf = torch.as_tensor(leaf)
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1 and leaf.shape[0] == n:
            flat = leaf.detach().to("cpu").contiguous().reshape(n, -1)
            shared.update(f"{leaf.dtype}|{tuple(leaf.shape[1:])}".encode())
            rows.append(flat.view(torch.uint8).numpy() if flat.shape[1] else None)
        elif isinstance(leaf, torch.Tensor):
            shared.update(f"{leaf.dtype}|{tuple(leaf.shape)}".encode())
            shared.update(_tensor_bytes(leaf))
        else:
            shared.update(repr(leaf).encode())
    prefix = shared.digest()
    out = []
    for i in range(n):
        h = hashlib.blake2b(prefix, digest_size=EXAMPLE_DIGEST_BYTES)
        for block in rows:
            if block is not None:
                h.update(block[i].tobytes())
        out.append(h.digest())
    return out


_RECORDING: contextvars.ContextVar[Optional[DataDigest]] = contextvars.ContextVar("fninfluence_data_digest",
                                                                                   default=None)


@contextlib.contextmanager
def recording() -> Iterator[DataDigest]:
    """Record the digests of every batch read inside the block (the innermost block records)."""
    digest = DataDigest()
    token = _RECORDING.set(digest)
    try:
        yield digest
    finally:
        _RECORDING.reset(token)


def record(batch: Any) -> None:
    """Called by the data loop on every batch, on the host: a no-op unless a :func:`recording` is active."""
    digest = _RECORDING.get()
    if digest is not None:
        digest.update(batch)


def jsonable(value: Any) -> Any:
    """Arguments as plain JSON: dtypes and other objects become strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def differences(stored: Dict[str, Any], current: Dict[str, Any], prefix: str = "") -> list:
    """Human-readable ``key: stored -> current`` lines for every difference."""
    lines = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} (stored) vs {b!r} (now)")
    return lines


def factors_fingerprint(factors: Any) -> Dict[str, Any]:
    """Strategy, layers and a hash of a sample of every factor's values."""
    digest = hashlib.sha256()
    for layer in sorted(factors.tensors):
        for name in sorted(factors.tensors[layer]):
            value = factors.tensors[layer][name].detach().flatten()
            sample = value[:: max(1, value.numel() // 4096)][:4096]
            digest.update(f"{layer}/{name}".encode())
            digest.update(sample.to("cpu", torch.float64).numpy().tobytes())
    return {"strategy": factors.strategy, "layers": sorted(factors.layers), "values_sha256": digest.hexdigest()}


# -- the tracked weights of the model factors were fitted on, cheaply ---------------------------------

#: relative difference of the float64 sums above which two tensors are different weights (reduction order and
#: device change the sums by ~1e-15; a cast to float64 changes nothing; any training step or a cast to 16 bits more)
WEIGHTS_RTOL = 1e-9
_CHUNK = 1 << 22


def tracked_parameter_names(specs: Mapping[str, Any]) -> List[str]:
    """The parameters of the layers ``specs`` (:class:`~fninfluence.capture.LayerSpec`), each once, in order."""
    names: List[str] = []
    for spec in specs.values():
        for name in (spec.weight, spec.bias, *getattr(spec, "parameters", ())):
            if name is not None and name not in names:
                names.append(name)
    return names


def _chunk_size(numel: int) -> int:
    """Elements per float64 chunk: a 64th of the tensor (at least 4096, at most ``_CHUNK``), so that the float64
    temporaries stay a small fraction of the tensor itself (they count towards a scoring call's peak memory)."""
    return min(_CHUNK, max(1 << 12, -(-numel // 64)))


def weights_fingerprint(params: Mapping[str, torch.Tensor], names: Sequence[str]) -> Optional[Dict[str, Any]]:
    """``{parameter name: [sum, sum of squares]}`` of ``params[name]`` in float64, for ``names``: what factors keep of
    the model they were fitted on. Cheap: two reductions per tensor on its own device (in chunks, so no float64 copy
    of a whole tensor) and one transfer for all. None for sharded (DTensor) parameters; a non-finite tensor gets
    None (never compared)."""
    tensors = [(name, params[name].detach()) for name in names if name in params]
    if not tensors or any(type(t).__name__ == "DTensor" for _, t in tensors):
        return None
    sums = []
    for _, tensor in tensors:
        flat = tensor.reshape(-1)
        total = torch.zeros((), dtype=torch.float64, device=tensor.device)
        squares = torch.zeros((), dtype=torch.float64, device=tensor.device)
        for chunk in flat.split(_chunk_size(flat.numel())):
            wide = chunk.to(torch.float64)
            total = total + wide.sum()
            squares = squares + wide.square().sum()
        sums.append(torch.stack([total, squares]).cpu())
    values = torch.stack(sums).tolist()
    return {name: (pair if all(math.isfinite(v) for v in pair) else None) for (name, _), pair in zip(tensors, values)}


def weights_differences(fitted: Mapping[str, Any], now: Mapping[str, Any], sizes: Mapping[str, int]) -> Dict[str, str]:
    """``{parameter: "sum a, sum of squares b when fitted; c, d now"}`` for every parameter whose fingerprints
    (:func:`weights_fingerprint`) differ; parameters missing from either side, or non-finite, are not compared."""
    differ = {}
    for name, then in fitted.items():
        current = now.get(name)
        if not _pair(then) or not _pair(current):
            continue
        squares = max(then[1], current[1])
        if abs(then[0] - current[0]) > WEIGHTS_RTOL * math.sqrt(max(sizes.get(name, 1), 1) * squares) or \
                abs(then[1] - current[1]) > WEIGHTS_RTOL * squares:
            differ[name] = (f"sum {then[0]:.6g}, sum of squares {then[1]:.6g} when fitted; "
                            f"{current[0]:.6g}, {current[1]:.6g} now")
    return differ


def _pair(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and \
        all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
