"""Diagonal curvature: ``Lambda = mean_n G_n^2`` elementwise, ``P(G) = G / (Lambda + damping)``."""

from __future__ import annotations

from .base import CurvatureEstimator
from .eigenbasis import LAMBDA_PASS, basis_score_memory, precondition_in_basis, self_score_in_basis

diagonal = CurvatureEstimator("diagonal", (LAMBDA_PASS,), precondition_in_basis, self_score_in_basis,
                              basis_score_memory)
