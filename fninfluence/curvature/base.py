"""Curvature estimators as values: records of pure functions over dicts of tensors.

An estimator fits its factors in zero or more passes over the data. A pass is a triple of pure
functions, applied layer by layer:

* ``init(shape, dtype, device) -> state``: zeros of the right shapes,
* ``update(state, stats, factors) -> state``: fold one batch's layer statistics into the state,
* ``finalize(state, factors) -> factors``: turn the state into (more) factors,

States must be sums over examples: the states of data partitions, computed apart, are added up
before ``finalize``. Here ``stats = {"a": [B, T, G, in], "g": [B, T, G, out], "tokens": scalar}`` holds a batch's layer
inputs (with the bias column) and output gradients, and ``factors`` holds what earlier passes produced.

One-hot layers (``nn.Embedding``, ``in`` = the vocabulary V) never form ``a``: their stats hold
``"ids": [B, T]`` and ``"id_values": [B, T]`` instead, meaning ``a_t = id_values[t] e_{ids[t]}`` (G = 1;
the value is 0 for padding and masked tokens), and their ``shape`` is a :class:`OneHotShape`. The stats are
records, :class:`~fninfluence.core.algebra.DenseStats` or :class:`~fninfluence.core.algebra.OneHotStats`, that
read like those dicts; the formulas that differ between the two kinds live in :mod:`fninfluence.core.algebra`,
which tells them apart by type, so a compiled step stays one graph.

``precondition(factors, grads, damping)`` applies the damped inverse curvature to gradients laid out
as ``[N, G, out, in]``; ``self_score(factors, stats, damping)`` returns ``<P(G_n), G_n>`` per example.
Write your own estimator by building a :class:`CurvatureEstimator`; the pipeline and the property
tests in :mod:`fninfluence.testing` take it as they take the built-in ones.

What a pass declares (fields of :class:`FitPass` after the four above; all optional), so that the pipeline and
:func:`fninfluence.estimate_memory` never need to know a pass or an estimator by its name:

* ``raw_statistics``: True if the pass reads the raw layer statistics ``a``, ``g`` (e.g. sums of ``a a^T``,
  ``g g^T``), computed in ``Precision.covariance_dtype`` (at least float32); False if it reads the statistics
  after the task's ``post_process_per_sample_gradient``, in ``Precision.per_sample_gradient_dtype``. Passes of
  one name share one data pass, so they must agree on it.
* ``dense_input_block``: True if the state holds a dense ``[G, in, in]`` block, ``[P, P]`` for a layer tracked
  through its own P parameters; the pipeline refuses such a pass on parameter layers above
  :data:`MAX_DENSE_PARAMETER_LAYER` parameters.
* ``factor_dtypes``: ``{factor name: "covariance_dtype" | "lambda_dtype"}``, the
  :class:`~fninfluence.precision.Precision` field each output factor is returned and stored in (when that field
  is None: the model's dtype, at least float32); factors not named keep the dtype ``finalize`` computed them in
  (float64 from the float64 states).

Left at None, these three follow the convention of the built-ins' names, so that estimators written before the
fields existed behave as they did: a pass named ``"covariance"`` reads raw statistics and forms a dense block
(:func:`conventional_raw_pass`), and factors take their dtype by name (:func:`conventional_factor_dtype`). The
built-ins declare all three, so renaming their passes changes nothing. The shell reads them through
:attr:`FitPass.reads_raw_statistics`, :attr:`FitPass.forms_dense_block` and :meth:`FitPass.factor_dtype_field`.
* ``memory`` (default :func:`default_pass_memory`): ``memory(workspace) -> PassMemory``, the transient bytes of
  the pass at one layer (a :class:`Workspace`) beyond what a memory estimate measures itself: the state and the
  outputs (``init`` and ``finalize`` run on the meta device) and the batch's statistics.

* ``statistic`` (default None): ``statistic(like, factors) -> LayerStatistic``, the update split at the layer's
  output so that the pass keeps less of the forward pass (:mod:`fninfluence.core.statistics`): given a state of
  the pass (only its keys, shapes and dtypes are read) and the earlier factors, a statistic whose value is one
  batch's contribution to the state (the state's keys; ``update(state, stats, factors) = state + value``). Without one, the pipeline streams
  ``update(zeros, stats, factors)`` itself, keeping the layer's inputs until the backward pass reaches it.
  KFAC's covariance pass declares one: ``sum a a^T`` is taken when the layer is called, ``sum g g^T`` in the
  backward pass, and nothing of the forward pass is kept.
* ``reads_factors`` (default None: all of them): the names of the earlier passes' factors that ``update``,
  ``statistic`` and ``finalize`` read. The others are set aside while the pass runs (written to a temporary
  file, or copied to the CPU from a GPU) and put back, unchanged, when it ends, so that they do not add to the
  pass's peak memory. EKFAC's lambda pass reads only the eigenvectors: A and S are not held beside it.

:class:`CurvatureEstimator` likewise takes ``memory(workspace) -> ScoreMemory`` (default
:func:`default_score_memory`): the transient bytes of ``precondition`` on a block of ``workspace.rows`` query
gradients and of ``self_score`` on a batch of ``workspace.rows`` examples, beyond their inputs and outputs. The
hints only size :func:`fninfluence.estimate_memory`; a wrong one gives a wrong estimate, never a wrong result.
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import torch

from ..core.algebra import per_example_grads  # noqa: F401  (re-exported: the documented import path)
from ..core.statistics import LayerStatistic

Tensors = Dict[str, torch.Tensor]
LayerShape = Tuple[int, int, int]  # (groups, out, in) with the bias column counted in ``in``
Damping = Optional[float]

MAX_DENSE_PARAMETER_LAYER = 4096  # the largest parameter layer a dense [P, P] block is formed for
FACTOR_DTYPE_FIELDS = ("covariance_dtype", "lambda_dtype", "eigenvector_dtype")  # Precision fields for factors


class OneHotShape(tuple):
    """``(groups, out, in)`` of a layer whose inputs are one-hot rows: an embedding, ``in`` = vocabulary."""

    one_hot = True


def is_one_hot(shape: LayerShape) -> bool:
    return getattr(shape, "one_hot", False)


class Workspace(NamedTuple):
    """What a memory hint is told about one layer: its shape, the batch and the dtype work runs in.

    ``factors`` are meta tensors (shapes and dtypes only): during a fit, those of the earlier passes; when scoring,
    all of them. ``state_bytes`` is the bytes of the pass's state at this layer (0 when scoring).
    """

    shape: LayerShape
    tokens: int  # per example
    rows: int  # examples in a batch, or queries in a block
    dtype: torch.dtype  # the compute dtype
    factors: Tensors
    state_bytes: int = 0

    @property
    def gradient_elements(self) -> int:
        """Elements of one example's gradient: ``G out in``."""
        groups, out, inp = self.shape
        return groups * out * inp

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


