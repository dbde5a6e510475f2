"""A user-written curvature estimator: the exact Fisher of each layer, as a dense matrix.

For a layer with per-example gradients ``G_n`` (``[groups, out, in]``), the block Fisher is
``F = mean_n vec(G_n) vec(G_n)^T`` per group (``[groups, out*in, out*in]``), and

    P(G) = (F + damping I)^{-1} vec(G),   damping None -> 0.1 x mean eigenvalue = 0.1 x trace(F) / (out*in).

It is exact where KFAC/EKFAC approximate, and costs ``(out*in)^2`` memory per layer: for small layers only.
Embeddings (one-hot statistics: ``ids``, ``id_values``, ``g``; ``in`` = the vocabulary V) are handled by giving
``per_example_grads`` the vocabulary, read off the state's size, which scatters the ids into dense ``[B, 1, D, V]``
gradients (fine for a small vocabulary); ``default_self_score`` cannot (it passes no vocabulary), so the
estimator has a ``self_score`` of its own. Run it through the property suite with::

    python docs/examples/custom_estimator.py
"""

import torch

import fninfluence as fi
from fninfluence.curvature import heuristic_damping, per_example_grads


def fisher_init(shape, dtype, device):
    groups, out, inp = shape
    return {"fisher_sum": torch.zeros(groups, out * inp, out * inp, dtype=dtype, device=device),
            "examples": torch.zeros((), dtype=dtype, device=device)}


def example_grads(stats, size):
    """``G_n`` as ``[B, groups, out, in]`` for a layer whose blocks are ``size = out*in`` wide. An embedding's
    one-hot stats (``"ids"`` in them) need the vocabulary ``in = size / out`` to scatter the ids into columns."""
    vocabulary = size // stats["g"].shape[-1] if "ids" in stats else None
    return per_example_grads(stats, vocabulary)


def fisher_update(state, stats, factors):
    flat = example_grads(stats, state["fisher_sum"].shape[-1]).flatten(2).to(state["fisher_sum"].dtype)
    return {"fisher_sum": state["fisher_sum"] + torch.einsum("bgi,bgj->gij", flat, flat),
            "examples": state["examples"] + flat.shape[0]}


def fisher_finalize(state, factors):
    return {"fisher": state["fisher_sum"] / state["examples"]}


def fisher_precondition(factors, grads, damping):
    fisher = factors["fisher"].to(torch.float64)
    size = fisher.shape[-1]
    lam = heuristic_damping(torch.diagonal(fisher, dim1=-2, dim2=-1), damping)  # mean diagonal = mean eigenvalue
    damped = fisher + lam * torch.eye(size, dtype=fisher.dtype, device=fisher.device)
    flat = grads.flatten(2).to(torch.float64)                                    # [N, groups, out*in]
    solved = torch.linalg.solve(damped, flat.permute(1, 2, 0))                     # [groups, out*in, N]
    return solved.permute(2, 0, 1).reshape(grads.shape).to(grads.dtype)


def fisher_self_score(factors, stats, damping):
    """``<P(G_n), G_n>`` per example (what ``default_self_score`` computes, embeddings included)."""
    grads = example_grads(stats, factors["fisher"].shape[-1])
    return (fisher_precondition(factors, grads, damping) * grads).flatten(1).sum(1)


dense_layer_fisher = fi.CurvatureEstimator(
    "dense_layer_fisher",
    (fi.FitPass("fisher", fisher_init, fisher_update, fisher_finalize),),
    fisher_precondition,
    fisher_self_score,
)

if __name__ == "__main__":
    from fninfluence.testing import check_estimator

    results = check_estimator(dense_layer_fisher, exact_for_one_example=True)
    for r in results:
        print(f"{'ok  ' if r.passed else 'FAIL'} {r.check:<40} [{r.case}] relative error {r.error:.1e}")
