"""The imperative shell: loops over data, discovery, compilation, progress.

Each public function composes the pure per-batch pieces — :meth:`ModelTap.layer_stats`, an
estimator's ``update`` / ``precondition`` / ``self_score``, the contractions in :mod:`.scores` — into one
step function per pass, optionally compiled with ``torch.compile(fullgraph=True)``, and runs it over
the batches.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import ModelTap, check_finite
from .curvature import CurvatureEstimator, get_estimator, per_example_grads
from .data import Data, batches, num_batches
from .errors import InfluenceError
from .factors import Factors
from .scores import example_grad_dot, pairwise_layer_scores, total
from .task import Task

logger = logging.getLogger("fninfluence")

CompileOption = Union[bool, Mapping[str, Any]]


def _maybe_compile(fn: Callable, compile: CompileOption) -> Callable:
    """``fn`` itself, or ``torch.compile(fn, fullgraph=True, **options)``: a graph break is an error."""
    if not compile:
        return fn
    options = {} if compile is True else dict(compile)
    return torch.compile(fn, fullgraph=True, **options)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _progress(data: Data, batch_size: Optional[int], desc: str, enabled: bool, argument: str):
    return tqdm(total=num_batches(data, batch_size, argument), desc=desc, unit="batch", disable=not enabled,
                leave=False)


@contextlib.contextmanager
def _on_batch(what: str, index: int):
    """Adds to any error raised while processing a batch which pass and which batch it was."""
    try:
        yield
    except Exception as error:
        if hasattr(error, "add_note"):
            error.add_note(f"fninfluence: raised while computing {what} on batch {index}.")
        raise


def _check_damping(damping: Optional[float]) -> None:
    if damping is not None and (not isinstance(damping, (int, float)) or damping < 0):
        raise InfluenceError(f"damping must be a non-negative number or None (heuristic), got {damping!r}.")


def fit_factors(
    model: nn.Module,
    task: Task,
    data: Data,
    *,
    strategy: Union[str, CurvatureEstimator] = "ekfac",
    use_empirical_fisher: bool = False,
    batch_size: Optional[int] = None,
    compile: CompileOption = False,
    progress: bool = True,
) -> Factors:
    """Fit the curvature factors of ``strategy`` on ``data``.

    With ``use_empirical_fisher=False`` (the default) the task is asked for labels sampled from the
    model (``sample=True``), which gives the true Fisher; with True the batch's own labels are used.
    ``compile`` may be True or a dict of ``torch.compile`` options (``fullgraph=True`` is always set).
    """
    estimator = get_estimator(strategy)
    engine = ModelTap(model, task)
    objective = "train" if use_empirical_fisher else "train_sampled"
    dtype = _accumulation_dtype(engine.dtype)
    factors: Dict[str, Dict[str, torch.Tensor]] = {}
    examples = 0

    if not estimator.passes:  # identity: only the layer structure is needed
        first = next(iter(batches(data, batch_size, engine.device)), None)
        if first is None:
            raise InfluenceError("data is empty: there is nothing to fit factors on.")
        engine.probes_for(objective, first)

    for fit_pass in estimator.passes:
        def step(params, buffers, batch, probes, state, earlier, fit_pass=fit_pass):
            loss, stats = engine.layer_stats(objective, params, buffers, batch, probes)
            return loss, {layer: fit_pass.update(state[layer], stats[layer], earlier[layer]) for layer in state}

        run = _maybe_compile(step, compile)
        state, examples, started = None, 0, time.perf_counter()
        bar = _progress(data, batch_size, f"{estimator.name}: {fit_pass.name}", progress, "data")
        for index, batch in enumerate(batches(data, batch_size, engine.device)):
            with _on_batch(f"{estimator.name} {fit_pass.name}", index):
                probes = engine.probes_for(objective, batch)
            if state is None:
                state = {layer: fit_pass.init(spec.shape, dtype, engine.device) for layer, spec in engine.specs.items()}
                factors = {layer: factors.get(layer, {}) for layer in engine.specs}
            with _on_batch(f"{estimator.name} {fit_pass.name}", index):
                loss, state = run(engine.params, engine.buffers, batch, probes, state, factors)
            check_finite(loss, objective, index)
            examples += next(iter(probes.values()))[0].shape[0]
            bar.update(1)
        bar.close()
        if state is None:
            raise InfluenceError("data is empty: there is nothing to fit factors on.")
        factors = {layer: {**factors[layer], **fit_pass.finalize(state[layer], factors[layer])} for layer in state}
        logger.info("%s %s pass: %d examples in %.2fs", estimator.name, fit_pass.name, examples,
                    time.perf_counter() - started)

    return Factors(
        strategy=estimator.name, estimator=estimator, layers=dict(engine.specs),
        tensors={layer: factors.get(layer, {}) for layer in engine.specs}, num_examples=examples,
        use_empirical_fisher=use_empirical_fisher,
    )


def _check_layers(factors: Factors, engine: ModelTap) -> None:
    fitted = {name: spec.shape for name, spec in factors.layers.items()}
    here = {name: spec.shape for name, spec in engine.specs.items()}
    if fitted != here:
        raise InfluenceError(
            f"The factors were fitted on layers {fitted}, but this model and task track {here}. Fit factors "
            "with the same model and Task.tracked_modules()."
        )


def _factors_on(factors: Factors, engine: ModelTap) -> Dict[str, Dict[str, torch.Tensor]]:
    """Factors on the model's device, fetched once per call rather than per batch."""
    return {layer: {k: v.to(engine.device) for k, v in t.items()} for layer, t in factors.tensors.items()}


