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
* ``damping law``: as the damping grows, ``P_damping(G)`` turns toward ``G`` itself (``damping * P_damping(G) -> G``
  for a damped inverse ``(C + damping I)^{-1}``): the distance of ``G`` from the line through ``P_damping(G)`` never
  grows and falls toward 0 (:func:`damping_law_distances`); an estimator that ignores ``damping`` fails it;
* ``groups = separate layers`` (cases with an ``ungrouped`` model, e.g. the default ``grouped conv`` case): a layer of
  G groups scores as G separate layers, one per group (the factors of group g come from group g's statistics);
* ``one example exact`` (opt-in with ``exact_for_one_example=True``): on a single example, each layer with one
  token (position) per example scores as with its exact dense Fisher, one block per group (true of KFAC and EKFAC,
  whose per-example gradient ``g a^T`` is then rank one in each group; not of identity or diagonal).

It needs no hypothesis; :mod:`fninfluence.testing.strategies` draws random models for property tests
that do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import copy
import dataclasses

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
    """A model, a task and data to run the checks on (float64 keeps the comparisons near machine precision).

    ``ungrouped`` (optional) enables the ``groups = separate layers`` check: ``(model, {grouped layer: its
    per-group layers})``, the same function as ``model`` with each tracked layer of G > 1 groups written as G
    layers of one group (group g's weights, fed group g's input channels), named in group order. Every other
    tracked layer keeps its name.
    """

    name: str
    model: nn.Module
    task: Task
    train: Dataset
    queries: Dataset
    ungrouped: Optional[Tuple[nn.Module, Dict[str, Sequence[str]]]] = None


class _TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean(dim=(2, 3)))


class _GroupedCNN(nn.Module):
    """A grouped conv (2 groups, one position per example on 3 x 3 inputs) beside a depthwise conv (4 groups,
    9 positions per example), and a linear head on both."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(4, 6, 3, groups=2)
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4, padding=1)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        return _head_on(self.head, self.grouped(x), self.depthwise(x))


def _head_on(head: nn.Module, grouped: torch.Tensor, depthwise: torch.Tensor) -> torch.Tensor:
    return head(torch.cat([torch.tanh(grouped).flatten(1), torch.tanh(depthwise).mean(dim=(2, 3))], dim=1))


def _one_conv_per_group(conv: nn.Conv2d) -> nn.ModuleList:
    """``conv`` (G groups) as G convolutions of one group, group g's weights in the g-th."""
    groups, out = conv.groups, conv.out_channels // conv.groups
    convs = nn.ModuleList()
    for g in range(groups):
        single = nn.Conv2d(conv.in_channels // groups, out, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                           bias=conv.bias is not None, padding_mode=conv.padding_mode).to(conv.weight.dtype)
        with torch.no_grad():
            single.weight.copy_(conv.weight[g * out:(g + 1) * out])
            if conv.bias is not None:
                single.bias.copy_(conv.bias[g * out:(g + 1) * out])
        convs.append(single)
    return convs


class _UngroupedCNN(nn.Module):
    """:class:`_GroupedCNN` with each group of its grouped convs as a conv of its own: the same function."""

    def __init__(self, model: _GroupedCNN):
        super().__init__()
        self.grouped = _one_conv_per_group(model.grouped)
        self.depthwise = _one_conv_per_group(model.depthwise)
        self.head = copy.deepcopy(model.head)

    @staticmethod
    def _apply(convs: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([conv(part) for conv, part in zip(convs, x.chunk(len(convs), dim=1))], dim=1)

    def forward(self, x):
        return _head_on(self.head, self._apply(self.grouped, x), self._apply(self.depthwise, x))


def _ungrouped_twin(model: _GroupedCNN) -> Tuple[nn.Module, Dict[str, Tuple[str, ...]]]:
    """``(the same model with one conv per group, {grouped layer: its per-group layers})``."""
    split = _UngroupedCNN(model).eval()
    return split, {name: tuple(f"{name}.{g}" for g in range(getattr(model, name).groups))
                   for name in ("grouped", "depthwise")}


def _data(shape, n, seed) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, *shape, generator=g, dtype=torch.float64),
                         torch.randint(0, 3, (n,), generator=g))


