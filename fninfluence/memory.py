"""Memory estimates: the peak memory of each phase for a model, batch size, strategy and options.

Everything fninfluence allocates is computed from the shapes the tap discovers on an example batch: per
tracked layer ``(groups G, out, in)`` and tokens per example ``T``. For a batch of ``B`` examples:

* layer statistics ``a: [B, T, G, in]``, ``g: [B, T, G, out]``; per-example gradients ``[B, G, out, in]``;
* the estimator's states and factors (``A: [G, in, in]``, ``S: [G, out, out]``, their float64 eigenvectors and
  ``Lambda: [G, out, in]`` for EKFAC): read off each pass's ``init`` and ``finalize`` run on the meta device, so
  a user's estimator is sized as the built-ins are; the transients inside its calls (einsum intermediates,
  ``eigh``'s workspace) come from its memory hints (:mod:`fninfluence.curvature.base`);
* preconditioned query gradients, kept for all ``Q`` queries: ``Q x sum_layers G out in``;
* score contractions, whose largest intermediate is read off the contraction order opt_einsum picks;
* the score matrices ``[Q, N]`` per layer and in total.

What the shapes cannot show is the memory of the model's own forward and backward pass (attention
probabilities, activations of untracked ops). :func:`estimate_memory` measures it once: one tap
forward+backward on the example batch and on the example batch repeated twice, under
``torch.profiler``'s memory tracking (or ``torch.cuda.max_memory_allocated`` on a GPU), and extrapolates
linearly in the batch size. Pass ``activation_bytes=(fixed, per_example)`` to skip that measurement.

Each phase's peak is the memory allocated *during* the call, above what exists before it (the model and
the data; for scoring, also the factors). ``MemoryEstimate.resident`` holds those.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import opt_einsum
import torch
from torch import nn
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Dataset

from .capture import ModelTap, batch_examples, unfused
from .curvature import CurvatureEstimator, FitPass, MetaPass, ScoreMemory, Workspace, get_estimator, meta_passes
from .curvature.base import LayerShape, Tensors, is_one_hot
from .core.statistics import LayerStatistic, of_stats
from .errors import InfluenceError
from .precision import Precision
from .run.data import as_loader, to_device
from .task import Task

MiB = 2 ** 20
DISCOVERY = "discovery"
SCORE_PHASES = ("query gradients", "pairwise", "self")
_META = torch.device("meta")


# What the profiler's C++ backend (kineto) logs on its own at every start and stop, straight to file descriptor 2
# ("USDT:... profiler_start", and on a machine without a GPU "ERROR:... gpuGetDeviceCount failed"): noise to a
# user of estimate_memory, so it is dropped; anything else written to stderr meanwhile is passed on.
_PROFILER_LOG = re.compile(r"^(USDT|INFO|WARNING|ERROR|STAGE):\d{4}-\d\d-\d\d [\d:.]+ \d+:\d+ \w+\.cpp:\d+\]")


@contextlib.contextmanager
def _without_profiler_log():
    """Run the body with file descriptor 2 captured; afterwards, write back the lines that are not profiler log."""
    try:
        stderr_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (a notebook kernel's stream, say): nothing to do
        yield
        return
    sys.stderr.flush()
    saved = os.dup(stderr_fd)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), stderr_fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, stderr_fd)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not _PROFILER_LOG.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def measure_peak(fn: Callable[[], Any], device: Optional[torch.device] = None) -> Tuple[Any, int]:
    """``(fn(), peak bytes allocated while it ran, above what was allocated before)``.

    On CUDA through ``torch.cuda.max_memory_allocated``; on CPU through ``torch.profiler``'s memory events
    (every allocation and free, in order; the peak of their running sum).
    """
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with _without_profiler_log(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return result, peak


def format_bytes(nbytes: float) -> str:
    """``nbytes`` in the largest binary unit that keeps it at or above 1 (``"0 B"``, ``"812 B"``, ``"3.4 KiB"``,
    ``"1.2 GiB"``), so that a small model's estimate does not print as 0.0 MiB."""
    value, units = float(nbytes), ("B", "KiB", "MiB", "GiB", "TiB")
    for unit in units:
        if abs(value) < 1024 or unit == units[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass
class PhaseEstimate:
    """Predicted peak bytes of one phase and the terms it is made of (the peak is their sum)."""

    name: str
    breakdown: Dict[str, int]

    @property
    def peak(self) -> int:
        return int(sum(self.breakdown.values()))


@dataclass
class MemoryEstimate:
    """Per-phase peaks (bytes allocated during each call) and what stays resident between calls: the parameters,
    and once fitted, the factors (which ``fit_factors``'s own phases already count while making them)."""

    phases: Dict[str, PhaseEstimate]
    resident: Dict[str, int]
    settings: Dict[str, Any] = field(default_factory=dict)
    fit_phases: Tuple[str, ...] = (DISCOVERY,)  # fit_factors's phases: discovery, then one per pass

    def before(self, phase: str) -> int:
        """What exists before a phase's call: the parameters, and for scoring also the factors."""
        return self.resident["parameters"] + (0 if phase in self.fit_phases else self.resident["factors"])

    @property
    def peak(self) -> int:
        """The largest total at any time: over phases, what exists before the call plus the call's peak."""
        return max(self.before(name) + phase.peak for name, phase in self.phases.items())

    def fits(self, budget_bytes: int) -> bool:
        return self.peak <= budget_bytes

    def __str__(self) -> str:
        lines = [f"{'phase':<16}{'peak':>10}  largest terms"]
        for phase in self.phases.values():
            top = sorted(phase.breakdown.items(), key=lambda kv: -kv[1])[:3]
            terms = ", ".join(f"{k} {format_bytes(v)}" for k, v in top if v > 0)
            lines.append(f"{phase.name:<16}{format_bytes(phase.peak):>10}  {terms}")
        lines.append(f"{'resident':<16}{format_bytes(sum(self.resident.values())):>10}  "
                     + ", ".join(f"{k} {format_bytes(v)}" for k, v in self.resident.items()))
        lines.append(f"{'total peak':<16}{format_bytes(self.peak):>10}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Layer:
    shape: LayerShape  # (groups, out, in); a OneHotShape for an embedding
    tokens: int  # per example, all calls together
    conv: bool = False  # a convolution: its statistics hold the op's input x, not the patches

    @property
    def grad(self) -> int:  # elements of one example's gradient
        groups, out, inp = self.shape
        return groups * out * inp

    @property
    def stats(self) -> int:  # elements of a, g per example (an embedding's inputs are ids, not a)
        groups, out, inp = self.shape
        return self.tokens * groups * ((0 if is_one_hot(self.shape) else inp) + out)

    def passed(self, unfolds_patches: bool) -> int:
        """Elements per example of the statistics a streamed layer hands to a formula: ``a`` and ``g``; for a
        convolution only ``g`` (its input ``x`` is autograd's, and per-example gradients come from the
        weight-gradient kernel, which the formulas' hints count), plus the patches where they are unfolded."""
        if not self.conv:
            return self.stats
        groups, out, inp = self.shape
        return self.tokens * groups * (out + (inp if unfolds_patches else 0))

    @property
    def inputs(self) -> int:  # elements of a per example (a convolution's patches: an upper bound of what it keeps)
        groups, _, inp = self.shape
        return 0 if is_one_hot(self.shape) else self.tokens * groups * inp


@dataclass(frozen=True)
class _Sizes:
    """The settings an estimate is for, in examples, and the measured activation memory ``(fixed, per example)``."""

    batch: int
    query_batch: int
    train: int
    num_queries: int
    kept_queries: int
    query_rank: Optional[int]
    activation: Tuple[int, int]
    kept: Tuple[int, int]

    def act(self, examples: int) -> int:
        """Bytes of the model's own forward+backward on ``examples`` examples (streamed: no layer's statistics)."""
        return self.activation[0] + self.activation[1] * examples

    def inputs(self, examples: int, itemsize: int, model_itemsize: int) -> int:
        """Bytes of every streamed layer's inputs kept from the forward to the backward pass (passes whose
        statistic reads ``a`` and ``g`` together), in a compute dtype of ``itemsize`` bytes."""
        return (self.kept[0] + self.kept[1] * examples) * itemsize // model_itemsize


def _nbytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _repeat(batch: Any, times: int) -> Any:
    return tree_map(lambda x: torch.cat([x] * times) if isinstance(x, torch.Tensor) and x.dim() > 0 else x, batch)


def _scalar(value: Callable[[Any], torch.Tensor], keep_inputs: bool, device: torch.device) -> LayerStatistic:
    """A statistic that costs nothing but what it keeps: the layer's inputs (``keep_inputs``) or nothing."""
    zeros = lambda examples, tokens: {"value": torch.zeros((), device=device)}  # noqa: E731
    if keep_inputs:
        return of_stats(lambda stats: {"value": value(stats)}, zeros, additive=True)
    return LayerStatistic(lambda inputs: (None, {}), lambda kept, g: {"value": g.sum()}, zeros, additive=True)


def _measured_bytes(tap: ModelTap, batch: Any, objective: str, keep_inputs: bool) -> Tuple[int, int]:
    """``(fixed, per example)`` peak bytes of one streamed tap forward+backward whose statistics keep the layers'
    inputs or nothing, measured at the batch and at twice it."""
    peaks = []
    statistics = {layer: _scalar(lambda stats: stats.g.sum(), keep_inputs, tap.device) for layer in tap.specs}
    for times in (1, 2):
        repeated = _repeat(batch, times)
        probes = tap.probes_for(objective, repeated)
        with unfused():
            _, peak = measure_peak(lambda: tap.layer_values(objective, tap.params, tap.buffers, repeated, probes,
                                                            statistics), tap.device)
        peaks.append(peak)
    examples = batch_examples(batch)
    per_example = max(0, (peaks[1] - peaks[0]) // examples)
    return max(0, peaks[0] - per_example * examples), per_example


def _activation_bytes(tap: ModelTap, batch: Any, objective: str) -> Tuple[int, int]:
    """``(fixed, per example)`` bytes of one tap forward+backward that keeps no layer's statistics."""
    return _measured_bytes(tap, batch, objective, keep_inputs=False)


def _kept_bytes(tap: ModelTap, batch: Any, objective: str, activation: Tuple[int, int]) -> Tuple[int, int]:
    """``(fixed, per example)`` bytes of the layers' inputs kept until the backward pass (in the model's dtype)."""
    with_inputs = _measured_bytes(tap, batch, objective, keep_inputs=True)
    return max(0, with_inputs[0] - activation[0]), max(0, with_inputs[1] - activation[1])


def _layers(tap: ModelTap, batch: Any) -> Dict[str, _Layer]:
    tokens = tap.tokens_per_call("train", batch)
    return {name: _Layer(spec.shape, tokens=tokens[name] * spec.calls, conv=spec.op in ("conv1d", "conv2d"))
            for name, spec in tap.specs.items()}


def _largest_intermediate(equation: str, *shapes: Tuple[int, ...]) -> int:
    _, info = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize="optimal")
    return int(info.largest_intermediate)


def _on_meta(estimator: CurvatureEstimator, what: str, layer: str, run: Callable[[], Any]) -> Any:
    """``run()``, an estimator's function on meta tensors, with an error that says what the meta device needs."""
    try:
        return run()
    except Exception as error:
        raise InfluenceError(
            f"estimate_memory runs {what} of {estimator.name!r} on the meta device (torch.device('meta')) to size "
            f"it, and it failed there for layer {layer!r}: {error}. Write it without reading tensor values (no "
            ".item(), no Python branches on values), creating tensors on the device init is given or like its "
            "inputs.") from error


def _meta_fit(estimator: CurvatureEstimator, layers: Dict[str, _Layer], precision: Precision,
              model_dtype: torch.dtype) -> Dict[str, Dict[str, MetaPass]]:
    """``{pass: {layer: MetaPass}}``: each pass's ``init`` and ``finalize`` (its outputs cast as a fit casts them)
    run on the meta device."""
    fitting = precision.fitting({"*": estimator}, model_dtype)["*"]
    state_dtype = lambda fit_pass: precision.fit_dtypes(fit_pass, model_dtype)[0]  # noqa: E731
    sized: Dict[str, Dict[str, MetaPass]] = {fit_pass.name: {} for fit_pass in fitting.passes}
    for name, layer in layers.items():
        passes = _on_meta(estimator, "the passes' init and finalize", name,
                          lambda: meta_passes(fitting, layer.shape, state_dtype))
        for pass_name, sized_pass in passes.items():
            sized[pass_name][name] = sized_pass
    return sized


def _pass_phase(fit_pass: FitPass, sized: Dict[str, MetaPass], layers: Dict[str, _Layer], sizes: _Sizes,
                earlier_bytes: int, compute: torch.dtype, model_dtype: torch.dtype) -> PhaseEstimate:
    """One fit pass: the factors of the earlier passes and the float64 accumulators throughout; then the larger of
    a batch and ``finalize`` (all outputs, the largest layer's transients). A batch is streamed: the model's
    forward+backward, every layer's inputs kept until the backward pass unless the pass declares a split
    (``FitPass.statistic``; KFAC's covariance keeps none), and one layer at a time its cast statistics, its
    update's transients and its part of the state (added in place)."""
    hints = {name: fit_pass.memory(Workspace(layer.shape, layer.tokens, sizes.batch, compute, sized[name].earlier,
                                             _nbytes(sized[name].state)))
             for name, layer in layers.items()}
    unfolds = fit_pass.reads_raw_statistics  # the covariance products read a convolution's patches
    per_layer = max(sizes.batch * layer.passed(unfolds) * compute.itemsize + hints[name].update + hints[name].new_state
                    for name, layer in layers.items())
    kept = 0 if fit_pass.statistic is not None else sizes.inputs(sizes.batch, compute.itemsize, model_dtype.itemsize)
    batch_peak = sizes.act(sizes.batch) + kept + per_layer
    finalize_peak = sum(_nbytes(s.outputs) for s in sized.values()) + max(hint.finalize for hint in hints.values())
    batch_wins = batch_peak > finalize_peak
    return PhaseEstimate(fit_pass.name, {
        "earlier factors": earlier_bytes, "accumulators": sum(_nbytes(s.state) for s in sized.values()),
        "model forward+backward": sizes.act(sizes.batch) if batch_wins else 0,
        "kept layer inputs": kept if batch_wins else 0,
        "one layer's statistics and update": per_layer if batch_wins else 0,
        "factors and finalize": 0 if batch_wins else finalize_peak})


def _fit_phases(estimator: CurvatureEstimator, sized, layers: Dict[str, _Layer], sizes: _Sizes,
                precision: Precision, model_dtype: torch.dtype) -> Dict[str, PhaseEstimate]:
    """One phase per pass, named as the pass; each holds the factors of the passes before it that it reads
    (``FitPass.reads_factors``: the fit sets the others aside while the pass runs)."""
    phases, earlier = {}, {name: {} for name in layers}
    for fit_pass in estimator.passes:
        compute = precision.fit_dtypes(fit_pass, model_dtype)[1]
        held = sum(_nbytes({key: value for key, value in factors.items() if fit_pass.reads_factor(key)})
                   for factors in earlier.values())
        phases[fit_pass.name] = _pass_phase(fit_pass, sized[fit_pass.name], layers, sizes, held, compute,
                                            model_dtype)
        for name, meta_pass in sized[fit_pass.name].items():
            earlier[name].update(meta_pass.outputs)
    return phases


def _fitted_factors(sized: Dict[str, Dict[str, MetaPass]], layers: Dict[str, _Layer]) -> Dict[str, Tensors]:
    """Every layer's fitted factors (meta tensors): the outputs of all passes."""
    return {name: {key: value for per_layer in sized.values() for key, value in per_layer[name].outputs.items()}
            for name in layers}


def _preconditions_in_place(estimator: CurvatureEstimator, factors: Dict[str, Tensors], layers: Dict[str, _Layer],
                            rows: int, compute: torch.dtype) -> bool:
    """Whether ``precondition`` returns its input (as identity does), run on meta query gradients of every layer,
    whose output shapes it also checks: then the raw gradients are the kept ones, not a copy beside them."""
    returned_input = True
    for name, layer in layers.items():
        grads = torch.empty(rows, *layer.shape, dtype=compute, device=_META)
        out = _on_meta(estimator, "precondition", name, lambda: estimator.precondition(factors[name], grads, None))
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(grads.shape):
            raise InfluenceError(
                f"The estimator {estimator.name!r}'s precondition returned "
                f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__} on meta gradients of "
                f"shape {tuple(grads.shape)} for layer {name!r}; it must return its input's shape.")
        returned_input = returned_input and out is grads
    return returned_input


def _score_hints(estimator, factors, layers: Dict[str, _Layer], rows: int, compute: torch.dtype) -> List[ScoreMemory]:
    return [estimator.memory(Workspace(layer.shape, layer.tokens, rows, compute, factors[name]))
            for name, layer in layers.items()]


def _query_phase(estimator, factors, layers: Dict[str, _Layer], sizes: _Sizes, compute: torch.dtype,
                 model_dtype: torch.dtype) -> PhaseEstimate:
    """Every query's preconditioned gradient is kept; a query batch's forward+backward with every layer's inputs
    kept until the backward pass, its raw per-example gradients of every layer (the streamed values, returned
    together; one layer's beside the kept ones if ``precondition`` returns its input) and the largest layer's
    preconditioning transients."""
    raw = [sizes.query_batch * layer.grad * compute.itemsize for layer in layers.values()]
    in_place = _preconditions_in_place(estimator, factors, layers, sizes.query_batch, compute)
    return PhaseEstimate("query gradients", {
        "kept query gradients": sum(sizes.num_queries * layer.grad * compute.itemsize for layer in layers.values()),
        "model forward+backward": sizes.act(sizes.query_batch),
        "kept layer inputs": sizes.inputs(sizes.query_batch, compute.itemsize, model_dtype.itemsize),
        "per-example gradients": max(raw) if in_place else sum(raw),  # in place: they are the kept ones
        "preconditioning": max(hint.precondition for hint in _score_hints(estimator, factors, layers,
                                                                           sizes.query_batch, compute)),
    })


def _pairwise_phase(layers: Dict[str, _Layer], sizes: _Sizes, compute: torch.dtype,
                    model_dtype: torch.dtype) -> PhaseEstimate:
    """The kept query gradients (low rank: L and R when query_rank is set); per batch, the forward+backward with
    every layer's inputs kept until the backward pass and, one layer at a time, its output gradients and the
    contraction's largest intermediate for ``queries_per_pass`` queries; the score matrices."""
    def query_grad(layer: _Layer) -> int:  # elements of one kept query gradient
        groups, out, inp = layer.shape
        if sizes.query_rank is not None and sizes.query_rank < min(out, inp):
            return groups * sizes.query_rank * (out + inp)
        return layer.grad

    held = sum(sizes.num_queries * query_grad(layer) * compute.itemsize for layer in layers.values())
    contraction = max(_largest_intermediate("qgoi,ntgo,ntgi->qn", (sizes.kept_queries, *l.shape),
                                            (sizes.batch, l.tokens, l.shape[0], l.shape[1]),
                                            (sizes.batch, l.tokens, l.shape[0], l.shape[2]))
                      for l in layers.values())
    scores = sizes.num_queries * sizes.train * compute.itemsize
    gradients = max(sizes.batch * l.tokens * l.shape[0] * l.shape[1] for l in layers.values())
    return PhaseEstimate("pairwise", {
        "kept query gradients": held, "model forward+backward": sizes.act(sizes.batch),
        "kept layer inputs": sizes.inputs(sizes.batch, compute.itemsize, model_dtype.itemsize),
        "contraction": (contraction + gradients) * compute.itemsize,
        "scores per layer": 2 * len(layers) * scores, "scores": scores,
    })


def _self_phase(estimator, factors, layers: Dict[str, _Layer], sizes: _Sizes, compute: torch.dtype,
                model_dtype: torch.dtype) -> PhaseEstimate:
    """Per batch, the forward+backward with every layer's inputs kept until the backward pass and, one layer at a
    time, its statistics and ``self_score``'s transients; the scores."""
    hints = _score_hints(estimator, factors, layers, sizes.batch, compute)
    rotations = max(sizes.batch * layer.passed(False) * compute.itemsize + hint.self_score
                    for layer, hint in zip(layers.values(), hints))
    return PhaseEstimate("self", {
        "model forward+backward": sizes.act(sizes.batch),
        "kept layer inputs": sizes.inputs(sizes.batch, compute.itemsize, model_dtype.itemsize), "rotations": rotations,
        "scores": (2 * len(layers) + 1) * sizes.train * compute.itemsize,
    })


def _discovery_phase(model: nn.Module, layers: Dict[str, _Layer], sizes: _Sizes, model_dtype: torch.dtype
                     ) -> PhaseEstimate:
    """One forward without gradients on the first batch (which holds every tracked call's input, to check that no
    later op modifies it in place), then the exactness check: a forward+backward for autograd's weight gradients,
    kept while a streamed one under the tap makes its summed ``(a, g)`` products (zero accumulators, their
    gradients and the sums with their scale: four tensors of the weights' size in all)."""
    inputs = sizes.inputs(sizes.batch, model_dtype.itemsize, model_dtype.itemsize)
    tracked = sum(p.numel() * p.element_size() for p in model.parameters())
    return PhaseEstimate(DISCOVERY, {
        "exactness check: forward+backward": sizes.act(sizes.batch), "layer inputs": inputs,
        "exactness check: weight gradients": 4 * tracked})


def _check_pass_names(estimator: CurvatureEstimator) -> None:
    clashes = sorted({p.name for p in estimator.passes} & ({DISCOVERY} | set(SCORE_PHASES)))
    if clashes:
        raise InfluenceError(f"The estimator {estimator.name!r} has passes named {clashes}, which estimate_memory "
                             f"uses for its own phases ({[DISCOVERY, *SCORE_PHASES]}): rename them.")


def estimate_memory(
    model: nn.Module,
    task: Task,
    example_batch: Any,
    *,
    strategy: Union[str, CurvatureEstimator] = "ekfac",
    batch_size: Optional[int] = None,
    query_batch_size: Optional[int] = None,
    num_queries: int = 1,
    num_train: Optional[int] = None,
    queries_per_pass: Optional[int] = None,
    query_rank: Optional[int] = None,
    precision: Optional[Precision] = None,
    activation_bytes: Optional[Tuple[int, int]] = None,
    _tap: Optional[ModelTap] = None,
) -> MemoryEstimate:
    """Predicted peak memory (bytes) of each phase: one per fit pass, named as the pass (``covariance`` /
    ``lambda`` for EKFAC; ``fit_factors``), ``query gradients`` and ``pairwise`` (``pairwise_scores``), ``self``
    (``self_scores``).

    ``example_batch`` is one batch as the data yields it (any size; its shapes are what matter), or the Dataset /
    DataLoader itself (its first batch is used, and its length is the default ``num_train``). ``batch_size``
    (default: that batch's size) and ``query_batch_size`` (default ``batch_size``) are the settings to estimate;
    ``num_queries`` and ``num_train`` size the query gradients kept and the score matrix. ``strategy`` is one
    name or a :class:`~fninfluence.CurvatureEstimator` (a user's one is sized as the built-ins are: its passes'
    ``init`` and ``finalize`` run on the meta device, plus its memory hints). See the module docstring for what is
    computed and what is measured.
    """
    precision = precision or Precision()
    estimator = get_estimator(strategy)
    _check_pass_names(estimator)
    example_batch, data_size = _one_batch(example_batch, batch_size, model)
    num_train = num_train or data_size
    tap = _tap or ModelTap(model, task, amp_dtype=precision.amp_dtype)
    tap.discover("train", example_batch)
    layers = _layers(tap, example_batch)
    batch = batch_size or batch_examples(example_batch)
    train = num_train or batch
    activation = activation_bytes or _activation_bytes(tap, example_batch, "train")
    kept = _kept_bytes(tap, example_batch, "train", activation) if activation_bytes is None else \
        (0, sum(layer.inputs for layer in layers.values()) * tap.dtype.itemsize)  # from the shapes: an upper bound
    sizes = _Sizes(batch=min(batch, train),  # no batch is larger than the data
                   query_batch=min(query_batch_size or batch, num_queries), train=train, num_queries=num_queries,
                   kept_queries=min(num_queries, queries_per_pass or num_queries), query_rank=query_rank,
                   activation=activation, kept=kept)
    compute = precision.compute(None, tap.dtype)
    sized = _meta_fit(estimator, layers, precision, tap.dtype)
    factors = _fitted_factors(sized, layers)
    phases = {DISCOVERY: _discovery_phase(model, layers, sizes, tap.dtype),
              **_fit_phases(estimator, sized, layers, sizes, precision, tap.dtype),
              "query gradients": _query_phase(estimator, factors, layers, sizes, compute, tap.dtype),
              "pairwise": _pairwise_phase(layers, sizes, compute, tap.dtype),
              "self": _self_phase(estimator, factors, layers, sizes, compute, tap.dtype)}
    resident = {"parameters": sum(p.numel() * p.element_size() for p in model.parameters()),
                "factors": sum(_nbytes(layer_factors) for layer_factors in factors.values())}
    settings = dict(strategy=estimator.name, batch_size=sizes.batch,
                    query_batch_size=query_batch_size or sizes.batch, num_queries=num_queries, num_train=train,
                    queries_per_pass=queries_per_pass, query_rank=query_rank)
    return MemoryEstimate(phases, resident, settings, fit_phases=(DISCOVERY, *(p.name for p in estimator.passes)))


def _discovery_peak(estimate: MemoryEstimate, checked: bool) -> int:
    """Discovery's peak; ``checked``: without the exactness check (it already ran in this process), discovery's
    own forward pass on the first batch remains, bounded by the check's forward+backward on the same batch."""
    discovery = estimate.phases[DISCOVERY]
    if not checked:
        return discovery.peak
    return max(discovery.breakdown["layer inputs"], discovery.breakdown["exactness check: forward+backward"])


def fit_phase_peak(estimate: MemoryEstimate, checked: bool = False) -> int:
    """The peak of a whole ``fit_factors`` call: discovery, then its passes one after the other.

    ``checked`` (here and in the other call peaks): the process already ran discovery's exactness check for the
    same model and task objects and unchanged parameters (an earlier fit or scoring call), so the call skips it.
    """
    passes = [estimate.phases[p].peak for p in estimate.fit_phases if p in estimate.phases and p != DISCOVERY]
    return max([_discovery_peak(estimate, checked), *passes])


def self_call_peak(estimate: MemoryEstimate, checked: bool = False) -> int:
    """The peak of a whole ``self_scores`` call: discovery (with its exactness check unless ``checked``), then the
    pass."""
    return max(_discovery_peak(estimate, checked), estimate.phases["self"].peak)


def pairwise_call_peak(estimate: MemoryEstimate, checked: bool = False) -> int:
    """The peak of a whole ``pairwise_scores`` call: discovery, query gradients, then the pass over the training
    data."""
    return max(_discovery_peak(estimate, checked), estimate.phases["query gradients"].peak,
               estimate.phases["pairwise"].peak)


@dataclass
class Suggestion:
    """Settings that fit a memory budget, and the estimate they were chosen by.

    ``settings`` holds ``batch_size`` and ``query_batch_size`` (for ``fit_factors``, ``pairwise_scores`` and
    ``self_scores``) and ``queries_per_call``: split the queries into calls of at most that many (None: one call),
    because every query's preconditioned gradient is kept during a ``pairwise_scores`` call.
    """

    settings: Dict[str, Any]
    estimate: MemoryEstimate

    def __str__(self) -> str:
        return f"{self.settings}\n{self.estimate}"


def _one_batch(example: Any, batch_size: Optional[int], model: nn.Module) -> Tuple[Any, Optional[int]]:
    """``(a batch, the number of examples in the data set or None)`` from what the user passed as the example batch:
    a batch as it is, or the first batch of a Dataset / DataLoader (whose length then sizes the training set)."""
    if not isinstance(example, (Dataset, DataLoader)):
        return example, None
    loader = as_loader(example, None if isinstance(example, DataLoader) else batch_size, "example_batch")
    try:
        batch = next(iter(loader))
    except StopIteration:
        raise InfluenceError("example_batch is an empty data set: pass one batch, or a data set with examples.") \
            from None
    try:
        size = len(loader.dataset)
    except TypeError:  # an IterableDataset without a length
        size = None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return to_device(batch, device), size


def _halvings(start: int) -> Sequence[int]:
    sizes = []
    while start >= 1:
        sizes.append(start)
        start //= 2
    return sizes


def suggest(
    model: nn.Module,
    task: Task,
    example_batch: Any,
    budget_bytes: int,
    *,
    strategy: Union[str, CurvatureEstimator] = "ekfac",
    num_queries: int = 1,
    num_train: Optional[int] = None,
    max_batch_size: int = 512,
    precision: Optional[Precision] = None,
) -> Suggestion:
    """Settings whose estimated total peak (:attr:`MemoryEstimate.peak`) fits ``budget_bytes``.

    Fewer ``pairwise_scores`` calls come first, since each call is a pass over the whole training set: all
    ``num_queries`` queries in one call if any batch size fits, else calls of half as many queries, and so on;
    for that query count, the largest batch size (a power of two up to ``max_batch_size``) that fits with some
    ``query_batch_size`` (the largest that does; preconditioning temporaries grow with it). Raises
    :class:`InfluenceError` when nothing fits.

    Measures the model's forward+backward once (see :func:`estimate_memory`) and reuses it for every candidate.
    """
    precision = precision or Precision()
    example_batch, data_size = _one_batch(example_batch, None, model)
    num_train = num_train or data_size
    tap = ModelTap(model, task, amp_dtype=precision.amp_dtype)
    tap.discover("train", example_batch)
    activation = _activation_bytes(tap, example_batch, "train")

    def estimate(batch_size: int, query_batch_size: int, queries: int) -> MemoryEstimate:
        return estimate_memory(model, task, example_batch, strategy=strategy, batch_size=batch_size,
                               query_batch_size=query_batch_size, num_queries=queries, num_train=num_train,
                               precision=precision, activation_bytes=activation, _tap=tap)

    smallest = None
    for queries in _halvings(num_queries):
        for batch_size in _halvings(max_batch_size):
            for query_batch_size in _halvings(min(batch_size, queries)):
                candidate = estimate(batch_size, query_batch_size, queries)
                smallest = candidate if smallest is None or candidate.peak < smallest.peak else smallest
                if candidate.fits(budget_bytes):
                    settings = dict(batch_size=batch_size, query_batch_size=query_batch_size,
                                    queries_per_call=None if queries == num_queries else queries)
                    return Suggestion(settings, candidate)
    raise InfluenceError(
        f"No batch size fits {budget_bytes / MiB:.1f} MiB: even one example and one query per call need an estimated "
        f"{smallest.peak / MiB:.1f} MiB ({', '.join(f'{k} {v / MiB:.1f} MiB' for k, v in smallest.resident.items())} "
        "resident). Use a strategy with smaller factors (diagonal or identity), track fewer layers "
        "(Task.tracked_modules()), or a machine with more memory."
    )