def query_gradients(
    model: nn.Module,
    task: Task,
    factors: Factors,
    query_data: Data,
    *,
    damping: Optional[float] = None,
    batch_size: Optional[int] = None,
    compile: CompileOption = False,
    progress: bool = True,
    _engine: Optional[ModelTap] = None,
) -> List[Dict[str, torch.Tensor]]:
    """Preconditioned measurement gradients ``P(grad f(query))``, one dict ``{layer: [Q_b, G, out, in]}`` per batch."""
    _check_damping(damping)
    engine = _engine or ModelTap(model, task)
    estimator = factors.estimator
    on_device = _factors_on(factors, engine)

    def step(params, buffers, batch, probes, layer_factors):
        loss, stats = engine.layer_stats("measurement", params, buffers, batch, probes)
        grads = {layer: estimator.precondition(layer_factors[layer], per_example_grads(s), damping)
                 for layer, s in stats.items()}
        return loss, grads

    run = _maybe_compile(step, compile)
    chunks = []
    bar = _progress(query_data, batch_size, "query gradients", progress, "query_data")
    for index, batch in enumerate(batches(query_data, batch_size, engine.device, "query_data")):
        with _on_batch("query gradients", index):
            probes = engine.probes_for("measurement", batch)
            _check_layers(factors, engine)
            loss, grads = run(engine.params, engine.buffers, batch, probes, on_device)
        check_finite(loss, "measurement", index)
        chunks.append(grads)
        bar.update(1)
    bar.close()
    if not chunks:
        raise InfluenceError("query_data is empty: there is no query to score.")
    return chunks