class PassMemory(NamedTuple):
    """Transient bytes of a fit pass at one layer (see :class:`Workspace`).

    * ``update``: while one batch is folded in, beyond the batch's ``a``, ``g``; the largest layer's counts;
    * ``new_state``: the updated state, held for every layer until the whole batch is folded in (summed);
    * ``finalize``: while ``finalize`` runs, beyond the state and the outputs; the largest layer's counts.
    """

    update: int = 0
    new_state: int = 0
    finalize: int = 0


class ScoreMemory(NamedTuple):
    """Transient bytes of scoring at one layer: ``precondition`` on ``rows`` query gradients and ``self_score`` on
    a batch of ``rows`` examples, beyond their inputs and outputs; the largest layer's count."""

    precondition: int = 0
    self_score: int = 0


def default_pass_memory(workspace: Workspace) -> PassMemory:
    """Without a hint: ``update`` returns a new state while the old one is alive, ``finalize`` needs nothing else."""
    return PassMemory(new_state=workspace.state_bytes)


def default_score_memory(workspace: Workspace) -> ScoreMemory:
    """Without a hint: ``precondition`` keeps one intermediate as large as its input; ``self_score`` forms the
    per-example gradients and their preconditioned copy (as :func:`default_self_score` does) on top of that."""
    block = workspace.rows * workspace.gradient_elements * workspace.itemsize
    return ScoreMemory(precondition=block, self_score=3 * block)


def conventional_raw_pass(name: str) -> bool:
    """Whether a pass that declares neither ``raw_statistics`` nor ``dense_input_block`` has them, read off its
    name as the built-ins name theirs: KFAC's ``covariance`` pass (sums of raw ``a a^T``, ``g g^T``) does."""
    return name == "covariance"


