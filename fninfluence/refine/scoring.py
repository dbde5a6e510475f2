"""Pairwise scores of given preconditioned query gradients against the training data, through the pipeline's own
training pass (the ``(a, g)`` contraction of :func:`fninfluence.run.score.pairwise_step`; no per-example training
gradient is formed)."""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from ..core.scores import ModuleScores, total
from ..factors import Factors
from ..run.data import Data
from ..run.discovery import check_layers, discover
from ..run.options import Execution, Layout, PairwiseKind
from ..run.score import PairwiseCell, ScoreCall

Tensors = Dict[str, torch.Tensor]


def preconditioned_pairwise_scores(model, task, factors: Factors, preconditioned: Tensors, train_data: Data, *,
                                   batch_size: Optional[int] = None, per_module: bool = False,
                                   progress: bool = True) -> Union[torch.Tensor, Tensors]:
    """``score[q, n] = sum_layers <x_q, grad L(train_n)>`` for ``preconditioned = {layer: [Q, G, out, in]}`` (e.g.
    :func:`fninfluence.refine.refined_query_gradients`): ``[Q, N]``, per layer if ``per_module``.

    ``factors`` only names the layers and the weights they belong to (checked as :func:`fninfluence.pairwise_scores`
    checks them); they precondition nothing here.
    """
    kind = PairwiseKind.parse(task, None, None, False, True, None, False, False, False, None)
    execution = Execution.parse(batch_size, False, progress, None, False, False)
    layout = Layout.parse(None, False, 1, 1, None, None)
    tap = discover(model, task, train_data, batch_size, "train", execution.precision.amp_dtype, "train_data")
    check_layers(factors, tap)
    cell = PairwiseCell(ScoreCall(model, task, factors, train_data, None, kind, execution, layout, per_module), tap)
    cell.queries = [{layer: preconditioned[layer] for layer in tap.specs}]  # prepared: nothing to precondition
    per_layer = cell.compute(train_data, "refined pairwise scores")
    scores = ModuleScores((layer, per_layer[layer]) for layer in tap.specs) if per_module else total(per_layer)
    return execution.precision.scores_out(scores, tap.dtype)
