"""Which dtype each stage computes and accumulates in."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, Optional

import torch


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@dataclass(frozen=True)
class Precision:
    """Dtypes per stage. ``None`` means: the model's dtype, widened to at least float32 for accumulators.

    * ``amp_dtype``: run the forward and backward passes under ``torch.autocast`` in this dtype;
    * ``covariance_dtype``: accumulators of A and S;
    * ``lambda_dtype``: accumulator of Lambda;
    * ``per_sample_gradient_dtype``: layer inputs / output gradients and per-example gradients;
    * ``precondition_dtype``: the rotation and scaling of query gradients;
    * ``score_dtype``: the score contractions and the returned scores;
    * ``svd_dtype``: the SVD of low-rank query gradients.

    Accumulators are never narrower than float32, and eigendecompositions are always done in float64
    (narrower eigenvectors measurably change scores), whatever is asked for here.
    """

    amp_dtype: Optional[torch.dtype] = None
    covariance_dtype: Optional[torch.dtype] = None
    lambda_dtype: Optional[torch.dtype] = None
    per_sample_gradient_dtype: Optional[torch.dtype] = None
    precondition_dtype: Optional[torch.dtype] = None
    score_dtype: Optional[torch.dtype] = None
    svd_dtype: Optional[torch.dtype] = None

    def accumulator(self, requested: Optional[torch.dtype], model_dtype: torch.dtype) -> torch.dtype:
        return _at_least_float32(requested or model_dtype)

    def compute(self, requested: Optional[torch.dtype], model_dtype: torch.dtype) -> torch.dtype:
        return requested or _at_least_float32(model_dtype)

    def as_dict(self) -> Dict[str, Optional[str]]:
        return {f.name: None if getattr(self, f.name) is None else str(getattr(self, f.name)) for f in fields(self)}
