"""Kronfluence 1.0.1's argument presets (``kronfluence.utils.common.factor_arguments`` / ``score_arguments``).

Kronfluence's examples build their arguments with these functions; here they return this package's
:class:`~fninfluence.compat.kronfluence.FactorArguments` / :class:`~fninfluence.compat.kronfluence.ScoreArguments`
with the same fields set, so such a script migrates by changing its imports only::

    from kronfluence.utils.common.factor_arguments import default_factor_arguments       # before
    from fninfluence.compat.presets import default_factor_arguments                      # after

The memory presets set fields that fninfluence accepts without needing them (``offload_activations_to_cpu``,
``use_iterative_lambda_aggregation``: it streams layer by layer anyway) and the partitions, which it honours.
"""

from __future__ import annotations

from typing import Optional

import torch

from .kronfluence import FactorArguments, ScoreArguments

__all__ = [
    "default_factor_arguments", "pytest_factor_arguments", "smart_low_precision_factor_arguments",
    "all_low_precision_factor_arguments", "reduce_memory_factor_arguments", "extreme_reduce_memory_factor_arguments",
    "default_score_arguments", "pytest_score_arguments", "smart_low_precision_score_arguments",
    "all_low_precision_score_arguments", "reduce_memory_score_arguments", "extreme_reduce_memory_score_arguments",
]


# -- factor arguments -------------------------------------------------------------------------------

def default_factor_arguments(strategy: str = "ekfac") -> FactorArguments:
    """``FactorArguments(strategy=strategy)``."""
    return FactorArguments(strategy=strategy)


def pytest_factor_arguments(strategy: str = "ekfac") -> FactorArguments:
    """Empirical Fisher, every accumulator and per-example gradient in float64 (Kronfluence's test settings)."""
    return FactorArguments(strategy=strategy, use_empirical_fisher=True, activation_covariance_dtype=torch.float64,
                           gradient_covariance_dtype=torch.float64, per_sample_gradient_dtype=torch.float64,
                           lambda_dtype=torch.float64)


def smart_low_precision_factor_arguments(strategy: str = "ekfac", dtype: torch.dtype = torch.bfloat16
                                         ) -> FactorArguments:
    """Autocast, covariances and per-example gradients in ``dtype``; Lambda accumulated in float32."""
    return FactorArguments(strategy=strategy, amp_dtype=dtype, activation_covariance_dtype=dtype,
                           gradient_covariance_dtype=dtype, per_sample_gradient_dtype=dtype, lambda_dtype=torch.float32)


def all_low_precision_factor_arguments(strategy: str = "ekfac", dtype: torch.dtype = torch.bfloat16
                                       ) -> FactorArguments:
    """Autocast and every accumulator, Lambda included, in ``dtype``."""
    return FactorArguments(strategy=strategy, amp_dtype=dtype, activation_covariance_dtype=dtype,
                           gradient_covariance_dtype=dtype, per_sample_gradient_dtype=dtype, lambda_dtype=dtype)


def reduce_memory_factor_arguments(strategy: str = "ekfac", dtype: torch.dtype = torch.bfloat16) -> FactorArguments:
    """:func:`all_low_precision_factor_arguments` with ``use_iterative_lambda_aggregation=True``."""
    factor_args = all_low_precision_factor_arguments(strategy=strategy, dtype=dtype)
    factor_args.use_iterative_lambda_aggregation = True
    return factor_args


def extreme_reduce_memory_factor_arguments(strategy: str = "ekfac", module_partitions: int = 1,
                                           dtype: torch.dtype = torch.bfloat16) -> FactorArguments:
    """:func:`reduce_memory_factor_arguments`, activations offloaded, and both passes split into
    ``module_partitions`` module partitions."""
    factor_args = reduce_memory_factor_arguments(strategy=strategy, dtype=dtype)
    factor_args.offload_activations_to_cpu = True
    factor_args.covariance_module_partitions = module_partitions
    factor_args.lambda_module_partitions = module_partitions
    return factor_args


# -- score arguments --------------------------------------------------------------------------------

def default_score_arguments(damping_factor: Optional[float] = 1e-08, query_gradient_low_rank: Optional[int] = None
                            ) -> ScoreArguments:
    """``ScoreArguments`` with this damping and query rank; with a rank, 10 query batches are accumulated per pass
    over the training data (as Kronfluence's preset does)."""
    score_args = ScoreArguments(damping_factor=damping_factor, query_gradient_low_rank=query_gradient_low_rank)
    if query_gradient_low_rank is not None:
        score_args.query_gradient_accumulation_steps = 10
    return score_args


def pytest_score_arguments(damping_factor: Optional[float] = 1e-08, query_gradient_low_rank: Optional[int] = None
                           ) -> ScoreArguments:
    """Per-example gradients, preconditioning, the query SVD and the scores in float64 (no query accumulation)."""
    return ScoreArguments(damping_factor=damping_factor, query_gradient_low_rank=query_gradient_low_rank,
                          query_gradient_svd_dtype=torch.float64, score_dtype=torch.float64,
                          per_sample_gradient_dtype=torch.float64, precondition_dtype=torch.float64)


def smart_low_precision_score_arguments(damping_factor: Optional[float] = 1e-08,
                                        query_gradient_low_rank: Optional[int] = None,
                                        dtype: torch.dtype = torch.bfloat16) -> ScoreArguments:
    """:func:`default_score_arguments` with autocast, per-example gradients and scores in ``dtype``;
    preconditioning and the query SVD in float32."""
    score_args = default_score_arguments(damping_factor, query_gradient_low_rank)
    score_args.amp_dtype = dtype
    score_args.score_dtype = dtype
    score_args.per_sample_gradient_dtype = dtype
    score_args.query_gradient_svd_dtype = torch.float32
    score_args.precondition_dtype = torch.float32
    return score_args


def all_low_precision_score_arguments(damping_factor: Optional[float] = 1e-08,
                                      query_gradient_low_rank: Optional[int] = None,
                                      dtype: torch.dtype = torch.bfloat16) -> ScoreArguments:
    """As :func:`smart_low_precision_score_arguments`, with preconditioning in ``dtype`` too."""
    score_args = smart_low_precision_score_arguments(damping_factor, query_gradient_low_rank, dtype)
    score_args.precondition_dtype = dtype
    return score_args


def reduce_memory_score_arguments(damping_factor: Optional[float] = 1e-08,
                                  query_gradient_low_rank: Optional[int] = None,
                                  dtype: torch.dtype = torch.bfloat16) -> ScoreArguments:
    """:func:`all_low_precision_score_arguments` with ``offload_activations_to_cpu=True``."""
    score_args = all_low_precision_score_arguments(damping_factor, query_gradient_low_rank, dtype)
    score_args.offload_activations_to_cpu = True
    return score_args


def extreme_reduce_memory_score_arguments(damping_factor: Optional[float] = 1e-08, module_partitions: int = 4,
                                          query_gradient_low_rank: Optional[int] = None,
                                          dtype: torch.dtype = torch.bfloat16) -> ScoreArguments:
    """:func:`reduce_memory_score_arguments` split into ``module_partitions`` module partitions."""
    score_args = reduce_memory_score_arguments(damping_factor, query_gradient_low_rank, dtype)
    score_args.module_partitions = module_partitions
    return score_args
