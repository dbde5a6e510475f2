"""The public entry points: keyword arguments in, parsed once into records, handed to the run shell.

Each function here checks its keywords and builds the small frozen records of :mod:`fninfluence.run.options`
(how to run, how to cut and keep the work, which scores), then calls :mod:`fninfluence.run.fit` or
:mod:`fninfluence.run.score`. Nothing below this boundary takes a keyword list of twenty; see
docs/architecture.md for one call's data flow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .run import arguments
from .run import ranks as parallel
from .capture import ModelTap
from .curvature import CurvatureEstimator
from .run.data import Data
from .factors import Factors
from .precision import Precision
from .run.fit import FitRequest, fit
from .run.cells import reported_interrupts
from .run.loop import CompileOption
from .run.options import Execution, Layout, PairwiseKind, PerPass, SelfKind, Targets
from .run.queries import query_gradients as _query_gradients
from .run.score import ScoreCall, score
from .task import Task

__all__ = ["fit_factors", "query_gradients", "pairwise_scores", "self_scores"]


def fit_factors(
    model: nn.Module,
    task: Task,
    data: Data,
    *,
    strategy: Union[str, CurvatureEstimator, Mapping[str, Union[str, CurvatureEstimator]]] = "ekfac",
    use_empirical_fisher: bool = True,
    batch_size: Optional[int] = None,
    compile: CompileOption = False,
    progress: bool = True,
    store: Optional[Union[str, Path]] = None,
    overwrite: bool = False,
    passes: Optional[Sequence[str]] = None,
    max_examples: PerPass = None,
    data_partitions: PerPass = 1,
    module_partitions: PerPass = 1,
    target_data_partitions: Targets = None,
    target_module_partitions: Targets = None,
    precision: Optional[Precision] = None,
    per_example_vmap: bool = False,
    distributed: Optional[bool] = None,
    seed: int = 0,
    fisher_samples: int = 1,
) -> Optional[Factors]:
    """Fit the curvature factors of ``strategy`` on ``data``.

    ``use_empirical_fisher=True`` (the default): the batch's labels; it predicts retraining as well or better
    (docs/evaluation.md). ``False``: labels sampled from the model (the true Fisher, Kronfluence's default), keyed by
    (``seed``, example index) so batches, partitions, resume and ranks do not change them (:mod:`fninfluence.sampling`);
    ``fisher_samples=S`` averages S draws per example. ``compile``: True or a dict of ``torch.compile`` options.

    ``strategy`` may be a dict ``{layer name: strategy}`` with ``"*"`` for the others, e.g.
    ``{"*": "ekfac", "ln_f": "diagonal"}``: each layer is fitted and preconditioned by its own estimator.

    Partitions and persistence: each pass over the data (``covariance`` and ``lambda`` for EKFAC) is split
    into ``data_partitions`` x ``module_partitions`` cells (an int, or a dict per pass name); with
    ``store`` (a directory) each finished cell is written there, so several processes can fill disjoint
    cells (``target_data_partitions`` / ``target_module_partitions``) and a rerun computes only what is
    missing. ``passes`` restricts the run to some passes (later passes read earlier ones from the store).
    ``max_examples`` (an int or a dict per pass) uses only the first examples of ``data``.

    ``per_example_vmap=True`` runs each example alone under ``torch.func.vmap`` (batches of one): for
    models whose tracked layers do not see the batch in dimension 0 (sequence-first layouts). Slower.

    Under ``torchrun`` (``distributed=None`` and an initialised process group of several ranks, or
    ``distributed=True``) the cells are dealt to the ranks and every rank returns the same factors, equal bit
    for bit to a one-process run with the same partitions (at least one cell per rank: see
    docs/distributed.md). ``distributed=False`` ignores the process group.

    Returns the factors once every cell of every pass is complete, else None.
    """
    arguments.check_per_pass(max_examples, "max_examples", allow_none=True)
    execution = Execution.parse(batch_size, compile, progress, precision, per_example_vmap, distributed)
    layout = Layout.parse(store, overwrite, data_partitions, module_partitions, target_data_partitions,
                          target_module_partitions)
    model, task = parallel.unwrap(model, task)
    request = FitRequest(strategy, use_empirical_fisher, passes, max_examples, seed, fisher_samples)
    with reported_interrupts(layout.store):
        factors = fit(model, task, data, request, execution, layout)
    return factors if factors is None or factors.weights_fingerprint else factors.for_model(model)


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
    aggregate: bool = False,
    precision: Optional[Precision] = None,
    per_example_vmap: bool = False,
) -> Dict[str, torch.Tensor]:
    """Preconditioned measurement gradients ``P(grad f(query))``: ``{layer: [Q, G, out, in]}``.

    With ``aggregate=True`` the gradients are summed over all queries first: ``{layer: [1, G, out, in]}``.
    """
    arguments.check_damping(damping)
    execution = Execution.parse(batch_size, compile, progress, precision, per_example_vmap, False)
    model, task = parallel.unwrap(model, task)
    tap = ModelTap(model, task, amp_dtype=execution.precision.amp_dtype, per_example=per_example_vmap)
    chunks = _query_gradients(tap, factors, query_data, damping, aggregate, execution, batch_size)
    return {layer: torch.cat([c[layer] for c in chunks]) for layer in chunks[0]}


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
    per_token: bool = False,
    conv_tokens: bool = True,
    query_rank: Optional[int] = None,
    full_svd: bool = False,
    aggregate_queries: bool = False,
    aggregate_train: bool = False,
    queries_per_pass: Optional[int] = None,
    store: Optional[Union[str, Path]] = None,
    overwrite: bool = False,
    data_partitions: int = 1,
    module_partitions: int = 1,
    target_data_partitions: Targets = None,
    target_module_partitions: Targets = None,
    precision: Optional[Precision] = None,
    per_example_vmap: bool = False,
    distributed: Optional[bool] = None,
) -> Optional[Union[torch.Tensor, Dict[str, torch.Tensor]]]:
    """Influence of every training example on every query: a ``[Q, N]`` tensor (per layer if ``per_module``).

    ``score[q, n] = sum_layers <P(grad f(query_q)), grad L(train_n)>`` where ``P`` is the damped inverse
    curvature of ``factors`` (damping ``None`` = 0.1 x mean eigenvalue per layer). The queries are
    preconditioned once, in batches of ``query_batch_size`` (default ``batch_size``), and kept; then one
    pass over the training data scores them all (``queries_per_pass`` splits them into groups of at most that
    many per pass over the training data, bounding the per-batch score tensors; every query is still
    preconditioned and kept for the whole call).

    Options: ``per_token`` gives ``[Q, N, T]`` (layers without tokens spread evenly over them; a conv layer's
    tokens are its output positions, or with ``conv_tokens=False`` it counts as a layer without tokens, its scores
    summed over positions, which is what Kronfluence's per-token scores do, so that a CNN whose conv layers see
    different numbers of positions gets ``[Q, N, 1]``);
    ``query_rank`` keeps a rank-r SVD of each preconditioned query gradient (``full_svd`` for an exact
    SVD instead of the randomised one); ``aggregate_queries`` / ``aggregate_train`` sum the gradients of
    all queries / all training examples (``[1, N]`` / ``[Q, 1]``). ``store``, partitions, targets and
    ``distributed`` work as in :func:`fit_factors`; the result is None while cells are missing. Under
    ``torchrun`` each rank scores its share of the training data and, with a store, writes its own chunks.
    """
    kind = PairwiseKind.parse(task, damping, query_batch_size, per_token, conv_tokens, query_rank,
                              full_svd, aggregate_queries, aggregate_train, queries_per_pass)
    execution = Execution.parse(batch_size, compile, progress, precision, per_example_vmap, distributed)
    layout = Layout.parse(store, overwrite, data_partitions, module_partitions, target_data_partitions,
                          target_module_partitions)
    model, task = parallel.unwrap(model, task)
    with reported_interrupts(layout.store):
        return score(ScoreCall(model, task, factors, train_data, query_data, kind, execution, layout, per_module))


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
    store: Optional[Union[str, Path]] = None,
    overwrite: bool = False,
    data_partitions: int = 1,
    module_partitions: int = 1,
    target_data_partitions: Targets = None,
    target_module_partitions: Targets = None,
    precision: Optional[Precision] = None,
    per_example_vmap: bool = False,
    distributed: Optional[bool] = None,
) -> Optional[Union[torch.Tensor, Dict[str, torch.Tensor]]]:
    """Self-influence ``<P(grad L(z_n)), grad L(z_n)>`` of every example: a ``[N]`` tensor.

    With ``use_measurement=True`` the preconditioned side is the measurement's gradient:
    ``<P(grad f(z_n)), grad L(z_n)>``. ``store``, partitions, targets and ``distributed`` work as in
    :func:`fit_factors` and :func:`pairwise_scores`.
    """
    arguments.check_damping(damping)
    execution = Execution.parse(batch_size, compile, progress, precision, per_example_vmap, distributed)
    layout = Layout.parse(store, overwrite, data_partitions, module_partitions, target_data_partitions,
                          target_module_partitions)
    model, task = parallel.unwrap(model, task)
    with reported_interrupts(layout.store):
        return score(ScoreCall(model, task, factors, data, None, SelfKind(damping, use_measurement), execution, layout,
                               per_module))
