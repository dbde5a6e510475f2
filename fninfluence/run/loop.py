"""The one loop over a data slice: every pass of the library (a fitting cell, the query gradients, a scoring
cell, the training-gradient index) is :func:`run_pass` with its own :class:`BatchStep`.

The loop owns what every pass needs and nothing a pass decides:

- the batches, in order, on the model's device (:func:`fninfluence.run.data.batches`, which also hashes them
  for the stores' data digests);
- the zero probes of each objective for the batch's shapes (:meth:`ModelTap.probes_for`);
- optional ``torch.compile(fullgraph=True)`` of the pure step, with the batch dimension marked dynamic;
- sampled labels drawn per example (:mod:`fninfluence.sampling`) when the objective is ``train_sampled``;
- the error context of a batch (``add_note``) and the finiteness check of the step's flags (one device sync);
- the progress bar and the pass's log record.

A pass supplies a pure ``compute(params, buffers, batch, probes, inputs) -> (checked, output)`` (``probes`` a
tuple, one dict per objective; ``inputs`` what the step reads that is not the batch: a fit state, factors,
query gradients) and a host-side ``fold(carry, output) -> carry``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from .. import sampling
from . import ranks as parallel
from ..capture import ModelTap, batch_examples, unfused
from .data import Data, batches, num_batches
from ..errors import InfluenceError
from ..progress import log_phase

CompileOption = Union[bool, Mapping[str, Any]]


@dataclass(frozen=True)
class BatchStep:
    """One pass's per-batch work.

    ``compute`` is pure and may be compiled; ``inputs(carry)`` is what it reads besides the batch and the
    probes; ``fold(carry, output)`` keeps its result on the host side; ``check(checked, index)`` raises for a
    non-finite stage (see :mod:`fninfluence.run.finite`); ``init()`` builds the carry when the first batch
    arrives and the pass started with ``carry=None`` (a fit state, whose shapes discovery knows).
    """

    compute: Callable[..., Tuple[Any, Any]]
    objectives: Tuple[str, ...]
    fold: Callable[[Any, Any], Any]
    check: Callable[[Any, int], None]
    inputs: Callable[[Any], Any] = lambda carry: None
    init: Optional[Callable[[], Any]] = None
    _runners: Dict[Any, Callable] = field(default_factory=dict, compare=False, repr=False)

    def runner(self, compile: CompileOption) -> Callable:
        """``compute``, compiled once per step and option (a step run over several slices, e.g. one pass per
        group of queries, reuses its graph)."""
        key = repr(compile)
        if key not in self._runners:
            self._runners[key] = maybe_compile(self.compute, compile)
        return self._runners[key]


@dataclass(frozen=True)
class PassSettings:
    """How one pass runs: its label (progress, log record, error notes), the batch size and the argument name
    the data came in as (for error messages), whether to compile and show progress, and where its examples
    start in the whole dataset with the seed of sampled labels (``seed=None``: no sampled labels)."""

    label: str
    batch_size: Optional[int]
    compile: CompileOption = False
    progress: bool = True
    argument: str = "data"
    first_example: int = 0
    seed: Optional[int] = None
    owns: Optional[Callable[[int], bool]] = None  # batches this rank computes (None: all); others fold None
    log: bool = True


def run_pass(tap: ModelTap, data: Data, step: BatchStep, carry: Any, settings: PassSettings) -> Tuple[Any, int]:
    """``(carry, examples)`` after folding every batch of ``data`` through ``step``."""
    run = step.runner(tap.compile_option(settings.compile))
    bar = tqdm(total=num_batches(data, settings.batch_size, settings.argument), desc=settings.label, unit="batch",
               disable=not settings.progress, leave=False)
    started, examples = time.perf_counter(), 0
    lockstep = parallel.ranks(None) if tap.sharded else None  # FSDP: every rank runs every step (see _lockstep)
    try:  # an interrupted pass (Ctrl-C) leaves no progress bar behind
        for index, batch, counted in _steps(tap, data, settings, lockstep):
            if settings.owns is not None and not settings.owns(index):
                carry = step.fold(carry, None)
                continue
            size = batch_examples(batch)
            first = settings.first_example + examples
            with on_batch(settings.label, index), _sampled_labels(settings.seed, first, tap.device):
                if settings.seed is not None:  # each batch carries its examples' indices (see fninfluence.sampling)
                    batch = sampling.with_example_ids(batch, first, size, tap.device)
                if lockstep is not None:
                    _discover_together(tap, lockstep, step.objectives, batch)
                probes = tuple(tap.probes_for(objective, batch) for objective in step.objectives)
                if carry is None and step.init is not None:
                    carry = step.init()
                # a padding step of a sharded model runs on a scratch carry: an eager fit adds into its state in place
                inputs = step.inputs(carry if counted or step.init is None else step.init())
                checked, output = run(tap.params, tap.buffers, batch, probes, inputs)
            if not counted:
                continue
            step.check(checked, index)
            carry = step.fold(carry, output)
            examples += size
            bar.update(1)
    finally:
        bar.close()
    if settings.log:
        log_phase(settings.label, examples, started, tap.device)
    return carry, examples


def _steps(tap: ModelTap, data: Data, settings: PassSettings, lockstep) -> Iterator[Tuple[int, Any, bool]]:
    """``(index, batch, counted)`` per step: the batches of ``data``, padded to the other ranks' count when
    ``lockstep`` (the ranks of a model sharded by ``fully_shard``, see :func:`_lockstep`)."""
    loaded = batches(data, settings.batch_size, tap.device, settings.argument)
    if lockstep is None:
        for index, batch in enumerate(loaded):
            yield index, batch, True
        return
    yield from _lockstep(lockstep, loaded, num_batches(data, settings.batch_size, settings.argument))


def _lockstep(ranks, loaded, count: Optional[int]) -> Iterator[Tuple[int, Any, bool]]:
    """Every rank runs as many forward and backward passes as the rank with the most batches, in the same order:
    FSDP gathers each unit's parameters with collectives that must pair up across ranks (a rank that ran one pass
    more or less would pair its gathers with another unit's, get wrong values, then hang). A rank out of batches
    repeats its last one, uncounted."""
    if count is None:
        raise InfluenceError("A model sharded by fully_shard needs data with a length (a Dataset, or a DataLoader "
                             "over one), so that the ranks can run the same number of batches.")
    if ranks.largest(int(count == 0)):  # decided together, so that every rank raises
        raise InfluenceError("A model sharded by fully_shard needs a batch on every rank, but a rank's share of the "
                             "data is empty (fewer examples than data partitions): use fewer ranks or more data.")
    last = None
    for index in range(ranks.largest(count)):
        batch = next(loaded, None)
        counted = batch is not None
        last = batch if counted else last
        yield index, last, counted


def _discover_together(tap: ModelTap, ranks, objectives, batch) -> None:
    """A batch of shapes some rank has not seen needs a discovery pass (a forward): then every rank runs one, on
    its own batch, so that their forward passes stay paired."""
    if ranks.largest(int(any(not tap.knows(objective, batch) for objective in objectives))):
        for objective in objectives:
            tap.rediscover(objective, batch)


def _sampled_labels(seed: Optional[int], first: int, device: torch.device):
    return contextlib.nullcontext() if seed is None else sampling.seeded_generators(seed, first, device)


# -- compilation -----------------------------------------------------------------------------------

def _mark_shapes(args: Sequence[Any], batched: Sequence[int]) -> None:
    """Dimension 0 (the examples) of the tensors in ``args[batched]`` dynamic, every other dimension
    static: a last, shorter batch then reuses the compiled graph instead of compiling another, and the
    contraction plans (:mod:`fninfluence.core.contract`) see static sizes everywhere else. (``maybe_``: a model that
    needs a fixed batch size still compiles, specialised.) The model's parameters and buffers (the first two
    arguments) are left alone: their shapes never change, and they are the user's tensors."""
    for position, value in enumerate(args):
        if position < 2:
            continue
        for leaf in torch.utils._pytree.tree_leaves(value):
            if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
                continue
            dynamic = position in batched
            if dynamic:
                torch._dynamo.maybe_mark_dynamic(leaf, 0)
            else:  # e.g. query gradients returned by another compiled step inherit its dynamic batch dimension
                vars(leaf).pop("_dynamo_propagated_dynamic_indices", None)
            for dim in range(1 if dynamic else 0, leaf.dim()):
                torch._dynamo.mark_static(leaf, dim)


