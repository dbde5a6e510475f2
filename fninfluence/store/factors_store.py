"""Factors on disk: the final factors of every layer, and the partial sums of each fitting cell.

Layout (a Zarr v3 group; see docs/storage.md)::

    <store>/zarr.json                        attributes["fninfluence"]: kind, strategy, layers, arguments, plan,
                                             data and model fingerprints, library and format versions, and
                                             "weights": the tracked weights' sums (checked when scoring)
    <store>/layers/<layer key>/<factor>      final factors, e.g. activation_eigenvectors [groups, in, in]
    <store>/passes/<pass>/<layer key>/<state> partial sums, one chunk per data partition: [partitions, ...]
    <store>/_done/<cell>.json                a cell's completion marker (written after its chunks)
    <store>/_done/pass-<pass>.json           a pass is aggregated and its factors written
    <store>/_done/complete.json              every pass is complete

Layer keys are ``layer0000``, ``layer0001``, ... in model order; ``layers`` in the attributes maps them
to module names. Loading reads only JSON and numeric arrays: nothing is unpickled or executed.
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import zarr
from torch import nn

from ..capture import LayerSpec
from ..curvature import ESTIMATORS, CurvatureEstimator, get_estimator, meta_passes, pass_order
from ..errors import InfluenceError
from ..partitions import Cell, cell_grid, data_ranges, module_groups
from ..version import __version__
from .fingerprint import (EXAMPLE_DIGEST_BYTES, DataDigest, data_fingerprint, jsonable, model_fingerprint,
                          tracked_parameter_names, weights_fingerprint)
from .zarr_io import (_READY, FORMAT_VERSION, ArraySpec, Markers, check_allocation, check_array, chunk_files,
                      done_cells, identity_digest, numpy_dtype, open_store, read_array, read_header, read_marker,
                      remove_store, write_array)

IDENTITY = ("kind", "strategy", "strategies", "layers", "arguments", "plan", "data", "model")


@dataclass(frozen=True)
class StoredFactors:
    """The fields of :class:`fninfluence.Factors` as a store holds them (its ``estimator`` is the first of
    ``estimators``). The store reads and writes this record, and ``Factors`` is built from it, so this
    module never imports the class it stores."""

    strategy: str
    layers: Dict[str, LayerSpec]
    tensors: Dict[str, Dict[str, torch.Tensor]]
    num_examples: int
    use_empirical_fisher: bool
    passes_done: Tuple[str, ...]
    estimators: Dict[str, CurvatureEstimator]
    weights_fingerprint: Optional[Dict[str, Any]] = None  # of the model fitted on (fingerprint.weights_fingerprint)

    @property
    def complete(self) -> bool:
        """Whether every pass of every layer's estimator has been fitted."""
        return all(name in self.passes_done for name in pass_order(self.estimators))


