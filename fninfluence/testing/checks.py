"""A property suite that any curvature estimator can be run through: :func:`check_estimator`.

Each check fits the estimator with :func:`fninfluence.fit_factors` on small float64 models and compares
two computations that must agree for any correct estimator (that follows fninfluence's conventions:
states are sums over examples, factors are averages, ``precondition`` is a damped inverse):

* ``batch size``: factors and scores do not depend on the batch size;
* ``order``: permuting the training examples permutes the scores and changes nothing else;
* ``partitions``: data and module partitions give the unpartitioned factors and scores;
* ``duplication``: fitting on every example twice gives the same scores (factors are averages);
* ``self = diag(pairwise)``: ``self_score`` agrees with ``precondition`` (for each damping);
* ``symmetric, positive, linear``: ``<P(G1), G2> = <G1, P(G2)>``, ``<P(G), G> > 0``, ``P`` is linear;
* ``meta sizes``: each pass's ``init`` and ``finalize`` run on the meta device give the fitted factors' names,
  shapes and dtypes (what :func:`fninfluence.estimate_memory` and the factor stores size and lay out);
* ``one example exact`` (opt-in with ``exact_for_one_example=True``): on a single example, each layer with one
  token (position) per example scores as with its exact dense Fisher (true of KFAC and EKFAC, whose per-example
  gradient ``g a^T`` is then rank one; not of identity or diagonal).

It needs no hypothesis; :mod:`fninfluence.testing.strategies` draws random models for property tests
that do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from ..capture import ModelTap
from ..curvature import CurvatureEstimator, meta_passes
from ..run.data import batches
from ..errors import InfluenceError
from ..factors import Factors
from ..pipeline import fit_factors, pairwise_scores, self_scores
from ..precision import Precision
from ..task import Task
from .oracles import dense_fisher, dense_influence, layer_gradients, per_example_gradients

Damping = Optional[float]


class SummedCrossEntropy(Task):
    """Cross-entropy summed over the batch; the measurement is the same loss (so self-influence with the loss
    is the diagonal of pairwise scores of the data against itself)."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        logits = model(x)
        if sample:
            with torch.no_grad():
                y = torch.multinomial(logits.detach().softmax(-1), 1).flatten()
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


@dataclass
class Case:
    """A model, a task and data to run the checks on (float64 keeps the comparisons near machine precision)."""

    name: str
    model: nn.Module
    task: Task
    train: Dataset
    queries: Dataset


class _TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean(dim=(2, 3)))


def _data(shape, n, seed) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, *shape, generator=g, dtype=torch.float64),
                         torch.randint(0, 3, (n,), generator=g))


def standard_cases(seed: int = 0) -> List[Case]:
    """An MLP (rank-one per-example gradients) and a CNN (a conv layer with 16 positions per example)."""
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    cnn = _TinyCNN().double().eval()
    return [
        Case("mlp", mlp, SummedCrossEntropy(), _data((4,), 10, seed), _data((4,), 3, seed + 1)),
        Case("cnn", cnn, SummedCrossEntropy(), _data((2, 4, 4), 7, seed), _data((2, 4, 4), 2, seed + 1)),
    ]


@dataclass
class CheckResult:
    check: str
    case: str
    passed: bool
    error: float  # the largest relative difference found (or the violation, for a sign check)
    detail: str = ""


class EstimatorCheckError(AssertionError):
    """Raised by :func:`check_estimator` when some property fails; ``failures`` lists them."""

    def __init__(self, estimator: str, failures: List[CheckResult]):
        self.failures = failures
        lines = "\n".join(f"  - {f.check} [{f.case}]: relative error {f.error:.3g}. {f.detail}" for f in failures)
        super().__init__(f"Estimator {estimator!r} fails {len(failures)} check(s):\n{lines}")


