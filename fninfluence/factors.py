"""Fitted curvature factors: a plain record of per-layer tensors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from .capture import LayerSpec
from .curvature import CurvatureEstimator, pass_order
from .store import factors_store, fingerprint
from .store.factors_store import StoredFactors


def canonical_layout(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Every tensor row-major contiguous (``torch.linalg.eigh`` returns column-major eigenvectors).

    Factors fitted in memory, read back from a store, sent between ranks or resumed between passes then have
    one memory layout, so every later contraction runs the same kernels in the same order and gives the
    same bits whichever route the factors took.
    """
    return {name: value.contiguous() for name, value in tensors.items()}


@dataclass
class Factors:
    """What :func:`fninfluence.fit_factors` returns.

    ``tensors[layer]`` holds the estimator's factors for one layer, in the tap's ``[groups, out, in]``
    layout (``in`` counts the bias column). For KFAC/EKFAC: ``activation_covariance``,
    ``gradient_covariance``, their eigenvalues and eigenvectors, and ``lambda`` (an embedding has
    ``activation_diagonal`` ``[1, V]``, the token frequencies, instead of ``activation_covariance`` and no
    ``activation_eigenvectors``: its ``Q_A`` is the identity); for diagonal:
    ``lambda``; for identity: nothing.

    ``estimators[layer]`` is the estimator of each layer (one for all unless ``fit_factors`` got a strategy
    per layer; ``strategy`` is then ``"mixed"``).

    ``weights_fingerprint`` is a cheap fingerprint of the tracked weights of the model the factors were fitted on
    (two float64 sums per parameter, :func:`fninfluence.store.fingerprint.weights_fingerprint`); scoring refuses a
    model whose weights differ. ``None`` (factors built by hand, or read from a store written before it was kept)
    checks nothing. :meth:`for_model` rebinds factors to another model on purpose.
    """

    strategy: str
    estimator: CurvatureEstimator = field(repr=False)
    layers: Dict[str, LayerSpec]
    tensors: Dict[str, Dict[str, torch.Tensor]] = field(repr=False)
    num_examples: int
    use_empirical_fisher: bool = False
    passes_done: Tuple[str, ...] = None
    estimators: Dict[str, CurvatureEstimator] = field(default=None, repr=False)
    weights_fingerprint: Optional[Dict[str, Any]] = field(default=None, repr=False)

    def __post_init__(self):
        self.tensors = {layer: canonical_layout(tensors) for layer, tensors in self.tensors.items()}
        if self.estimators is None:
            self.estimators = {layer: self.estimator for layer in self.layers}
        if self.passes_done is None:
            self.passes_done = tuple(self.pass_names)

    @property
    def pass_names(self) -> Tuple[str, ...]:
        """Every pass of the layers' estimators, in order."""
        return tuple(pass_order(self.estimators))

    @property
    def strategies(self) -> Dict[str, str]:
        """The strategy of each layer."""
        return {layer: estimator.name for layer, estimator in self.estimators.items()}

    def estimator_for(self, layer: str) -> CurvatureEstimator:
        """The estimator that fitted ``layer`` and preconditions its gradients."""
        return self.estimators[layer]

    @property
    def complete(self) -> bool:
        """Whether every pass of every layer's estimator has been fitted."""
        return all(name in self.passes_done for name in self.pass_names)

    def for_model(self, model: nn.Module) -> "Factors":
        """These factors, recording ``model``'s tracked weights as the ones they belong to.

        Scoring with factors fitted on another model's weights is refused (scores would mix two models). When you
        mean it, e.g. factors of an earlier checkpoint used for a later one, pass ``factors.for_model(model)``
        instead. ``fit_factors`` returns factors already bound to the model it fitted.
        """
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module  # the names the factors' layers use (see fninfluence.run.ranks.unwrap)
        params = dict(model.named_parameters())
        names = fingerprint.tracked_parameter_names(self.layers)
        return dataclasses.replace(self, weights_fingerprint=fingerprint.weights_fingerprint(params, names))

    def save(self, path: Union[str, Path], *, overwrite: bool = False) -> None:
        """Write the factors to a Zarr v3 store at ``path`` (see docs/storage.md)."""
        factors_store.save_factors(self.as_stored(), Path(path), overwrite=overwrite)

    @staticmethod
    def load(path: Union[str, Path], estimator: Optional[CurvatureEstimator] = None) -> "Factors":
        """Read factors from a store written by :meth:`save` or ``fit_factors(store=...)``.

        Only JSON attributes and numeric arrays are read: nothing is unpickled or executed. A custom
        estimator is not stored by value: pass it as ``estimator``, ``Factors.load(path, estimator=mine)``.
        """
        return Factors.from_stored(factors_store.load_factors(Path(path), estimator))

    @staticmethod
    def from_stored(stored: StoredFactors) -> "Factors":
        """The factors a store read back (:func:`fninfluence.store.factors_store.load_factors`,
        ``reuse_complete``); the estimator is the first layer's."""
        return Factors(stored.strategy, next(iter(stored.estimators.values())), stored.layers, stored.tensors,
                       stored.num_examples, stored.use_empirical_fisher, stored.passes_done, stored.estimators,
                       stored.weights_fingerprint)

    def as_stored(self) -> StoredFactors:
        """The fields a store writes (:func:`fninfluence.store.factors_store.save_factors`)."""
        return StoredFactors(self.strategy, self.layers, self.tensors, self.num_examples, self.use_empirical_fisher,
                             tuple(self.passes_done), self.estimators, self.weights_fingerprint)

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
                       self.use_empirical_fisher, self.passes_done, dict(self.estimators), self.weights_fingerprint)
