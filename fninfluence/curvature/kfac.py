"""KFAC and EKFAC.

Covariance pass (per layer and group), with ``a`` the layer input with its bias column and ``g`` the
output gradient of the summed loss, over all (unmasked) tokens of all examples:

    A = sum_t a_t a_t^T / #tokens,    S = sum_t g_t g_t^T / #tokens

Both are symmetrised and eigendecomposed in float64: ``A = Q_A diag(l_A) Q_A^T``, ``S = Q_S diag(l_S) Q_S^T``.

* KFAC: ``Lambda = l_S l_A^T``, a per-token second moment. EKFAC's Lambda is per example, i.e. the
  moment of a sum over T tokens, so on sequences it is roughly T times KFAC's and KFAC scores come out
  roughly T times EKFAC scores. This is Kronfluence's convention too; normalise if you compare them.
* EKFAC: a second pass sets ``Lambda = mean_n (Q_S^T G_n Q_A)^2`` with ``G_n = sum_t g_t a_t^T``
  (George et al. 2018), the exact second moment of per-example gradients in the Kronecker eigenbasis.

Embeddings (one-hot inputs, :mod:`fninfluence.core.algebra`): ``A = diag(f)`` with ``f`` the token frequencies, kept as
the vector ``activation_diagonal`` ``[G, V]``; it is its own eigendecomposition (``Q_A = I``, eigenvalues
``f`` in vocabulary order, no ``activation_eigenvectors``), so no V x V matrix exists. KFAC's
``Lambda = l_S f^T``; EKFAC's ``Lambda[d, v] = mean_n (sum_{t: id_t = v} (Q_S^T g_t)[d])^2``.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ..core import algebra
from ..core.algebra import second_moment  # noqa: F401  (re-exported: the shifted product lives with the algebra)
from ..core.statistics import LayerStatistic
from .base import CurvatureEstimator, FitPass, LayerShape, PassMemory, Tensors, Workspace, is_one_hot
from .eigenbasis import LAMBDA_PASS, basis_score_memory, precondition_in_basis, self_score_in_basis


def _activation_state(shape: LayerShape, dtype: torch.dtype, device: torch.device) -> Tensors:
    """``sum_t a_t a_t^T`` so far: ``[G, in, in]``, or only its diagonal ``[G, V]`` for one-hot inputs."""
    groups, _, inp = shape
    if is_one_hot(shape):
        return {"activation_diagonal_sum": torch.zeros(groups, inp, dtype=dtype, device=device)}
    return {"activation_sum": torch.zeros(groups, inp, inp, dtype=dtype, device=device)}


def covariance_init(shape: LayerShape, dtype: torch.dtype, device: torch.device) -> Tensors:
    groups, out, inp = shape
    return {
        **_activation_state(shape, dtype, device),
        "gradient_sum": torch.zeros(groups, out, out, dtype=dtype, device=device),
        "tokens": torch.zeros((), dtype=dtype, device=device),
    }


def covariance_update(state: Tensors, stats, factors: Tensors) -> Tensors:
    """Adds the batch's ``sum_t a_t a_t^T`` (its diagonal for one-hot inputs), ``sum_t g_t g_t^T`` and token count.

    The stats are in the pass's compute dtype; the state may be wider (the sums are taken in the state's dtype).
    """
    activation = "activation_diagonal_sum" if "activation_diagonal_sum" in state else "activation_sum"
    total = state[activation]
    return {
        activation: total + algebra.input_second_moment(stats, total.shape[-1], total.dtype),
        "gradient_sum": state["gradient_sum"] + algebra.gradient_second_moment(stats, state["gradient_sum"].dtype),
        "tokens": state["tokens"] + stats["tokens"].to(state["tokens"].dtype),
    }


def covariance_statistic(like: Tensors, factors: Tensors) -> LayerStatistic:
    """:func:`covariance_update` split at the layer's output: ``sum_t a_t a_t^T`` and the token count when the
    layer is called (nothing of ``a`` is kept), ``sum_t g_t g_t^T`` when the backward pass reaches it. Additive
    over a layer's calls (they are sums over tokens). ``like``: a state (its shapes and dtypes)."""
    activation = "activation_diagonal_sum" if "activation_diagonal_sum" in like else "activation_sum"
    dtype, features = like[activation].dtype, like[activation].shape[-1]
    gradient = like["gradient_sum"]

    def forward(inputs):
        return None, {activation: algebra.input_second_moment(inputs, features, dtype),
                      "tokens": inputs["tokens"].to(like["tokens"].dtype)}

    def backward(kept, g):
        return {"gradient_sum": algebra.second_moment(g.flatten(0, 1), gradient.dtype)}

    return LayerStatistic(forward, backward, lambda examples, tokens: {"gradient_sum": torch.zeros_like(gradient)},
                          additive=True)