def _label(estimators) -> str:
    names = sorted({e.name for e in estimators.values()})
    return names[0] if len(names) == 1 else "mixed"


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
    meta device (:func:`fninfluence.curvature.meta_passes`): ``states[pass][layer]``, ``outputs[pass][layer]``."""
    states = {name: {} for name in pass_order(estimators)}
    outputs = {name: {} for name in states}
    for layer, spec in specs.items():
        run = meta_passes(estimators[layer], spec.shape, lambda p: state_dtypes.get(p.name, torch.float64))
        for name, meta in run.items():
            states[name][layer], outputs[name][layer] = meta.state, meta.outputs
    return states, outputs


class FitStore:
    """A factors store being filled, cell by cell. Every marker certifies the chunks it covers (see zarr_io)."""

    def __init__(self, path: Path, group, keys: Dict[str, str], states, outputs, plan, identity: str):
        self.path, self.group, self.keys = path, group, keys
        self.states, self.outputs, self.plan = states, outputs, plan
        self.markers = Markers(path, identity, self._expected_chunks)

    def _expected_chunks(self, cell: str) -> List[str]:
        """The chunks a cell's marker must certify: its data partition of its module partition's states."""
        if cell == "complete":
            return self._output_chunks(list(self.outputs))
        if cell.startswith("pass-"):
            return self._output_chunks([cell[len("pass-"):]])
        parsed = Cell.parse(cell)
        if parsed is None or parsed.kind not in self.states or parsed.module_partition is None:
            raise KeyError(cell)
        pass_name = parsed.kind
        layers = module_groups(list(self.states[pass_name]), self.plan[pass_name][2])[parsed.module_partition]
        region = (slice(parsed.data_partition, parsed.data_partition + 1),)
        return [chunk for layer in layers for name in self.states[pass_name][layer]
                for chunk in chunk_files(self.group, f"passes/{pass_name}/{self.keys[layer]}/{name}", region)]

    # cells
    def cell_done(self, cell: Cell) -> bool:
        return self.markers.done(cell.name)

    def _start(self, pass_name: str, data_index: int) -> int:
        examples, data_parts, _ = self.plan[pass_name]
        return data_ranges(examples, data_parts)[data_index].start if examples is not None else 0

    def write_cell(self, cell: Cell, states: Dict[str, Dict[str, torch.Tensor]], examples: int,
                   data: Optional[DataDigest] = None) -> None:
        """Write a cell's partial states and certify them; with ``data`` (the digests of the examples it read),
        first check that every other cell which read some of the same examples read the same values."""
        start = self._start(cell.kind, cell.data_partition)
        if data is not None:
            self._check_same_data(cell.name, start, bytes(data.raw))
        chunks = []
        for layer, state in states.items():
            for name, value in state.items():
                array = f"passes/{cell.kind}/{self.keys[layer]}/{name}"
                region = (slice(cell.data_partition, cell.data_partition + 1),)
                write_array(self.group, array, value[None], region)
                chunks += chunk_files(self.group, array, region)
        info = {"examples": examples, "start": start}
        if data is not None:
            info["data"] = data.encoded()
        self.markers.mark(cell.name, chunks, info)

    def _check_same_data(self, cell: str, start: int, mine: bytes) -> None:
        width = EXAMPLE_DIGEST_BYTES
        for other in sorted(done_cells(self.path)):
            parsed = Cell.parse(other)
            is_cell = parsed is not None and parsed.module_partition is not None
            record = self.markers.record(other) if other != cell and is_cell else None
            if record is None:
                continue
            if not isinstance(record.get("data"), str):
                continue
            theirs, begin = base64.b64decode(record["data"].encode()), int(record.get("start", 0))
            lo, hi = max(start, begin), min(start + len(mine) // width, begin + len(theirs) // width)
            if hi <= lo:
                continue
            a = mine[(lo - start) * width:(hi - start) * width]
            b = theirs[(lo - begin) * width:(hi - begin) * width]
            if a != b:
                first = lo + next(i for i in range(hi - lo)
                                  if a[i * width:(i + 1) * width] != b[i * width:(i + 1) * width])
                raise InfluenceError(
                    f"{self.path}: cell {cell} read other data than cell {other} of this store: example {first} (of "
                    f"the examples {lo}..{hi - 1} both read) has other values. A store holds results of one dataset: "
                    "pass the same data= (same values, same order) as the run that wrote the store, or overwrite=True "
                    "(or another store) to compute everything on the new data."
                )

    def missing_cells(self, pass_name: str, data_parts: int, module_parts: int) -> List[str]:
        """The names of the pass's cells not certified done, in store order."""
        return [cell.name for cell in cell_grid(pass_name, data_parts, module_parts)
                if not self.markers.done(cell.name)]

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
        return self.markers.done(f"pass-{pass_name}")

    def write_pass_outputs(self, pass_name: str, outputs: Dict[str, Dict[str, torch.Tensor]], mark: bool = True) -> None:
        """Write the final factors of ``outputs``' layers; ``mark=False`` leaves marking the pass done to the
        caller (distributed runs write their layers from several ranks, then mark once)."""
        for layer, tensors in outputs.items():
            for name, value in tensors.items():
                write_array(self.group, f"layers/{self.keys[layer]}/{name}", value)
        if mark:
            self.mark_pass_done(pass_name)

    def _output_chunks(self, passes: Sequence[str]) -> List[str]:
        return [chunk for pass_name in passes for layer, produced in self.outputs[pass_name].items()
                for name in produced for chunk in chunk_files(self.group, f"layers/{self.keys[layer]}/{name}")]

    def mark_pass_done(self, pass_name: str) -> None:
        self.markers.mark(f"pass-{pass_name}", self._output_chunks([pass_name]),
                          {"examples": self._examples(pass_name)})

    def merge_pass_outputs(self, pass_name: str, factors: Dict[str, Dict[str, torch.Tensor]]):
        produced = self.outputs[pass_name]
        return {
            layer: {**factors.get(layer, {}),
                    **{name: read_array(self.group, f"layers/{key}/{name}") for name in produced.get(layer, {})}}
            for layer, key in self.keys.items()
        }

    def _examples(self, pass_name: str) -> int:
        return _certified_examples(self.path, self.markers, pass_name)

    def num_examples(self) -> int:
        names = list(self.plan)
        return self._examples(names[-1]) if names else 0

    def mark_complete(self) -> None:
        if not self.markers.done("complete"):
            self.markers.mark("complete", self._output_chunks(list(self.outputs)))