@dataclass
class _Run:
    """One case with the estimator plugged in: fit and score with fixed settings."""

    estimator: CurvatureEstimator
    case: Case
    results: List[CheckResult] = field(default_factory=list)

    def fit(self, train=None, **options) -> Factors:
        options.setdefault("batch_size", 4)
        return fit_factors(self.case.model, self.case.task, self.case.train if train is None else train,
                           strategy=self.estimator, use_empirical_fisher=True, progress=False, **options)

    def pairwise(self, factors, damping, train=None, queries=None, **options) -> torch.Tensor:
        options.setdefault("batch_size", 4)
        return pairwise_scores(self.case.model, self.case.task, factors,
                               self.case.queries if queries is None else queries,
                               self.case.train if train is None else train, damping=damping, progress=False,
                               **options)

    def self(self, factors, damping, **options) -> torch.Tensor:
        options.setdefault("batch_size", 4)
        return self_scores(self.case.model, self.case.task, factors, self.case.train, damping=damping,
                           progress=False, **options)

    def record(self, check: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, detail: str = ""):
        error = relative_error(actual, expected)
        self.results.append(CheckResult(check, self.case.name, error <= rtol, error, detail))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` (inf on a shape mismatch or a non-finite value)."""
    if actual.shape != expected.shape:
        return float("inf")
    scale = expected.abs().max().clamp_min(1e-300)
    error = float((actual - expected).abs().max() / scale)
    return error if error == error else float("inf")  # NaN -> inf


def _check_batch_size(run: _Run, damping: Damping, rtol: float) -> None:
    n = len(run.case.train)
    reference = run.fit(batch_size=n)
    other = run.fit(batch_size=3)
    run.record("batch size", torch.cat([run.pairwise(other, damping, batch_size=3).flatten(), run.self(other, damping, batch_size=3)]),
               torch.cat([run.pairwise(reference, damping, batch_size=n).flatten(), run.self(reference, damping, batch_size=n)]),
               rtol, "Fitting with batch sizes 3 and N gives different scores: does update() sum over examples?")


def _check_order(run: _Run, damping: Damping, rtol: float) -> None:
    n = len(run.case.train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n)).tolist()
    shuffled = Subset(run.case.train, order)
    expected = run.pairwise(run.fit(), damping)[:, order]
    run.record("order", run.pairwise(run.fit(train=shuffled), damping, train=shuffled), expected, rtol,
               "Shuffling the training examples changes the scores.")


def _check_partitions(run: _Run, damping: Damping, rtol: float) -> None:
    factors = run.fit(batch_size=3)  # batches that straddle the partition boundaries
    modules = min(2, len(factors.layers))
    partitioned = run.fit(batch_size=3, data_partitions=3, module_partitions=modules)
    expected = run.pairwise(factors, damping)
    run.record("partitions", run.pairwise(partitioned, damping, data_partitions=2, module_partitions=modules),
               expected, rtol, "Partitioned factors or scores differ: states of partitions must add up.")


def _check_duplication(run: _Run, damping: Damping, rtol: float) -> None:
    twice = ConcatDataset([run.case.train, run.case.train])
    run.record("duplication", run.pairwise(run.fit(train=twice), damping), run.pairwise(run.fit(), damping), rtol,
               "Fitting on every example twice changes the scores: factors should be averages over examples.")


def _check_self(run: _Run, dampings: Sequence[Damping], rtol: float) -> None:
    factors = run.fit()
    for damping in dampings:
        pairwise = run.pairwise(factors, damping, queries=run.case.train)
        run.record(f"self = diag(pairwise), damping={damping}", run.self(factors, damping), torch.diagonal(pairwise),
                   rtol, "self_score disagrees with precondition.")


def _random_grads(factors: Factors, count: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(count, *spec.shape, generator=g, dtype=torch.float64)
            for layer, spec in factors.layers.items()}


def _check_operator(run: _Run, dampings: Sequence[Damping], rtol: float) -> None:
    factors = run.fit()
    first, second = _random_grads(factors, 2, 1), _random_grads(factors, 2, 2)
    for damping in dampings:
        forward, backward, combined, expected, smallest = [], [], [], [], float("inf")
        for layer in factors.layers:
            apply = lambda grads: factors.estimator_for(layer).precondition(factors[layer], grads, damping)
            p1, p2 = apply(first[layer]), apply(second[layer])
            forward.append((p1 * second[layer]).flatten(1).sum(1))
            backward.append((first[layer] * p2).flatten(1).sum(1))
            combined.append(apply(2.0 * first[layer] - 3.0 * second[layer]).flatten())
            expected.append((2.0 * p1 - 3.0 * p2).flatten())
            quadratic = (p1 * first[layer]).flatten(1).sum(1) / first[layer].flatten(1).square().sum(1)
            smallest = min(smallest, float(quadratic.min()))
        run.record(f"symmetric, damping={damping}", torch.cat(forward), torch.cat(backward), rtol,
                   "<P(G1), G2> != <G1, P(G2)>: the preconditioner is not a symmetric operator.")
        run.record(f"linear, damping={damping}", torch.cat(combined), torch.cat(expected), rtol,
                   "P(2 G1 - 3 G2) != 2 P(G1) - 3 P(G2).")
        run.results.append(CheckResult(f"positive, damping={damping}", run.case.name, smallest > 0,
                                       max(0.0, -smallest), "<P(G), G> <= 0 for some G: not positive definite."))


def _signature(tensors) -> dict:
    return {name: (tuple(value.shape), value.dtype) for name, value in tensors.items()}


def _check_meta_sizes(run: _Run) -> None:
    factors = run.fit()
    model_dtype = next(run.case.model.parameters()).dtype
    precision = Precision()  # what run.fit uses
    fitting = precision.fitting({"*": run.estimator}, model_dtype)["*"]
    mismatched = []
    for layer, spec in factors.layers.items():
        passes = meta_passes(fitting, spec.shape, lambda fit_pass: precision.fit_dtypes(fit_pass, model_dtype)[0])
        meta = {name: value for sized in passes.values() for name, value in sized.outputs.items()}
        if _signature(meta) != _signature(factors.tensors[layer]):
            mismatched.append(f"{layer}: meta {_signature(meta)} != fitted {_signature(factors.tensors[layer])}")
    run.results.append(CheckResult("meta sizes", run.case.name, not mismatched, float("inf") if mismatched else 0.0,
                                   "init/finalize on the meta device disagree with the fitted factors (shapes or "
                                   "dtypes depend on values?): " + "; ".join(mismatched)))


def _check_one_example(run: _Run, damping: float, rtol: float) -> None:
    """Layers with one token per example only: there ``G = g a^T`` is rank one and the Kronecker basis exact."""
    one = Subset(run.case.train, [1])
    factors = run.fit(train=one)
    tap = ModelTap(run.case.model, run.case.task)
    tokens = tap.tokens_per_call("train", next(iter(batches(one, 1, tap.device))))
    layers = [layer for layer in factors.layers if tokens[layer] == 1]
    grads = lambda data, objective: layer_gradients(
        per_example_gradients(run.case.model, run.case.task, data, objective=objective), factors.layers)
    train, queries = grads(one, "train"), grads(run.case.queries, "measurement")
    per_layer = run.pairwise(factors, damping, train=one, per_module=True)
    for layer in layers:
        expected = dense_influence(queries[layer], train[layer], dense_fisher(train[layer]), damping)
        run.record("one example exact", per_layer[layer], expected, rtol,
                   f"Layer {layer!r}: on one example the scores differ from the exact Fisher's.")


CHECKS = ("batch size", "order", "partitions", "duplication", "self = diag(pairwise)", "symmetric", "linear",
          "positive", "meta sizes", "one example exact")


def check_estimator(
    estimator: CurvatureEstimator,
    *,
    cases: Optional[Sequence[Case]] = None,
    damping: float = 0.1,
    exact_for_one_example: bool = False,
    rtol: float = 1e-8,
    raise_on_failure: bool = True,
) -> List[CheckResult]:
    """Run ``estimator`` through every property check on ``cases`` (default: :func:`standard_cases`).

    ``damping`` is the fixed damping used by the checks (the self and operator checks also use the
    heuristic, None). Returns every :class:`CheckResult`; with ``raise_on_failure`` (the default) raises
    :class:`EstimatorCheckError` naming each failed check instead. Use it in a test::

        def test_my_estimator():
            check_estimator(my_estimator, exact_for_one_example=True)
    """
    if not isinstance(estimator, CurvatureEstimator):
        raise InfluenceError(f"check_estimator needs a CurvatureEstimator, got {type(estimator).__name__}; build one "
                             "with fninfluence.CurvatureEstimator(name, passes, precondition, self_score).")
    results: List[CheckResult] = []
    for case in standard_cases() if cases is None else cases:
        run = _Run(estimator, case)
        checks: List[Callable[[], None]] = [
            lambda: _check_batch_size(run, damping, rtol),
            lambda: _check_order(run, damping, rtol),
            lambda: _check_partitions(run, damping, rtol),
            lambda: _check_duplication(run, damping, rtol),
            lambda: _check_self(run, (damping, None), rtol),
            lambda: _check_operator(run, (damping, None), rtol),
            lambda: _check_meta_sizes(run),
        ]
        if exact_for_one_example:
            checks.append(lambda: _check_one_example(run, damping, rtol))
        for check in checks:
            check()
        results += run.results
    failures = [r for r in results if not r.passed]
    if failures and raise_on_failure:
        raise EstimatorCheckError(estimator.name, failures)
    return results
