"""Score contractions: pure functions of preconditioned query gradients and training-layer statistics.

For one layer, with ``P_q`` the preconditioned gradient of query ``q`` (``[G, out, in]``) and training
example ``n``'s inputs ``a_{n,t}`` and output gradients ``g_{n,t}``:

    score[q, n] = <P_q, G_n> = sum_t g_{n,t}^T P_q a_{n,t}

The per-example training gradient ``G_n = sum_t g_{n,t} a_{n,t}^T`` is not formed unless opt_einsum
finds that cheapest for the shapes at hand. Scores add up over layers; a positive score means that
upweighting the training example lowers the query's measurement. Scores are not divided by N.
"""

from __future__ import annotations

from typing import Dict

import torch

from .contract import contract


def pairwise_layer_scores(preconditioned: torch.Tensor, stats: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``[Q, N]`` scores of one layer from ``preconditioned: [Q, G, out, in]`` and a training batch's stats."""
    return contract("qgoi,ntgo,ntgi->qn", preconditioned, stats["g"], stats["a"])


def example_grad_dot(preconditioned: torch.Tensor, stats: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``[N]`` inner products ``<P_n, G_n>`` of row-aligned preconditioned gradients and stats."""
    return contract("ngoi,ntgo,ntgi->n", preconditioned, stats["g"], stats["a"])


def total(per_layer: Dict[str, torch.Tensor]) -> torch.Tensor:
    values = list(per_layer.values())
    return sum(values[1:], values[0])
