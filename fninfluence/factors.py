"""Fitted curvature factors: a plain record of per-layer tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch

from .capture import LayerSpec
from .curvature import CurvatureEstimator


@dataclass
class Factors:
    """What :func:`fninfluence.fit_factors` returns.

    ``tensors[layer]`` holds the estimator's factors for one layer, in the tap's ``[groups, out, in]``
    layout (``in`` counts the bias column). For KFAC/EKFAC: ``activation_covariance``,
    ``gradient_covariance``, their eigenvalues and eigenvectors, and ``lambda``; for diagonal:
    ``lambda``; for identity: nothing.
    """

    strategy: str
    estimator: CurvatureEstimator = field(repr=False)
    layers: Dict[str, LayerSpec]
    tensors: Dict[str, Dict[str, torch.Tensor]] = field(repr=False)
    num_examples: int
    use_empirical_fisher: bool = False

    def __repr__(self) -> str:
        layers = ", ".join(f"{name}: {spec.op} {spec.shape}" for name, spec in self.layers.items())
        return f"Factors(strategy={self.strategy!r}, examples={self.num_examples}, layers={{{layers}}})"

    def __getitem__(self, layer: str) -> Dict[str, torch.Tensor]:
        return self.tensors[layer]

    def to(self, device=None, dtype=None) -> "Factors":
        """A copy with every floating-point tensor on ``device`` (and cast to ``dtype``)."""
        moved = {
            layer: {k: v.to(device=device, dtype=dtype if v.is_floating_point() and dtype else v.dtype)
                    for k, v in tensors.items()}
            for layer, tensors in self.tensors.items()
        }
        return Factors(self.strategy, self.estimator, dict(self.layers), moved, self.num_examples,
                       self.use_empirical_fisher)