def conventional_factor_dtype(name: str) -> Optional[str]:
    """The :class:`~fninfluence.precision.Precision` field a factor of a pass that declares no ``factor_dtypes``
    is stored in, read off its name as the built-ins name theirs: ``*_covariance`` and ``activation_diagonal``
    (A, S) take ``covariance_dtype``, ``lambda`` takes ``lambda_dtype``, anything else keeps its dtype."""
    if name.endswith("_covariance") or name == "activation_diagonal":
        return "covariance_dtype"
    if name == "lambda":
        return "lambda_dtype"
    if name.endswith("_eigenvectors"):
        return "eigenvector_dtype"
    return None


class FitPass(NamedTuple):
    """One pass over the data; the fields after ``finalize`` are declarations (see the module docstring)."""

    name: str
    init: Callable[[LayerShape, torch.dtype, torch.device], Tensors]
    update: Callable[[Tensors, Tensors, Tensors], Tensors]
    finalize: Callable[[Tensors, Tensors], Tensors]
    raw_statistics: Optional[bool] = None
    dense_input_block: Optional[bool] = None
    factor_dtypes: Optional[Mapping[str, str]] = None
    memory: Callable[[Workspace], PassMemory] = default_pass_memory
    statistic: Optional[Callable[[Tensors, Tensors], LayerStatistic]] = None
    reads_factors: Optional[Tuple[str, ...]] = None

    @property
    def reads_raw_statistics(self) -> bool:
        """Whether ``update`` reads the raw layer statistics (else the post-processed per-example ones)."""
        return conventional_raw_pass(self.name) if self.raw_statistics is None else self.raw_statistics

    @property
    def forms_dense_block(self) -> bool:
        """Whether the state holds a dense ``[G, in, in]`` block (``[P, P]`` on a parameter layer)."""
        return conventional_raw_pass(self.name) if self.dense_input_block is None else self.dense_input_block

    def reads_factor(self, factor: str) -> bool:
        """Whether the pass reads the earlier factor ``factor`` (every one unless ``reads_factors`` names them)."""
        return self.reads_factors is None or factor in self.reads_factors

    def factor_dtype_field(self, factor: str) -> Optional[str]:
        """The Precision field output ``factor`` is stored in (None: the dtype ``finalize`` computed it in)."""
        if self.factor_dtypes is None:
            return conventional_factor_dtype(factor)
        return self.factor_dtypes.get(factor)


class CurvatureEstimator(NamedTuple):
    name: str
    passes: Tuple[FitPass, ...]
    precondition: Callable[[Tensors, torch.Tensor, Damping], torch.Tensor]
    self_score: Callable[[Tensors, Tensors, Damping], torch.Tensor]
    memory: Callable[[Workspace], ScoreMemory] = default_score_memory


def default_self_score(precondition: Callable[[Tensors, torch.Tensor, Damping], torch.Tensor]):
    """``<P(G_n), G_n>`` through per-example gradients; estimators with a closed form override it."""

    def self_score(factors: Tensors, stats: Tensors, damping: Damping) -> torch.Tensor:
        grads = per_example_grads(stats)
        return (precondition(factors, grads, damping) * grads).flatten(1).sum(1)

    return self_score


def heuristic_damping(eigenvalues: torch.Tensor, damping: Damping) -> torch.Tensor:
    """The damping actually used: ``damping`` itself, or ``0.1 * mean(eigenvalues)`` when it is None.

    A layer that no training gradient reaches has all-zero eigenvalues; the heuristic then falls back
    to 1 (any positive value gives the same, zero, scores against the fitted examples) instead of 0/0.
    """
    if damping is None:
        mean = eigenvalues.mean()
        return torch.where(mean > 0, 0.1 * mean, torch.ones_like(mean))
    return torch.as_tensor(damping, dtype=eigenvalues.dtype, device=eigenvalues.device)


def damped_reciprocal(eigenvalues: torch.Tensor, damping: Damping, dtype: torch.dtype) -> torch.Tensor:
    """``1 / (eigenvalues + damping)`` computed in float64 (at least), cast to ``dtype``."""
    wide = eigenvalues.to(torch.promote_types(eigenvalues.dtype, torch.float64))
    return (1.0 / (wide + heuristic_damping(wide, damping))).to(dtype)