def symmetric_eigh(matrix: torch.Tensor):
    """Eigendecomposition of ``(C + C^T) / 2`` in float64: ``(eigenvalues, eigenvectors)``."""
    wide = matrix.to(torch.promote_types(matrix.dtype, torch.float64))
    return torch.linalg.eigh(0.5 * (wide + wide.transpose(-1, -2)))


def activation_factors(state: Tensors) -> Tensors:
    """A and its eigendecomposition; for one-hot inputs the diagonal A is its own (``Q_A = I``, implicit)."""
    if "activation_diagonal_sum" in state:
        diagonal = state["activation_diagonal_sum"] / state["tokens"]
        wide = diagonal.to(torch.promote_types(diagonal.dtype, torch.float64))
        return {"activation_diagonal": diagonal, "activation_eigenvalues": wide}
    activation = state["activation_sum"] / state["tokens"]
    values, vectors = symmetric_eigh(activation)
    return {"activation_covariance": activation, "activation_eigenvalues": values, "activation_eigenvectors": vectors}


def covariance_finalize(state: Tensors, factors: Tensors) -> Tensors:
    gradient = state["gradient_sum"] / state["tokens"]
    gradient_values, gradient_vectors = symmetric_eigh(gradient)
    return {
        **activation_factors(state),
        "gradient_covariance": gradient,
        "num_tokens": state["tokens"],
        "gradient_eigenvalues": gradient_values,
        "gradient_eigenvectors": gradient_vectors,
    }


def kfac_finalize(state: Tensors, factors: Tensors) -> Tensors:
    eigen = covariance_finalize(state, factors)
    eigen["lambda"] = torch.einsum("go,gi->goi", eigen["gradient_eigenvalues"], eigen["activation_eigenvalues"])
    return eigen


def _activation_elements(shape: LayerShape) -> int:
    """Elements of A: ``G in^2``, or ``G V`` for one-hot inputs (a diagonal)."""
    groups, _, inp = shape
    return groups * (inp if is_one_hot(shape) else inp * inp)


def covariance_memory(workspace: Workspace) -> PassMemory:
    """Per batch: the batch's products ``a a^T``, ``g g^T`` in the compute dtype; in ``finalize``: about four
    float64 copies of the larger of A and S (widened, symmetrised, the eigenvectors and LAPACK's workspace).
    Calibrated against the peaks tests/test_memory.py measures."""
    groups, out, _ = workspace.shape
    products = (_activation_elements(workspace.shape) + groups * out * out) * workspace.itemsize
    largest = max(_activation_elements(workspace.shape), groups * out * out)
    return PassMemory(update=products, finalize=4 * largest * torch.float64.itemsize)


def _covariance_pass(finalize, lambda_factors: Tuple[str, ...]) -> FitPass:
    """A pass of raw ``a a^T``, ``g g^T`` sums (a dense ``[in, in]`` block), A and S in ``covariance_dtype``."""
    dtypes = {name: "covariance_dtype" for name in ("activation_covariance", "activation_diagonal",
                                                    "gradient_covariance")}
    dtypes.update({name: "eigenvector_dtype" for name in ("activation_eigenvectors", "gradient_eigenvectors")})
    dtypes.update({name: "lambda_dtype" for name in lambda_factors})
    return FitPass("covariance", covariance_init, covariance_update, finalize, raw_statistics=True,
                   dense_input_block=True, factor_dtypes=dtypes, memory=covariance_memory,
                   statistic=covariance_statistic)


kfac = CurvatureEstimator("kfac", (_covariance_pass(kfac_finalize, ("lambda",)),), precondition_in_basis,
                          self_score_in_basis, basis_score_memory)

ekfac = CurvatureEstimator("ekfac", (_covariance_pass(covariance_finalize, ()), LAMBDA_PASS), precondition_in_basis,
                           self_score_in_basis, basis_score_memory)