def pairwise_scores(
    model: nn.Module,
    task: Task,
    factors: Factors,
    query_data: Data,
    train_data: Data,
    *,
    damping: Optional[float] = None,
    batch_size: Optional[int] = None,
    query_batch_size: Optional[int] = None,
    per_module: bool = False,
    compile: CompileOption = False,
    progress: bool = True,
) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
    """Influence of every training example on every query: a ``[Q, N]`` tensor (per layer if ``per_module``).

    ``score[q, n] = sum_layers <P(grad f(query_q)), grad L(train_n)>`` where ``P`` is the damped inverse
    curvature of ``factors`` (damping ``None`` = 0.1 x mean eigenvalue per layer). The queries are
    preconditioned once, in batches of ``query_batch_size`` (default ``batch_size``), and kept; then one
    pass over the training data scores every query batch against each training batch.
    """
    engine = ModelTap(model, task)
    chunks = query_gradients(model, task, factors, query_data, damping=damping,
                             batch_size=query_batch_size or batch_size, compile=compile, progress=progress,
                             _engine=engine)

    def step(params, buffers, batch, probes, chunks):
        loss, stats = engine.layer_stats("train", params, buffers, batch, probes)
        columns = {layer: torch.cat([pairwise_layer_scores(chunk[layer], s) for chunk in chunks], dim=0)
                   for layer, s in stats.items()}
        return loss, columns

    run = _maybe_compile(step, compile)
    columns: Dict[str, List[torch.Tensor]] = {layer: [] for layer in engine.specs}
    bar = _progress(train_data, batch_size, "pairwise scores", progress, "train_data")
    for index, batch in enumerate(batches(train_data, batch_size, engine.device, "train_data")):
        with _on_batch("pairwise scores", index):
            probes = engine.probes_for("train", batch)
            _check_layers(factors, engine)
            loss, batch_columns = run(engine.params, engine.buffers, batch, probes, chunks)
        check_finite(loss, "train", index)
        for layer, block in batch_columns.items():
            columns[layer].append(block)
        bar.update(1)
    bar.close()
    if not any(columns.values()):
        raise InfluenceError("train_data is empty: there is nothing to score.")
    per_layer = {layer: torch.cat(blocks, dim=1) for layer, blocks in columns.items()}
    return per_layer if per_module else total(per_layer)


def self_scores(
    model: nn.Module,
    task: Task,
    factors: Factors,
    data: Data,
    *,
    damping: Optional[float] = None,
    use_measurement: bool = False,
    batch_size: Optional[int] = None,
    per_module: bool = False,
    compile: CompileOption = False,
    progress: bool = True,
) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
    """Self-influence ``<P(grad L(z_n)), grad L(z_n)>`` of every example: a ``[N]`` tensor.

    With ``use_measurement=True`` the preconditioned side is the measurement's gradient:
    ``<P(grad f(z_n)), grad L(z_n)>``.
    """
    _check_damping(damping)
    engine = ModelTap(model, task)
    estimator = factors.estimator
    on_device = _factors_on(factors, engine)

    def step(params, buffers, batch, probes, measurement_probes, layer_factors):
        loss, stats = engine.layer_stats("train", params, buffers, batch, probes)
        if not use_measurement:
            return (loss, None), {layer: estimator.self_score(layer_factors[layer], s, damping)
                                  for layer, s in stats.items()}
        measured, measured_stats = engine.layer_stats("measurement", params, buffers, batch, measurement_probes)
        scores = {
            layer: example_grad_dot(
                estimator.precondition(layer_factors[layer], per_example_grads(measured_stats[layer]), damping), s)
            for layer, s in stats.items()
        }
        return (loss, measured), scores

    run = _maybe_compile(step, compile)
    blocks: Dict[str, List[torch.Tensor]] = {}
    bar = _progress(data, batch_size, "self scores", progress, "data")
    for index, batch in enumerate(batches(data, batch_size, engine.device)):
        with _on_batch("self scores", index):
            probes = engine.probes_for("train", batch)
            measurement_probes = engine.probes_for("measurement", batch) if use_measurement else None
            _check_layers(factors, engine)
            (loss, measured), scores = run(engine.params, engine.buffers, batch, probes, measurement_probes, on_device)
        check_finite(loss, "train", index)
        if measured is not None:
            check_finite(measured, "measurement", index)
        for layer, block in scores.items():
            blocks.setdefault(layer, []).append(block)
        bar.update(1)
    bar.close()
    if not blocks:
        raise InfluenceError("data is empty: there is nothing to score.")
    per_layer = {layer: torch.cat(b) for layer, b in blocks.items()}
    return per_layer if per_module else total(per_layer)
