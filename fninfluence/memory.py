"""Memory estimates: the peak memory of each phase for a model, batch size, strategy and options.

Everything fninfluence allocates is computed from the shapes the tap discovers on an example batch: per
tracked layer ``(groups G, out, in)`` and tokens per example ``T``. For a batch of ``B`` examples:

* layer statistics ``a: [B, T, G, in]``, ``g: [B, T, G, out]``; per-example gradients ``[B, G, out, in]``;
* KFAC/EKFAC states and factors ``A: [G, in, in]``, ``S: [G, out, out]`` (plus their float64 eigenvectors)
  and ``Lambda: [G, out, in]``;
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

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import opt_einsum
import torch
from torch import nn
from torch.utils._pytree import tree_map

from .capture import ModelTap, batch_examples, unfused
from .curvature import get_estimator
from .errors import InfluenceError
from .precision import Precision
from .task import Task

MiB = 2 ** 20
FIT_PHASES = ("discovery", "covariance", "lambda")  # fit_factors: the factors are made during the call

# Live copies of the largest layer's block of per-example query gradients while it is preconditioned, beyond
# the raw gradients of every layer: the rotation into the eigenbasis (torch.einsum keeps one intermediate),
# the scaled copy and the rotation back (measured on CPU; identity returns its input, diagonal scales it once).
_PRECONDITION_COPIES = {"identity": 0, "diagonal": 0, "kfac": 3, "ekfac": 3}
_EIGEN = ("kfac", "ekfac")


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

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return result, peak


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

    def before(self, phase: str) -> int:
        """What exists before a phase's call: the parameters, and for scoring also the factors."""
        return self.resident["parameters"] + (0 if phase in FIT_PHASES else self.resident["factors"])

    @property
    def peak(self) -> int:
        """The largest total at any time: over phases, what exists before the call plus the call's peak."""
        return max(self.before(name) + phase.peak for name, phase in self.phases.items())

    def fits(self, budget_bytes: int) -> bool:
        return self.peak <= budget_bytes

    def __str__(self) -> str:
        lines = [f"{'phase':<16}{'peak MiB':>10}  largest terms"]
        for phase in self.phases.values():
            top = sorted(phase.breakdown.items(), key=lambda kv: -kv[1])[:3]
            terms = ", ".join(f"{k} {v / MiB:.1f}" for k, v in top if v > 0)
            lines.append(f"{phase.name:<16}{phase.peak / MiB:>10.1f}  {terms}")
        lines.append(f"{'resident':<16}{sum(self.resident.values()) / MiB:>10.1f}  "
                     + ", ".join(f"{k} {v / MiB:.1f}" for k, v in self.resident.items()))
        lines.append(f"{'total peak':<16}{self.peak / MiB:>10.1f}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Layer:
    groups: int
    out: int
    inp: int
    tokens: int  # per example, all calls together
    one_hot: bool

    @property
    def grad(self) -> int:  # elements of one example's gradient
        return self.groups * self.out * self.inp

    @property
    def stats(self) -> int:  # elements of a, g per example
        return self.tokens * self.groups * ((0 if self.one_hot else self.inp) + self.out)

    @property
    def covariances(self) -> int:  # elements of A and S
        return self.groups * ((self.inp if self.one_hot else self.inp ** 2) + self.out ** 2)


def _repeat(batch: Any, times: int) -> Any:
    return tree_map(lambda x: torch.cat([x] * times) if isinstance(x, torch.Tensor) and x.dim() > 0 else x, batch)


def _activation_bytes(tap: ModelTap, batch: Any, objective: str) -> Tuple[int, int]:
    """``(fixed, per example)`` bytes of one tap forward+backward, measured at the batch and at twice it."""
    peaks = []
    for times in (1, 2):
        repeated = _repeat(batch, times)
        probes = tap.probes_for(objective, repeated)
        with unfused():
            _, peak = measure_peak(lambda: tap.layer_stats(objective, tap.params, tap.buffers, repeated, probes),
                                   tap.device)
        peaks.append(peak)
    examples = batch_examples(batch)
    per_example = max(0, (peaks[1] - peaks[0]) // examples)
    return max(0, peaks[0] - per_example * examples), per_example


def _layers(tap: ModelTap, batch: Any) -> Dict[str, _Layer]:
    tokens = tap.tokens_per_call("train", batch)
    return {name: _Layer(*spec.shape, tokens=tokens[name] * spec.calls, one_hot=spec.one_hot)
            for name, spec in tap.specs.items()}


def _largest_intermediate(equation: str, *shapes: Tuple[int, ...]) -> int:
    _, info = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize="optimal")
    return int(info.largest_intermediate)


def _factor_bytes(layer: _Layer, strategy: str, accumulate: int) -> int:
    """Fitted factors of one layer: A, S in the accumulator dtype, their eigenvectors and eigenvalues in float64,
    Lambda (float64 for KFAC's outer product, the accumulator dtype for EKFAC and diagonal)."""
    if strategy == "identity":
        return 0
    if strategy == "diagonal":
        return layer.grad * accumulate
    covariances = layer.covariances * (accumulate + 8) + layer.groups * (layer.inp + layer.out) * 8
    return covariances + layer.grad * (8 if strategy == "kfac" else accumulate)


def _eigenvector_bytes(layer: _Layer, compute: int) -> int:
    """The float64 eigenvectors cast to the compute dtype at each use (nothing when that is float64)."""
    return 0 if compute == 8 else layer.groups * (layer.inp ** 2 + layer.out ** 2) * compute


def _inverse_bytes(layer: _Layer, strategy: str, compute: int) -> int:
    """``1 / (Lambda + damping)``: widened to float64 (KFAC's Lambda already is), damped, inverted, cast back."""
    if strategy == "identity":
        return 0
    return layer.grad * ((2 if strategy == "kfac" else 3) * 8 + compute)


def _fit_phases(layers: Dict[str, _Layer], strategy: str, batch: int, act: Callable[[int], int],
                accumulate: int, compute: int) -> Dict[str, PhaseEstimate]:
    phases = {}
    factors = {name: _factor_bytes(layer, strategy, accumulate) for name, layer in layers.items()}
    summed = 8  # sums across batches are float64 whatever the factors' dtype (see Precision.fit_dtypes)
    if strategy in ("kfac", "ekfac"):
        states = sum(layer.covariances * summed for layer in layers.values())
        per_batch = max(layer.covariances * accumulate + batch * layer.stats * accumulate for layer in layers.values())
        covariance_factors = {name: factors[name] - (layer.grad * accumulate if strategy == "ekfac" else 0)
                              for name, layer in layers.items()}
        # widened and symmetrised copies, the eigenvectors and LAPACK's workspace: ~4 float64 copies of the matrix
        eigh = max(4 * max(layer.inp if layer.one_hot else layer.inp ** 2, layer.out ** 2) * 8 * layer.groups
                   for layer in layers.values())
        batch_peak = act(batch) + per_batch
        finalize_peak = sum(covariance_factors.values()) + eigh
        phases["covariance"] = PhaseEstimate("covariance", {
            "accumulators": states, "model forward+backward": batch_peak if batch_peak > finalize_peak else 0,
            "factors and eigh": finalize_peak if finalize_peak >= batch_peak else 0})
        earlier = sum(covariance_factors.values())
    else:
        earlier = 0
    if strategy in ("diagonal", "ekfac"):
        state = sum(layer.grad * summed for layer in layers.values())
        per_batch = max(batch * layer.stats * compute + layer.grad * summed
                        + (_eigenvector_bytes(layer, compute) if strategy in _EIGEN else 0)
                        + (2 * batch * layer.grad * compute if layer.tokens > 1 else 0) for layer in layers.values())
        phases["lambda"] = PhaseEstimate("lambda", {
            "earlier factors": earlier, "accumulators": state, "model forward+backward": act(batch),
            "rotated statistics": per_batch, "Lambda": state})
    return phases


def estimate_memory(
    model: nn.Module,
    task: Task,
    example_batch: Any,
    *,
    strategy: str = "ekfac",
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
    """Predicted peak memory (bytes) of each phase: ``covariance`` / ``lambda`` (``fit_factors``), ``query
    gradients`` and ``pairwise`` (``pairwise_scores``), ``self`` (``self_scores``).

    ``example_batch`` is one batch as the data yields it (any size; its shapes are what matter). ``batch_size``
    (default: that batch's size) and ``query_batch_size`` (default ``batch_size``) are the settings to estimate;
    ``num_queries`` and ``num_train`` size the query gradients kept and the score matrix. ``strategy`` is one
    name. See the module docstring for what is computed and what is measured.
    """
    precision = precision or Precision()
    name = get_estimator(strategy).name
    if name not in _PRECONDITION_COPIES:
        raise InfluenceError(f"estimate_memory knows the built-in strategies {sorted(_PRECONDITION_COPIES)}, "
                             f"not {name!r}: estimate with the built-in one closest to it.")
    tap = _tap or ModelTap(model, task, amp_dtype=precision.amp_dtype)
    tap.discover("train", example_batch)
    layers = _layers(tap, example_batch)
    batch = batch_size or batch_examples(example_batch)
    query_batch = min(query_batch_size or batch, num_queries)
    train = num_train or batch
    batch = min(batch, train)  # no batch is larger than the data
    fixed, per_example = activation_bytes or _activation_bytes(tap, example_batch, "train")
    act = lambda b: fixed + per_example * b  # noqa: E731
    accumulate = torch.tensor([], dtype=precision.accumulator(None, tap.dtype)).element_size()
    compute = torch.tensor([], dtype=precision.compute(None, tap.dtype)).element_size()

    stats_bytes = batch * sum(l.stats for l in layers.values()) * tap.dtype.itemsize
    tracked = sum(p.numel() * p.element_size() for p in model.parameters())
    # one forward without gradients on the first batch, then the exactness check: one forward+backward under the
    # tap that also takes autograd's weight gradients, compared with the tap's summed (a, g) products
    phases = {"discovery": PhaseEstimate("discovery", {
        "layer inputs and outputs": stats_bytes, "exactness check: forward+backward": act(batch),
        "exactness check: layer inputs and output gradients": stats_bytes,
        "exactness check: weight gradients": 2 * tracked})}
    phases.update(_fit_phases(layers, name, batch, act, accumulate, compute))
    copies = _PRECONDITION_COPIES[name]
    kept_queries = min(num_queries, queries_per_pass or num_queries)

    def query_grad(layer: _Layer) -> int:  # elements of one kept query gradient (low rank: L and R)
        if query_rank is not None and query_rank < min(layer.out, layer.inp):
            return layer.groups * query_rank * (layer.out + layer.inp)
        return layer.grad

    # every query's gradient is kept (low rank when query_rank is set); queries_per_pass bounds the contraction
    held = sum(num_queries * query_grad(layer) * compute for layer in layers.values())
    raw = [query_batch * layer.grad * compute for layer in layers.values()]
    # identity: only torch.einsum's temporary of the largest layer; the others keep every layer's raw gradients
    # while preconditioning, and cast the float64 eigenvectors to the compute dtype
    phases["query gradients"] = PhaseEstimate("query gradients", {
        "kept query gradients": sum(num_queries * layer.grad * compute for layer in layers.values()),
        "model forward+backward": act(query_batch),
        "per-example gradients": max(raw) if name == "identity" else sum(raw),
        "preconditioning": max(copies * r + _inverse_bytes(l, name, compute)
                               + (_eigenvector_bytes(l, compute) if name in _EIGEN else 0)
                               for r, l in zip(raw, layers.values())),
    })
    contraction = max(_largest_intermediate("qgoi,ntgo,ntgi->qn", (kept_queries, l.groups, l.out, l.inp),
                                            (batch, l.tokens, l.groups, l.out), (batch, l.tokens, l.groups, l.inp))
                      for l in layers.values())
    scores = num_queries * train * compute
    phases["pairwise"] = PhaseEstimate("pairwise", {
        "kept query gradients": held, "model forward+backward": act(batch),
        "contraction": contraction * compute,
        "scores per layer": 2 * len(layers) * scores, "scores": scores,
    })
    self_transient = max(batch * layer.stats * compute + _inverse_bytes(layer, name, compute)
                         + (_eigenvector_bytes(layer, compute) if name in _EIGEN else 0)
                         + (2 * batch * layer.grad * compute if layer.tokens > 1 else 0) for layer in layers.values())
    phases["self"] = PhaseEstimate("self", {
        "model forward+backward": act(batch), "rotations": self_transient,
        "scores": (2 * len(layers) + 1) * train * compute,
    })
    resident = {
        "parameters": sum(p.numel() * p.element_size() for p in model.parameters()),
        "factors": sum(_factor_bytes(layer, name, accumulate) for layer in layers.values()),
    }
    settings = dict(strategy=name, batch_size=batch, query_batch_size=query_batch_size or batch,
                    num_queries=num_queries, num_train=train, queries_per_pass=queries_per_pass, query_rank=query_rank)
    return MemoryEstimate(phases, resident, settings)


def fit_phase_peak(estimate: MemoryEstimate) -> int:
    """The peak of a whole ``fit_factors`` call: its passes run one after the other."""
    return max(estimate.phases[p].peak for p in FIT_PHASES if p in estimate.phases)


def self_call_peak(estimate: MemoryEstimate) -> int:
    """The peak of a whole ``self_scores`` call: discovery (with its exactness check), then the pass."""
    return max(estimate.phases["discovery"].peak, estimate.phases["self"].peak)


def pairwise_call_peak(estimate: MemoryEstimate) -> int:
    """The peak of a whole ``pairwise_scores`` call: query gradients first, then the pass over the training data."""
    return max(estimate.phases["discovery"].peak, estimate.phases["query gradients"].peak,
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
    strategy: str = "ekfac",
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
