"""Factors on disk: the final factors of every layer, and the partial sums of each fitting cell.

Layout (a Zarr v3 group; see docs/storage.md)::

    <store>/zarr.json                        attributes["fninfluence"]: kind, strategy, layers, arguments, plan,
                                             data and model fingerprints, library and format versions
    <store>/layers/<layer key>/<factor>      final factors, e.g. activation_eigenvectors [groups, in, in]
    <store>/passes/<pass>/<layer key>/<state> partial sums, one chunk per data partition: [partitions, ...]
    <store>/_done/<cell>.json                a cell's completion marker (written after its chunks)
    <store>/_done/pass-<pass>.json           a pass is aggregated and its factors written
    <store>/_done/complete.json              every pass is complete

Layer keys are ``layer0000``, ``layer0001``, ... in model order; ``layers`` in the attributes maps them
to module names. Loading reads only JSON and numeric arrays: nothing is unpickled or executed.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch
from torch import nn

from ..capture import LayerSpec
from ..curvature import pass_order
from ..errors import InfluenceError
from .fingerprint import data_fingerprint, jsonable, model_fingerprint
from .zarr_io import (FORMAT_VERSION, ArraySpec, done_cells, mark_done, numpy_dtype, open_store, read_array,
                      read_header, write_array)

IDENTITY = ("kind", "strategy", "strategies", "layers", "arguments", "plan", "data", "model")


def _label(estimators) -> str:
    names = sorted({e.name for e in estimators.values()})
    return names[0] if len(names) == 1 else "mixed"


def _version() -> str:
    from .. import __version__

    return __version__


def layer_keys(names: Sequence[str]) -> Dict[str, str]:
    return {name: f"layer{i:04d}" for i, name in enumerate(names)}


def _spec_record(spec: LayerSpec, key: str) -> Dict[str, Any]:
    record = asdict(spec)
    record["weight_shape"] = list(spec.weight_shape)
    record["parameters"] = list(spec.parameters)
    record["key"] = key
    return record


def _spec_from_record(record: Dict[str, Any]) -> LayerSpec:
    fields = {k: v for k, v in record.items() if k != "key"}
    fields["weight_shape"] = tuple(fields["weight_shape"])
    fields["parameters"] = tuple(fields.get("parameters", ()))
    return LayerSpec(**fields)


def _meta_outputs(estimators, specs: Dict[str, LayerSpec], state_dtypes: Dict[str, torch.dtype]):
    """Shapes and dtypes of every pass's state and outputs, per layer that has the pass, from a run on the
    meta device: ``states[pass][layer]``, ``outputs[pass][layer]``."""
    meta = torch.device("meta")
    states: Dict[str, Dict[str, Dict[str, torch.Tensor]]] = {}
    outputs: Dict[str, Dict[str, Dict[str, torch.Tensor]]] = {}
    earlier = {layer: {} for layer in specs}
    for name in pass_order(estimators):
        states[name], outputs[name] = {}, {}
        for layer, spec in specs.items():
            for fit_pass in estimators[layer].passes:
                if fit_pass.name == name:
                    states[name][layer] = fit_pass.init(spec.shape, state_dtypes.get(name, torch.float64), meta)
                    outputs[name][layer] = fit_pass.finalize(states[name][layer], earlier[layer])
                    earlier[layer] = {**earlier[layer], **outputs[name][layer]}
    return states, outputs


class FitStore:
    """A factors store being filled, cell by cell."""

    def __init__(self, path: Path, group, keys: Dict[str, str], states, outputs, plan):
        self.path, self.group, self.keys = path, group, keys
        self.states, self.outputs, self.plan = states, outputs, plan

    # cells
    def cell_done(self, cell: str) -> bool:
        return cell in done_cells(self.path)

    def write_cell(self, pass_name: str, data_index: int, states: Dict[str, Dict[str, torch.Tensor]], cell: str,
                   examples: int) -> None:
        for layer, state in states.items():
            for name, value in state.items():
                write_array(self.group, f"passes/{pass_name}/{self.keys[layer]}/{name}", value[None],
                            (slice(data_index, data_index + 1),))
        mark_done(self.path, cell, {"examples": examples})

    def _cells(self, pass_name: str, data_parts: int, module_parts: int) -> List[str]:
        return [f"{pass_name}-data{d}-modules{m}" for m in range(module_parts) for d in range(data_parts)]

    def missing_cells(self, pass_name: str, data_parts: int, module_parts: int) -> List[str]:
        done = done_cells(self.path)
        return [c for c in self._cells(pass_name, data_parts, module_parts) if c not in done]

    def all_cells_done(self, pass_name: str, data_parts: int, module_parts: int) -> bool:
        return not self.missing_cells(pass_name, data_parts, module_parts)

    def sum_partials(self, pass_name: str, layers=None) -> Dict[str, Dict[str, torch.Tensor]]:
        """The partial states of every data partition, summed: of every layer of the pass, or of ``layers``."""
        return {
            layer: {name: read_array(self.group, f"passes/{pass_name}/{self.keys[layer]}/{name}").sum(0)
                    for name in state}
            for layer, state in self.states[pass_name].items() if layers is None or layer in layers
        }

    # passes
    def pass_complete(self, pass_name: str) -> bool:
        return f"pass-{pass_name}" in done_cells(self.path)

    def write_pass_outputs(self, pass_name: str, outputs: Dict[str, Dict[str, torch.Tensor]], mark: bool = True) -> None:
        """Write the final factors of ``outputs``' layers; ``mark=False`` leaves marking the pass done to the
        caller (distributed runs write their layers from several ranks, then mark once)."""
        for layer, tensors in outputs.items():
            for name, value in tensors.items():
                write_array(self.group, f"layers/{self.keys[layer]}/{name}", value)
        if mark:
            self.mark_pass_done(pass_name)

    def mark_pass_done(self, pass_name: str) -> None:
        mark_done(self.path, f"pass-{pass_name}", {"examples": self._examples(pass_name)})

    def merge_pass_outputs(self, pass_name: str, factors: Dict[str, Dict[str, torch.Tensor]]):
        produced = self.outputs[pass_name]
        return {
            layer: {**factors.get(layer, {}),
                    **{name: read_array(self.group, f"layers/{key}/{name}") for name in produced.get(layer, {})}}
            for layer, key in self.keys.items()
        }

    def _examples(self, pass_name: str) -> int:
        import json

        total = 0
        for marker in (self.path / "_done").glob(f"{pass_name}-data*-modules0.json"):
            total += int(json.loads(marker.read_text()).get("examples", 0))
        return total

    def num_examples(self) -> int:
        names = list(self.plan)
        return self._examples(names[-1]) if names else 0

    def mark_complete(self) -> None:
        if "complete" not in done_cells(self.path):
            mark_done(self.path, "complete")


def open_fit(path: Path, *, model: nn.Module, data, estimators, specs: Dict[str, LayerSpec], plan, arguments,
             state_dtypes: Dict[str, torch.dtype], overwrite: bool) -> FitStore:
    keys = layer_keys(list(specs))
    states, outputs = _meta_outputs(estimators, specs, state_dtypes)
    arrays: Dict[str, ArraySpec] = {}
    for pass_name in pass_order(estimators):
        _, data_parts, _ = plan[pass_name]
        for layer, state in states[pass_name].items():
            for name, meta in state.items():
                shape = tuple(meta.shape)
                arrays[f"passes/{pass_name}/{keys[layer]}/{name}"] = ArraySpec(
                    (data_parts,) + shape, (1,) + shape, numpy_dtype(meta.dtype))
        for layer, produced in outputs[pass_name].items():
            for name, meta in produced.items():
                shape = tuple(meta.shape)
                arrays[f"layers/{keys[layer]}/{name}"] = ArraySpec(shape, shape, numpy_dtype(meta.dtype))
    header = {
        "kind": "factors",
        "format": FORMAT_VERSION,
        "library_version": _version(),
        "strategy": _label(estimators),
        "strategies": {layer: e.name for layer, e in estimators.items()},
        "passes": pass_order(estimators),
        "layers": [_spec_record(spec, keys[name]) for name, spec in specs.items()],
        "arguments": jsonable(arguments),
        "plan": {name: {"examples": e, "data_partitions": d, "module_partitions": m}
                 for name, (e, d, m) in plan.items()},
        "data": data_fingerprint(data),
        "model": model_fingerprint(model),
    }
    group = open_store(path, header, arrays, overwrite=overwrite, identity_keys=IDENTITY)
    return FitStore(Path(path), group, keys, states, outputs, plan)


def save_factors(factors, path: Path, *, overwrite: bool = False) -> None:
    """Write complete factors to a new store at ``path`` (an existing one needs ``overwrite=True``)."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise InfluenceError(f"{path} already exists; pass overwrite=True to replace it.")
    keys = layer_keys(list(factors.layers))
    arrays = {
        f"layers/{keys[layer]}/{name}": ArraySpec(tuple(t.shape), tuple(t.shape), numpy_dtype(t.dtype))
        for layer, tensors in factors.tensors.items() for name, t in tensors.items()
    }
    header = {
        "kind": "factors",
        "format": FORMAT_VERSION,
        "library_version": _version(),
        "strategy": factors.strategy,
        "strategies": factors.strategies,
        "passes": list(factors.pass_names),
        "layers": [_spec_record(spec, keys[name]) for name, spec in factors.layers.items()],
        "arguments": {"use_empirical_fisher": factors.use_empirical_fisher},
        "num_examples": factors.num_examples,
    }
    group = open_store(path, header, arrays, overwrite=True, identity_keys=IDENTITY)
    for layer, tensors in factors.tensors.items():
        for name, value in tensors.items():
            write_array(group, f"layers/{keys[layer]}/{name}", value)
    for p in factors.passes_done:
        mark_done(path, f"pass-{p}")
    if factors.complete:
        mark_done(path, "complete")