def maybe_compile(fn: Callable, compile: CompileOption, batched: Sequence[int] = (2, 3)) -> Callable:
    """``fn``, or ``torch.compile(fn, fullgraph=True, **options)`` (a graph break is an error), run with
    PyTorch's fused attention fast paths off so that the tap sees the layers inside them. The arguments
    at positions ``batched`` (the batch and the probes) have their first dimension marked dynamic."""
    dynamic_batch = False
    if compile:
        options = {} if compile is True else dict(compile)
        fn = torch.compile(fn, fullgraph=True, **options)
        dynamic_batch = options.get("dynamic") is not False

    def run(*args):
        if dynamic_batch:
            _mark_shapes(args, batched)
        with unfused():
            return fn(*args)

    return run


# -- errors ----------------------------------------------------------------------------------------

_UNSUPPORTED_AUTOGRAD = (
    "The model uses an autograd.Function without setup_context or a saved-tensor hook (e.g. activation "
    "checkpointing or offloading by a library other than torch.utils.checkpoint) that torch.func.grad "
    "cannot run. Turn it off while computing influence (e.g. model.gradient_checkpointing_disable() for "
    "Hugging Face models, or call the checkpointed blocks directly); checkpointing only trades memory for "
    "time, the results do not change. (torch.utils.checkpoint itself is supported.)"
)


