"""Diagonal curvature: ``Lambda = mean_n G_n^2`` elementwise, ``P(G) = G / (Lambda + damping)``."""

from __future__ import annotations

from .base import CurvatureEstimator, FitPass
from .eigenbasis import lambda_finalize, lambda_init, lambda_update, precondition_in_basis, self_score_in_basis

diagonal = CurvatureEstimator(
    "diagonal",
    (FitPass("lambda", lambda_init, lambda_update, lambda_finalize),),
    precondition_in_basis,
    self_score_in_basis,
)