def load_factors(path: Path, estimator=None):
    """Read factors written by :func:`save_factors` or by ``fit_factors(store=...)``.

    Each layer gets the built-in estimator of its stored strategy; ``estimator`` (a custom one, which is
    not stored by value) replaces them all.
    """
    from ..curvature import get_estimator
    from ..factors import Factors

    path = Path(path)
    header = read_header(path)
    if header.get("kind") != "factors":
        raise InfluenceError(f"{path} holds {header.get('kind')!r} results, not factors.")
    done = done_cells(path)
    passes_done = tuple(p for p in header.get("passes", []) if f"pass-{p}" in done)
    import zarr

    group = zarr.open_group(str(path), mode="r")
    layers, tensors, estimators = {}, {}, {}
    for record in header["layers"]:
        spec = _spec_from_record(record)
        layers[spec.name] = spec
        strategy = header.get("strategies", {}).get(spec.name, header["strategy"])
        estimators[spec.name] = estimator or get_estimator(strategy)
        folder = f"layers/{record['key']}"
        names = [name for name, _ in group[folder].arrays()] if folder in group else []
        produced = set()
        for fit_pass in estimators[spec.name].passes:
            if fit_pass.name in passes_done:
                produced |= _pass_output_names(estimators[spec.name], fit_pass.name, spec)
        tensors[spec.name] = {name: read_array(group, f"{folder}/{name}") for name in names if name in produced}
    examples = header.get("num_examples")
    if examples is None:
        store = FitStore(path, group, layer_keys(list(layers)), {}, {}, header.get("plan", {}))
        examples = store.num_examples()
    return Factors(strategy=header["strategy"], estimator=next(iter(estimators.values())), layers=layers,
                   tensors=tensors, num_examples=int(examples),
                   use_empirical_fisher=bool(header["arguments"].get("use_empirical_fisher")),
                   passes_done=passes_done, estimators=estimators)


def _pass_output_names(estimator, pass_name: str, spec: LayerSpec) -> set:
    _, outputs = _meta_outputs({spec.name: estimator}, {spec.name: spec}, {})
    return set(outputs[pass_name][spec.name])
