"""Shared algebra of the diagonal, KFAC and EKFAC estimators: a diagonal scaling in a rotated basis.

Each of them preconditions a layer gradient ``G`` (``[out, in]`` per group) as

    P(G) = Q_S [ (Q_S^T G Q_A) / (Lambda + damping) ] Q_A^T

with ``Q_S = I, Q_A = I`` for the diagonal estimator. ``Lambda`` is the second moment of per-example
gradients in that basis (EKFAC, diagonal) or the outer product of Kronecker-factor eigenvalues (KFAC).

For an embedding (one-hot stats, see :mod:`fninfluence.core.algebra`) ``Q_A = I`` always (A is diagonal), so
there is no ``activation_eigenvectors`` factor; only ``g`` is rotated, and ``Lambda[d, v] = mean_n (G'_n[d, v])^2``
is accumulated from same-token sums without a ``[B, D, V]`` tensor.
"""

from __future__ import annotations

import torch

from ..core.contract import contract
from ..core import algebra
from .base import Damping, FitPass, LayerShape, PassMemory, ScoreMemory, Tensors, Workspace, damped_reciprocal

EIGENVECTORS = ("activation_eigenvectors", "gradient_eigenvectors")


def rotated_stats(stats, factors: Tensors) -> algebra.LayerStats:
    """The stats in the eigenbasis of ``factors`` (``Q_A^T a``, ``Q_S^T g``), or as they are without one."""
    return algebra.in_eigenbasis(stats, factors.get("activation_eigenvectors"), factors.get("gradient_eigenvectors"))


def lambda_init(shape: LayerShape, dtype: torch.dtype, device: torch.device) -> Tensors:
    groups, out, inp = shape
    return {
        "lambda_sum": torch.zeros(groups, out, inp, dtype=dtype, device=device),
        "examples": torch.zeros((), dtype=dtype, device=device),
    }


def lambda_update(state: Tensors, stats, factors: Tensors) -> Tensors:
    """Adds ``sum_n (G'_n)^2`` of the batch (in the eigenbasis, if any) and its example count."""
    squared = algebra.squared_example_grads(rotated_stats(stats, factors), state["lambda_sum"].shape[-1])
    return {
        "lambda_sum": state["lambda_sum"] + squared.to(state["lambda_sum"].dtype),
        "examples": state["examples"] + stats["g"].shape[0],
    }


def lambda_finalize(state: Tensors, factors: Tensors) -> Tensors:
    return {"lambda": state["lambda_sum"] / state["examples"], "num_lambda_examples": state["examples"]}


def precondition_in_basis(factors: Tensors, grads: torch.Tensor, damping: Damping) -> torch.Tensor:
    """``P(G)`` for ``grads`` of shape ``[N, G, out, in]``."""
    inverse = damped_reciprocal(factors["lambda"], damping, grads.dtype)
    qa, qs = factors.get("activation_eigenvectors"), factors.get("gradient_eigenvectors")
    if qa is None and qs is None:
        return grads * inverse
    if qa is None:  # an embedding: Q_A = I
        qs = qs.to(grads.dtype)
        rotated = torch.einsum("gop,ngoi->ngpi", qs, grads)
        return torch.einsum("gop,ngpi->ngoi", qs, rotated * inverse)
    qa, qs = qa.to(grads.dtype), qs.to(grads.dtype)
    rotated = contract("gop,ngoi,gij->ngpj", qs, grads, qa)
    return contract("gop,ngpj,gij->ngoi", qs, rotated * inverse, qa)


def self_score_in_basis(factors: Tensors, stats, damping: Damping) -> torch.Tensor:
    """``<P(G_n), G_n> = sum (G'_n)^2 / (Lambda + damping)`` per example, without forming ``P(G_n)``
    (rank-one closed form when T = 1; same-token sums for an embedding, :func:`fninfluence.core.algebra.self_products`).
    """
    rotated = rotated_stats(stats, factors)
    return algebra.self_products(rotated, damped_reciprocal(factors["lambda"], damping, rotated.dtype))

def cast_eigenvector_bytes(workspace: Workspace) -> int:
    """The float64 eigenvectors cast to the compute dtype at each use (nothing when they already are in it)."""
    vectors = [workspace.factors[name] for name in EIGENVECTORS if name in workspace.factors]
    return sum(v.numel() * workspace.itemsize for v in vectors if v.dtype != workspace.dtype)


def lambda_memory(workspace: Workspace) -> PassMemory:
    """Per batch: the float64 squared gradients before they are added, the cast eigenvectors and, with several
    tokens per example, the per-example gradients (squared in place); the layer's new float64 sums."""
    sums = workspace.gradient_elements * torch.float64.itemsize
    example_grads = workspace.rows * workspace.gradient_elements * workspace.itemsize
    per_example = example_grads if workspace.tokens > 1 else 0  # squared in place
    return PassMemory(update=sums + cast_eigenvector_bytes(workspace) + per_example, new_state=sums)


def inverse_bytes(workspace: Workspace) -> int:
    """``1 / (Lambda + damping)``: Lambda widened to float64 (unless it is), damped, inverted, cast back."""
    widened = 0 if workspace.factors["lambda"].dtype == torch.float64 else 1
    return workspace.gradient_elements * ((widened + 2) * torch.float64.itemsize + workspace.itemsize)


def basis_score_memory(workspace: Workspace) -> ScoreMemory:
    """``precondition``: the rotation into the eigenbasis (torch.einsum keeps one intermediate), the scaled copy
    and the rotation back, the damped inverse and the cast eigenvectors; ``self_score``: the damped inverse, the
    cast eigenvectors and, with several tokens per example, the rotated per-example gradients (squared in place)."""
    block = workspace.rows * workspace.gradient_elements * workspace.itemsize
    common = inverse_bytes(workspace) + cast_eigenvector_bytes(workspace)
    rotations = 3 * block if "gradient_eigenvectors" in workspace.factors else 0
    return ScoreMemory(precondition=rotations + common,
                       self_score=common + (block if workspace.tokens > 1 else 0))


LAMBDA_PASS = FitPass("lambda", lambda_init, lambda_update, lambda_finalize, factor_dtypes={"lambda": "lambda_dtype"},
                      memory=lambda_memory, reads_factors=EIGENVECTORS)