def _certified_examples(path: Path, markers: Markers, pass_name: str) -> int:
    """The examples the certified cells of the pass's first module partition read (each example once)."""
    total = 0
    for name in sorted(done_cells(path)):
        cell = Cell.parse(name)
        if cell is not None and cell.kind == pass_name and cell.module_partition == 0 and markers.done(name):
            total += int(read_marker(path, name).get("examples", 0))
    return total


def _arrays(estimators, specs, keys, plan, states, outputs) -> Dict[str, ArraySpec]:
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
    return arrays


def _fit_header(*, model, data, estimators, specs: Dict[str, LayerSpec], plan, arguments) -> Dict[str, Any]:
    keys = layer_keys(list(specs))
    return {
        "kind": "factors",
        "format": FORMAT_VERSION,
        "library_version": __version__,
        "strategy": _label(estimators),
        "strategies": {layer: e.name for layer, e in estimators.items()},
        "passes": pass_order(estimators),
        "layers": [_spec_record(spec, keys[name]) for name, spec in specs.items()],
        "arguments": jsonable(arguments),
        "plan": {name: {"examples": e, "data_partitions": d, "module_partitions": m}
                 for name, (e, d, m) in plan.items()},
        "data": data_fingerprint(data),
        "model": model_fingerprint(model),
        "weights": weights_fingerprint(dict(model.named_parameters()), tracked_parameter_names(specs)),
    }


def open_fit(path: Path, *, model: nn.Module, data, estimators, specs: Dict[str, LayerSpec], plan, arguments,
             state_dtypes: Dict[str, torch.dtype], overwrite: bool) -> FitStore:
    keys = layer_keys(list(specs))
    states, outputs = _meta_outputs(estimators, specs, state_dtypes)
    arrays = _arrays(estimators, specs, keys, plan, states, outputs)
    header = _fit_header(model=model, data=data, estimators=estimators, specs=specs, plan=plan, arguments=arguments)
    group = open_store(path, header, arrays, overwrite=overwrite, identity_keys=IDENTITY)
    return FitStore(Path(path), group, keys, states, outputs, plan, identity_digest(header, IDENTITY))


