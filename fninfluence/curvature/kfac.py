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
"""

from __future__ import annotations

import torch

from .base import CurvatureEstimator, FitPass, LayerShape, Tensors
from .eigenbasis import lambda_finalize, lambda_init, lambda_update, precondition_in_basis, self_score_in_basis


def covariance_init(shape: LayerShape, dtype: torch.dtype, device: torch.device) -> Tensors:
    groups, out, inp = shape
    return {
        "activation_sum": torch.zeros(groups, inp, inp, dtype=dtype, device=device),
        "gradient_sum": torch.zeros(groups, out, out, dtype=dtype, device=device),
        "tokens": torch.zeros((), dtype=dtype, device=device),
    }


def covariance_update(state: Tensors, stats: Tensors, factors: Tensors) -> Tensors:
    a = stats["a"].flatten(0, 1).to(state["activation_sum"].dtype)  # [B*T, G, in]
    g = stats["g"].flatten(0, 1).to(state["gradient_sum"].dtype)
    return {
        "activation_sum": state["activation_sum"] + torch.einsum("ngi,ngj->gij", a, a),
        "gradient_sum": state["gradient_sum"] + torch.einsum("ngo,ngp->gop", g, g),
        "tokens": state["tokens"] + stats["tokens"].to(state["tokens"].dtype),
    }


def symmetric_eigh(matrix: torch.Tensor):
    """Eigendecomposition of ``(C + C^T) / 2`` in float64: ``(eigenvalues, eigenvectors)``."""
    wide = matrix.to(torch.promote_types(matrix.dtype, torch.float64))
    return torch.linalg.eigh(0.5 * (wide + wide.transpose(-1, -2)))


def covariance_finalize(state: Tensors, factors: Tensors) -> Tensors:
    activation = state["activation_sum"] / state["tokens"]
    gradient = state["gradient_sum"] / state["tokens"]
    activation_values, activation_vectors = symmetric_eigh(activation)
    gradient_values, gradient_vectors = symmetric_eigh(gradient)
    return {
        "activation_covariance": activation,
        "gradient_covariance": gradient,
        "num_tokens": state["tokens"],
        "activation_eigenvalues": activation_values,
        "activation_eigenvectors": activation_vectors,
        "gradient_eigenvalues": gradient_values,
        "gradient_eigenvectors": gradient_vectors,
    }


def kfac_finalize(state: Tensors, factors: Tensors) -> Tensors:
    eigen = covariance_finalize(state, factors)
    eigen["lambda"] = torch.einsum("go,gi->goi", eigen["gradient_eigenvalues"], eigen["activation_eigenvalues"])
    return eigen


kfac = CurvatureEstimator(
    "kfac",
    (FitPass("covariance", covariance_init, covariance_update, kfac_finalize),),
    precondition_in_basis,
    self_score_in_basis,
)

ekfac = CurvatureEstimator(
    "ekfac",
    (
        FitPass("covariance", covariance_init, covariance_update, covariance_finalize),
        FitPass("lambda", lambda_init, lambda_update, lambda_finalize),
    ),
    precondition_in_basis,
    self_score_in_basis,
)
