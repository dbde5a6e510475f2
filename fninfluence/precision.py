"""Which dtype each stage computes and accumulates in."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, Mapping, Optional, Tuple

import torch

from .curvature.base import FACTOR_DTYPE_FIELDS, CurvatureEstimator, FitPass, conventional_factor_dtype
from .errors import InfluenceError


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@dataclass(frozen=True)
class Precision:
    """Dtypes per stage. ``None`` means: the model's dtype, widened to at least float32 for accumulators.

    * ``amp_dtype``: run the forward and backward passes under ``torch.autocast`` in this dtype;
    * ``covariance_dtype``: the per-batch products of A and S, and the stored A and S;
    * ``lambda_dtype``: the stored Lambda;
    * ``per_sample_gradient_dtype``: layer inputs / output gradients and per-example gradients;
    * ``precondition_dtype``: the rotation and scaling of query gradients;
    * ``score_dtype``: the score contractions and the returned scores;
    * ``svd_dtype``: the SVD of low-rank query gradients;
    * ``eigenvector_dtype``: the stored eigenvectors of A and S. ``None``: the dtype they are read in, the wider of
      ``per_sample_gradient_dtype`` (the lambda pass rotates in it) and ``precondition_dtype`` (scores rotate in
      it), each by default the model's dtype, at least float32.

    Per-batch work runs in the dtype asked for (never narrower than float32 for the covariance products);
    the sums across batches (of A, S and Lambda) are always float64, which costs one [in, in], [out, out]
    or [out, in] tensor per layer and keeps the error of a sum from growing with the number of batches.
    Eigendecompositions are always done in float64 (narrower eigendecompositions measurably change scores),
    whatever is asked for here; their eigenvectors are then kept in the dtype they are used in, which changes no
    result and, in float32, halves the largest factors. Scoring later in a wider ``precondition_dtype`` than the
    fit's reads the eigenvectors rounded: fit with ``eigenvector_dtype=torch.float64`` for that. A, S, Lambda and
    scores are returned and stored in the dtype asked for.
    """

    amp_dtype: Optional[torch.dtype] = None
    covariance_dtype: Optional[torch.dtype] = None
    lambda_dtype: Optional[torch.dtype] = None
    per_sample_gradient_dtype: Optional[torch.dtype] = None
    precondition_dtype: Optional[torch.dtype] = None
    score_dtype: Optional[torch.dtype] = None
    svd_dtype: Optional[torch.dtype] = None
    eigenvector_dtype: Optional[torch.dtype] = None

    def accumulator(self, requested: Optional[torch.dtype], model_dtype: torch.dtype) -> torch.dtype:
        return _at_least_float32(requested or model_dtype)

    def fit_dtypes(self, fit_pass: FitPass, model_dtype: torch.dtype) -> Tuple[torch.dtype, torch.dtype]:
        """``(state, compute)`` dtypes of a fit pass: float64 sums across batches of per-batch results
        computed in ``compute``: a pass that reads raw layer statistics (``fit_pass.reads_raw_statistics``, the
        covariance products) in ``covariance_dtype``, at least float32; other passes in the per-sample
        gradient dtype."""
        if fit_pass.reads_raw_statistics:
            return torch.float64, self.accumulator(self.covariance_dtype, model_dtype)
        return torch.float64, self.compute(self.per_sample_gradient_dtype, model_dtype)

    def factor_dtype(self, name: str, model_dtype: torch.dtype, fit_pass: Optional[FitPass] = None
                     ) -> Optional[torch.dtype]:
        """The dtype a fitted factor is returned and stored in, or None to keep the one it was computed in.

        The pass that makes the factor declares which field it takes (``FitPass.factor_dtypes``; without
        ``fit_pass``, or for a pass that declares nothing, the built-ins' convention
        :func:`~fninfluence.curvature.base.conventional_factor_dtype`): A and S take ``covariance_dtype`` and
        Lambda ``lambda_dtype`` (by default the model's dtype, at least float32), eigenvectors ``eigenvector_dtype``
        (see the class); eigenvalues and counts stay float64.
        """
        field_name = conventional_factor_dtype(name) if fit_pass is None else fit_pass.factor_dtype_field(name)
        if field_name is None:
            return None
        if field_name not in FACTOR_DTYPE_FIELDS:
            raise InfluenceError(
                f"Pass {fit_pass.name!r} stores factor {name!r} in {field_name!r}, which is not a Precision dtype "
                f"for factors: declare one of {list(FACTOR_DTYPE_FIELDS)} in its factor_dtypes, or leave it out.")
        requested = getattr(self, field_name)
        if requested is None and field_name == "eigenvector_dtype":  # the dtype they are read in
            return torch.promote_types(self.compute(self.per_sample_gradient_dtype, model_dtype),
                                       self.compute(self.precondition_dtype, model_dtype))
        return self.accumulator(None, model_dtype) if requested is None else requested

    def cast_factors(self, factors: Dict[str, torch.Tensor], model_dtype: torch.dtype,
                     fit_pass: Optional[FitPass] = None) -> Dict[str, torch.Tensor]:
        """``factors`` (``fit_pass``'s outputs) with each tensor in its :meth:`factor_dtype`."""
        def cast(value: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
            if dtype is None:
                return value
            if dtype.itemsize < 4:  # a cast of the float32 result, whichever the sums were kept in
                value = value.to(torch.float32)
            return value.to(dtype)

        return {name: cast(value, self.factor_dtype(name, model_dtype, fit_pass)) for name, value in factors.items()}

    def fitting(self, estimators: Mapping[str, CurvatureEstimator], model_dtype: torch.dtype
                ) -> Dict[str, CurvatureEstimator]:
        """The estimators with every pass's outputs cast by :meth:`cast_factors` (what a store lays out too)."""

        def cast(fit_pass: FitPass) -> FitPass:
            finalize = fit_pass.finalize
            return fit_pass._replace(finalize=lambda state, factors: self.cast_factors(finalize(state, factors),
                                                                                      model_dtype, fit_pass))

        wrapped = {id(e): e._replace(passes=tuple(cast(p) for p in e.passes)) for e in estimators.values()}
        return {layer: wrapped[id(e)] for layer, e in estimators.items()}

    def score_compute(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype score contractions run in: ``score_dtype`` widened to at least float32."""
        return self.accumulator(self.score_dtype, model_dtype)

    def score_output(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype scores are returned and stored in: ``score_dtype``, else the contraction dtype."""
        return self.score_dtype or self.score_compute(model_dtype)

    def scores_out(self, scores, model_dtype: torch.dtype):
        """Scores (a tensor, a dict of them, or None) in the dtype asked for: ``score_dtype``, else the
        contraction dtype; a narrower dtype is a cast of the float32 (or wider) result."""
        dtype = self.score_output(model_dtype)
        if scores is None:
            return None
        if isinstance(scores, dict):
            return type(scores)((name, value.to(dtype)) for name, value in scores.items())
        return scores.to(dtype)

    def compute(self, requested: Optional[torch.dtype], model_dtype: torch.dtype) -> torch.dtype:
        return requested or _at_least_float32(model_dtype)

    def as_dict(self) -> Dict[str, Optional[str]]:
        return {f.name: None if getattr(self, f.name) is None else str(getattr(self, f.name)) for f in fields(self)}