def reuse_complete(path: Path, *, model: nn.Module, task, data, resolve: Callable[[Dict[str, LayerSpec]], Any],
                   plan_for: Callable[[List[str]], Dict[str, Any]], arguments) -> Optional[StoredFactors]:
    """The factors of a complete, intact store at ``path`` made with these arguments, data (size and indices)
    and model (every parameter), found without reading any data; None when the store must be opened the
    usual way (it is missing, incomplete, damaged, or differs: that path then says what differs).

    ``resolve(specs)`` gives the estimators for the stored layers, ``plan_for(pass names)`` the plan.
    """
    path = Path(path)
    if not (path / _READY).exists():
        return None
    try:
        header = read_header(path)
        if header.get("kind") != "factors" or header.get("format") != FORMAT_VERSION:
            return None
        specs = {record["name"]: _spec_from_record(record) for record in header["layers"]}
        for spec in specs.values():
            _check_spec(path, spec)
        tracked = task.tracked_modules()
        modules = dict(model.named_modules())
        if (tracked is not None and set(tracked) != {s.name.split(".in_proj")[0] for s in specs.values()}) or \
                any(spec.name.split(".in_proj")[0] not in modules for spec in specs.values()):
            return None
        estimators = resolve(specs)
        plan = plan_for(pass_order(estimators))
        expected = _fit_header(model=model, data=data, estimators=estimators, specs=specs, plan=plan,
                               arguments=arguments)
    except (InfluenceError, KeyError, TypeError, ValueError):
        return None
    if any(expected.get(k) != header.get(k) for k in IDENTITY):
        return None
    markers = _stored_markers(path, header, estimators)
    if not markers.done("complete") or not all(markers.done(f"pass-{p}") for p in header.get("passes", [])):
        return None
    stored = _load(path, header, estimators)
    return stored if stored.complete else None


