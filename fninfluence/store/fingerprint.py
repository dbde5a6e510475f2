"""Fingerprints of data and models, and arguments as JSON, so a store can tell when a rerun differs."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset


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


def model_fingerprint(model: nn.Module) -> Dict[str, Any]:
    """Parameter names, shapes and a hash of a sample of their values (cheap even for large models)."""
    digest = hashlib.sha256()
    shapes = {}
    for name, p in model.named_parameters():
        shapes[name] = list(p.shape)
        sample = p.detach().flatten()[:: max(1, p.numel() // 4096)][:4096]
        digest.update(name.encode())
        digest.update(sample.to("cpu", torch.float64).numpy().tobytes())
    return {"parameters": len(shapes), "values_sha256": digest.hexdigest()}


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