def standard_cases(seed: int = 0) -> List[Case]:
    """An MLP (rank-one per-example gradients), a CNN (a conv layer with 16 positions per example) and a grouped
    CNN: ``Conv2d(4, 6, 3, groups=2)`` with one position per example beside a depthwise ``Conv2d(4, 4, 3,
    groups=4, padding=1)`` with 9, with its ``ungrouped`` twin (one conv per group) for the groups check."""
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    cnn = _TinyCNN().double().eval()
    grouped = _GroupedCNN().double().eval()
    return [
        Case("mlp", mlp, SummedCrossEntropy(), _data((4,), 10, seed), _data((4,), 3, seed + 1)),
        Case("cnn", cnn, SummedCrossEntropy(), _data((2, 4, 4), 7, seed), _data((2, 4, 4), 2, seed + 1)),
        Case("grouped conv", grouped, SummedCrossEntropy(), _data((4, 3, 3), 7, seed), _data((4, 3, 3), 2, seed + 1),
             ungrouped=_ungrouped_twin(grouped)),
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
    """Layers with one token per example only: there ``G = g a^T`` is rank one in each group and the Kronecker basis
    exact. The oracle is the exact Fisher of each group, the groups being independent blocks (as the layer shape
    ``(G, out, in)`` has them)."""
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
        expected = sum(dense_influence(queries[layer][:, g], train[layer][:, g], dense_fisher(train[layer][:, g]),
                                       damping) for g in range(train[layer].shape[1]))
        run.record("one example exact", per_layer[layer], expected, rtol,
                   f"Layer {layer!r}: on one example the scores differ from the exact Fisher's (per group).")


DAMPING_DECADES = 12  # the damping law runs over damping * 10^k, k = 0 .. DAMPING_DECADES


def damping_law_distances(precondition: Callable[[torch.Tensor, float], torch.Tensor], grads: torch.Tensor,
                          dampings: Sequence[float]) -> torch.Tensor:
    """``[len(dampings), N]``: for each damping ``l`` and gradient ``G_n``, the distance of ``G_n`` from the line
    through ``P_l(G_n)``, relative to ``|G_n|``: the sine of the angle between them, ``min_c |c P_l(G_n) - G_n| /
    |G_n|`` (1 where ``P_l(G_n) = 0``).

    For ``P_l = (C + l I)^{-1}`` with ``C`` symmetric and ``C + l I`` positive definite it never grows with ``l``
    (with weights ``w_i`` = the squared coordinates of ``G_n`` in C's eigenbasis and ``s_i = 1 / (c_i + l)``, the
    squared cosine is ``m_1^2 / (m_0 m_2)`` with ``m_k = sum_i w_i s_i^k``; its derivative in ``l`` has the sign of
    ``m_1 m_3 - m_2^2 >= 0``, Cauchy-Schwarz) and falls as ``|C| / l`` once ``l >> |C|``: ``l P_l(G) -> G``. It is
    scale free, so it holds equally when the damping is scaled (e.g. by a mean eigenvalue) and for identity
    (``P(G) = G``, distance 0).
    """
    flat = grads.flatten(1)
    rows = []
    for damping in dampings:
        p = precondition(grads, damping).flatten(1).to(flat.dtype)
        along = (p * flat).sum(1) / p.square().sum(1).clamp_min(1e-300)
        distance = (flat - along[:, None] * p).norm(dim=1) / flat.norm(dim=1).clamp_min(1e-300)
        rows.append(torch.where(torch.isfinite(distance), distance, torch.ones_like(distance)))
    return torch.stack(rows)


def _check_damping(run: _Run, damping: float, rtol: float) -> None:
    """The damping law: over ``damping * 10^k`` the distances never grow (by more than ``rtol``) and in the last
    decade they fall by half at least, or are below ``rtol`` (the asymptotic ``|C| / l`` falls tenfold a decade)."""
    factors = run.fit()
    grads = _random_grads(factors, 3, 3)
    dampings = [(damping if damping > 0 else 0.1) * 10.0 ** k for k in range(DAMPING_DECADES + 1)]
    distances = torch.cat([
        damping_law_distances(lambda g, d: factors.estimator_for(layer).precondition(factors[layer], g, d),
                              grads[layer], dampings) for layer in factors.layers], dim=1)
    growth = float((distances[1:] - distances[:-1]).max().clamp_min(0))
    last, before = distances[-1], distances[-2]
    converging = bool(((last <= 0.5 * before) | (last <= rtol)).all())
    run.results.append(CheckResult(
        "damping law", run.case.name, growth <= rtol and converging, max(growth, float(last.max())),
        f"As the damping grows from {dampings[0]:g} to {dampings[-1]:g}, P_damping(G) must turn toward G "
        f"(damping * P_damping(G) -> G): the largest growth of the distance was {growth:.3g}, the largest distance "
        f"at the largest damping {float(last.max()):.3g}. Does precondition ignore its damping argument?"))


def _check_groups(run: _Run, damping: float, rtol: float) -> None:
    """A layer of G groups scores as its G one-group layers in the ``ungrouped`` twin (at a fixed damping: the
    heuristic damping of None is a mean over the layer, hence over its groups)."""
    twin, split = run.case.ungrouped
    separate_run = _Run(run.estimator, dataclasses.replace(run.case, model=twin, ungrouped=None))
    grouped = run.pairwise(run.fit(), damping, per_module=True)
    separate = separate_run.pairwise(separate_run.fit(), damping, per_module=True)
    actual = torch.stack([grouped[layer] for layer in grouped])
    expected = torch.stack([sum(separate[name] for name in split.get(layer, (layer,))) for layer in grouped])
    run.record("groups = separate layers", actual, expected, rtol,
               f"The grouped layers {sorted(split)} score differently from one layer per group: are group g's "
               "factors fitted from group g's statistics and applied to group g's gradients?")


CHECKS = ("batch size", "order", "partitions", "duplication", "self = diag(pairwise)", "symmetric", "linear",
          "positive", "meta sizes", "damping law", "groups = separate layers", "one example exact")


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
    heuristic, None; the damping law runs over ``damping * 10^k``, k = 0 .. :data:`DAMPING_DECADES`, from 0.1 if
    ``damping`` is 0). Returns every :class:`CheckResult`; with ``raise_on_failure`` (the default) raises
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
            lambda: _check_damping(run, damping, rtol),
        ]
        if case.ungrouped is not None:
            checks.append(lambda: _check_groups(run, damping, rtol))
        if exact_for_one_example:
            checks.append(lambda: _check_one_example(run, damping, rtol))
        for check in checks:
            check()
        results += run.results
    failures = [r for r in results if not r.passed]
    if failures and raise_on_failure:
        raise EstimatorCheckError(estimator.name, failures)
    return results