def save_factors(factors: StoredFactors, path: Path, *, overwrite: bool = False) -> None:
    """Write factors to a new store at ``path`` (an existing one needs ``overwrite=True``, and only a store is
    ever deleted: a folder of other files is refused). Each fitted pass is marked done, and the store
    ``complete`` when every pass is."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not overwrite:
            raise InfluenceError(f"{path} already exists; pass overwrite=True to replace it.")
        remove_store(path)
    keys = layer_keys(list(factors.layers))
    arrays = {
        f"layers/{keys[layer]}/{name}": ArraySpec(tuple(t.shape), tuple(t.shape), numpy_dtype(t.dtype))
        for layer, tensors in factors.tensors.items() for name, t in tensors.items()
    }
    header = {
        "kind": "factors",
        "format": FORMAT_VERSION,
        "library_version": __version__,
        "strategy": factors.strategy,
        "strategies": {layer: estimator.name for layer, estimator in factors.estimators.items()},
        "passes": pass_order(factors.estimators),
        "layers": [_spec_record(spec, keys[name]) for name, spec in factors.layers.items()],
        "arguments": {"use_empirical_fisher": factors.use_empirical_fisher},
        "num_examples": factors.num_examples,
    }
    if factors.weights_fingerprint is not None:
        header["weights"] = factors.weights_fingerprint
    group = open_store(path, header, arrays, overwrite=False, identity_keys=IDENTITY)
    markers = Markers(path, identity_digest(header, IDENTITY))
    for layer, tensors in factors.tensors.items():
        for name, value in tensors.items():
            write_array(group, f"layers/{keys[layer]}/{name}", value)
    for pass_name in factors.passes_done:
        markers.mark(f"pass-{pass_name}", _saved_pass_chunks(factors, group, keys, pass_name))
    if factors.complete:
        markers.mark("complete", [chunk for name in arrays for chunk in chunk_files(group, name)])


def _saved_pass_chunks(factors: StoredFactors, group, keys: Dict[str, str], pass_name: str) -> List[str]:
    """The chunks of the factors a pass produced, among those saved."""
    return [chunk for layer, spec in factors.layers.items()
            if any(fit_pass.name == pass_name for fit_pass in factors.estimators[layer].passes)
            for name in _pass_output_names(factors.estimators[layer], pass_name, spec) if name in factors.tensors[layer]
            for chunk in chunk_files(group, f"layers/{keys[layer]}/{name}")]


def _malformed(path: Path, error: BaseException) -> InfluenceError:
    return InfluenceError(f"{path} has malformed fninfluence metadata ({type(error).__name__}: {error}): it was "
                          "damaged or not written by fninfluence. Recompute it (overwrite=True), or restore it from a "
                          "copy.")


def load_factors(path: Path, estimator: Optional[CurvatureEstimator] = None) -> StoredFactors:
    """Read factors written by :func:`save_factors` or by ``fit_factors(store=...)``.

    Each layer gets the built-in estimator of its stored strategy; ``estimator`` (a custom one, which is
    not stored by value) replaces them all. Only the passes whose markers certify their chunks are read;
    a marker whose chunks are missing or changed raises an error naming them.
    """
    path = Path(path)
    header = read_header(path)
    if header.get("kind") != "factors":
        raise InfluenceError(f"{path} holds {header.get('kind')!r} results, not factors.")
    if header.get("format") != FORMAT_VERSION:
        raise InfluenceError(f"{path} was written in store format {header.get('format')!r}; this version reads "
                             f"format {FORMAT_VERSION}. Recompute it with this version (overwrite=True).")
    try:
        estimators = {}
        for record in header["layers"]:
            spec = _spec_from_record(record)
            strategy = header.get("strategies", {}).get(spec.name, header["strategy"])
            if estimator is None and str(strategy).lower() not in ESTIMATORS:
                raise InfluenceError(
                    f"{path} holds factors of the custom strategy {strategy!r}, and a custom estimator is not stored "
                    f"by value: pass it as estimator=, e.g. Factors.load({str(path)!r}, estimator=my_estimator).")
            estimators[spec.name] = estimator or get_estimator(strategy)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        if isinstance(error, InfluenceError):
            raise
        raise _malformed(path, error) from None
    return _load(path, header, estimators)


def _stored_markers(path: Path, header: Dict[str, Any], estimators: Dict[str, Any]) -> Markers:
    """The markers of a finished store: each pass marker must certify exactly the stored factors of its pass
    (and ``complete`` those of every pass), so a marker copied from another pass certifies nothing."""
    group = zarr.open_group(str(path), mode="r")
    records = header["layers"]

    def outputs_of(pass_name: str) -> List[str]:
        chunks = []
        for record in records:
            spec = _spec_from_record(record)
            estimator = estimators[spec.name]
            if not any(p.name == pass_name for p in estimator.passes):
                continue
            for name in sorted(_pass_output_names(estimator, pass_name, spec)):
                if f"layers/{record['key']}/{name}" in group:
                    chunks += chunk_files(group, f"layers/{record['key']}/{name}")
        return chunks

    def expected(cell: str) -> Optional[List[str]]:
        if cell == "complete":
            return [c for p in header.get("passes", []) for c in outputs_of(p)]
        if cell.startswith("pass-"):
            return outputs_of(cell[len("pass-"):])
        return None  # cells are checked by the FitStore that fills the store

    return Markers(path, identity_digest(header, IDENTITY), expected)


def _check_spec(path: Path, spec: LayerSpec) -> None:
    for field in ("groups", "out_features", "in_features"):
        value = getattr(spec, field)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 2 ** 31:
            raise InfluenceError(f"{path}: layer {spec.name!r} has {field}={value!r} in its metadata, which is not a "
                                 "sane size: the store is damaged or crafted. Recompute it (overwrite=True).")


def _load(path: Path, header: Dict[str, Any], estimators: Dict[str, CurvatureEstimator]) -> StoredFactors:
    """The factors of the certified passes of the store at ``path``, every array's shape checked against the
    shapes its layer's estimator produces before anything is read."""
    try:
        layers = {spec.name: spec for spec in map(_spec_from_record, header["layers"])}
        for spec in layers.values():
            _check_spec(path, spec)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise _malformed(path, error) from None
    markers = _stored_markers(path, header, estimators)
    passes_done = _certified_passes(path, header, markers)
    group = zarr.open_group(str(path), mode="r")
    try:
        wanted = {(record["name"], name): array for record in header["layers"]
                  for name, array in _layer_arrays(path, group, header, record, estimators, passes_done).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise _malformed(path, error) from None
    check_allocation(path, [(array.shape, array.dtype) for _, array in wanted.values()])
    tensors: Dict[str, Dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    for (layer, name), (array_name, _) in wanted.items():
        tensors[layer][name] = read_array(group, array_name)
    examples = header.get("num_examples")
    if examples is None:
        examples = _certified_examples(path, markers, list(header.get("plan", {}))[-1]) if header.get("plan") else 0
    weights = header.get("weights")  # absent before it was kept: then nothing is checked
    return StoredFactors(strategy=header["strategy"], layers=layers, tensors=tensors, num_examples=int(examples),
                         use_empirical_fisher=bool(header.get("arguments", {}).get("use_empirical_fisher")),
                         passes_done=passes_done, estimators=estimators,
                         weights_fingerprint=dict(weights) if isinstance(weights, dict) else None)


def _certified_passes(path: Path, header: Dict[str, Any], markers: Markers) -> Tuple[str, ...]:
    """The passes whose markers certify their factors; a marker that certifies nothing is an error."""
    passes = [p for p in header.get("passes", []) if isinstance(p, str)]
    damaged = markers.damaged([f"pass-{p}" for p in passes])
    if damaged:
        raise InfluenceError(
            f"{path} is damaged: " + "; ".join(f"{cell}: {problem}" for cell, problem in damaged.items())
            + ". Rerun the same fit_factors call with this store to recompute the damaged passes (or save the "
            "factors again)."
        )
    return tuple(p for p in passes if markers.done(f"pass-{p}"))


def _layer_arrays(path: Path, group, header: Dict[str, Any], record: Dict[str, Any],
                  estimators: Dict[str, CurvatureEstimator], passes_done: Tuple[str, ...]) -> Dict[str, Tuple[str, Any]]:
    """``{factor: (array name, array)}`` of one stored layer's factors of the certified passes, each array's
    shape and codecs checked against what the layer's estimator produces."""
    spec = _spec_from_record(record)
    folder = f"layers/{record['key']}"
    expected = {}
    for fit_pass in estimators[spec.name].passes:
        if fit_pass.name in passes_done:
            _, outputs = _meta_outputs({spec.name: estimators[spec.name]}, {spec.name: spec}, {})
            expected.update(outputs[fit_pass.name][spec.name])
    found = {}
    for name, meta in expected.items():
        array = group[f"{folder}/{name}"] if f"{folder}/{name}" in group else None
        if array is None:
            if header.get("num_examples") is None:
                raise InfluenceError(f"{path}: factor {folder}/{name} of a complete pass is missing.")
            continue  # saved factors may leave out what their estimator does not need
        if tuple(array.shape) != tuple(meta.shape):
            raise InfluenceError(
                f"{path}: factor {folder}/{name} has shape {list(array.shape)} in its metadata, but layer "
                f"{spec.name!r} ({spec.op}, groups {spec.groups}, out {spec.out_features}, in "
                f"{spec.in_features}) gives {list(meta.shape)}: the store is damaged or crafted. Recompute "
                "it (overwrite=True)."
            )
        check_array(path, f"{folder}/{name}", array)
        found[name] = (f"{folder}/{name}", array)
    return found


def _pass_output_names(estimator, pass_name: str, spec: LayerSpec) -> set:
    _, outputs = _meta_outputs({spec.name: estimator}, {spec.name: spec}, {})
    return set(outputs[pass_name][spec.name])