def _compile_failure(error: BaseException, what: str, index: int) -> Optional[InfluenceError]:
    """The :class:`InfluenceError` for an error of ``torch.compile`` itself (a graph break is an error under
    ``fullgraph=True``, e.g. data-dependent control flow in the model), or None for any other error."""
    if not type(error).__module__.startswith("torch._dynamo"):
        return None
    message = str(error)
    caused = next((line.strip() for line in message.splitlines() if line.strip().startswith("Caused by:")), None)
    if "data-dependent" in message:
        reason = "the code reads a tensor's value in Python (if x.any():, .item(), .tolist())"
    else:
        first = message.strip().splitlines()[0] if message.strip() else type(error).__name__
        reason = first[:157] + "..." if len(first) > 160 else first
    where = f" ({caused[:197] + '...' if len(caused) > 200 else caused})" if caused else ""
    return InfluenceError(
        f"torch.compile cannot compile {what} as one graph: {reason}{where} [batch {index}]. Pass compile=False: "
        "the eager run gives the same results (and shows the model's own error, if there is one)."
    )


@contextlib.contextmanager
def on_batch(what: str, index: int):
    """Adds to any error raised while processing a batch which pass and which batch it was; errors of
    ``torch.compile`` itself and unsupported autograd functions become :class:`InfluenceError` s saying so."""
    try:
        yield
    except RuntimeError as error:
        message = str(error)
        if "setup_context staticmethod" in message or "saved tensor hooks" in message:
            raise InfluenceError(f"{_UNSUPPORTED_AUTOGRAD} [{what}, batch {index}]") from error
        compiled = _compile_failure(error, what, index)
        if compiled is not None:
            raise compiled from error
        error.add_note(f"fninfluence: raised while computing {what} on batch {index}.")
        raise
    except Exception as error:
        error.add_note(f"fninfluence: raised while computing {what} on batch {index}.")
        raise
