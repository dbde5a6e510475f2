"""Iterative refinement (fninfluence.refine): EKFAC-preconditioned conjugate gradients on the exact damped curvature,
checked in float64 against dense oracles (fninfluence.testing.oracles)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fninfluence as fi
from fninfluence.errors import InfluenceError
from fninfluence.refine import (layout, refined_pairwise_scores, refined_query_gradients, refinement_operators,
                                solvers)
from fninfluence.testing import oracles

from models import (ClassificationTask, LMTask, TinyTransformerLM, classification_data, float64, image_data, mlp,
                    sequence_data)

QUIET = dict(progress=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second thread only adds synchronisation (5x slower on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Problem:
    """A tiny float64 model, its fitted factors and the dense damped system ``(H + D) x = g`` over its tracked
    parameters, in the parameter order of :func:`fninfluence.refine.layout.parameter_names`."""

    def __init__(self, model, train, queries, strategy="ekfac", empirical=False, damping=None):
        self.model, self.train, self.queries, self.damping = model, train, queries, damping
        self.task = ClassificationTask()
        self.factors = fi.fit_factors(model, self.task, train, strategy=strategy, batch_size=8,
                                      use_empirical_fisher=empirical, **QUIET)
        self.specs = self.factors.layers
        self.names = layout.parameter_names(self.specs)
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.refinement = refinement_operators(model, self.task, self.factors, train, damping=damping, batch_size=5)
        per_parameter = {n: self.refinement.damping[layer].expand(model.get_parameter(n).numel())
                         for layer, spec in self.specs.items() for n in self._layer_names(spec)}
        self.dense_damping = torch.diag(torch.cat([per_parameter[n] for n in self.names]))
        self.g = self._flat_gradients(queries, "measurement")

    @staticmethod
    def _layer_names(spec):
        return [spec.weight] + ([spec.bias] if spec.has_bias else [])

    def _flat_gradients(self, data, objective):
        grads = oracles.per_example_gradients(self.model, self.task, data, objective=objective, param_names=self.names)
        return oracles.flat_gradients(grads, self.names)

    def curvature(self, kind):
        if kind == "ggn":
            return oracles.dense_ggn(self.model, self.task, self.train, param_names=self.names)
        return oracles.dense_fisher(self._flat_gradients(self.train, "train"))

    def flat(self, vectors):
        """``{layer: [K, G, out, in]}`` -> ``[K, P]`` in the oracle's parameter order."""
        params = layout.to_parameters(vectors, self.specs, self.shapes)
        return torch.cat([params[n].flatten(1) for n in self.names], dim=1)

    def dense_solution(self, kind="ggn"):
        return torch.linalg.solve(self.curvature(kind) + self.dense_damping, self.g.T).T

    def dense_operator(self):
        """``(H + D)`` as the refinement applies it, column by column: ``[P, P]``."""
        sizes = [self.model.get_parameter(n).numel() for n in self.names]
        columns = torch.split(torch.eye(sum(sizes), dtype=torch.float64), sizes, dim=1)
        basis = {n: c.reshape(-1, *self.shapes[n]) for n, c in zip(self.names, columns)}
        return self.flat(self.refinement.apply(layout.to_layout(basis, self.specs)))


@pytest.fixture(scope="module")
def mlp_problem():
    return Problem(float64(mlp()), classification_data(n=16), classification_data(n=5, seed=1))


class TinyCNN(nn.Module):
    """A grouped conv with a bias, a conv without one, and a linear head: 71 parameters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 2, groups=2)
        self.mix = nn.Conv2d(4, 2, 1, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(torch.tanh(self.conv(x)))).flatten(1))


@pytest.fixture(scope="module")
def cnn_problem():
    return Problem(float64(TinyCNN()), image_data(n=10, size=3), image_data(n=3, size=3, seed=1))


def _a_norm(error, matrix):
    return ((error @ matrix) * error).sum(1).sqrt()


# -- the parameter layout ---------------------------------------------------------------------------

def test_layout_round_trip_and_oracle_layout(cnn_problem):
    p = cnn_problem
    generator = torch.Generator().manual_seed(0)
    params = {n: torch.randn(4, *p.shapes[n], generator=generator, dtype=torch.float64) for n in p.names}
    vectors = layout.to_layout(params, p.specs)
    expected = oracles.layer_gradients(params, p.specs)
    for layer in p.specs:
        torch.testing.assert_close(vectors[layer], expected[layer], rtol=0, atol=0)
    back = layout.to_parameters(vectors, p.specs, p.shapes)
    for n in p.names:
        torch.testing.assert_close(back[n], params[n], rtol=0, atol=0)


# -- the operator -----------------------------------------------------------------------------------

@pytest.mark.parametrize("problem", ["mlp_problem", "cnn_problem"])
def test_operator_is_the_dense_damped_ggn_over_all_tracked_layers(problem, request):
    p = request.getfixturevalue(problem)
    expected = p.curvature("ggn") + p.dense_damping
    torch.testing.assert_close(p.dense_operator(), expected, rtol=1e-10, atol=1e-13)
    first = sum(p.model.get_parameter(n).numel() for n in p._layer_names(next(iter(p.specs.values()))))
    assert p.curvature("ggn")[:first, first:].abs().max() > 1e-4  # cross-layer blocks exist and are included


def test_empirical_fisher_and_hessian_products(mlp_problem):
    p = mlp_problem
    vectors = layout.to_layout({n: torch.randn(3, *p.shapes[n], dtype=torch.float64) for n in p.names}, p.specs)
    ef = refinement_operators(p.model, p.task, p.factors, p.train, curvature="empirical_fisher", batch_size=7)
    want = p.flat(vectors) @ (p.curvature("empirical_fisher") + p.dense_damping)
    torch.testing.assert_close(p.flat(ef.apply(vectors)), want, rtol=1e-10, atol=1e-13)

    hessian = refinement_operators(p.model, p.task, p.factors, p.train, curvature="hessian", batch_size=7)
    flat = torch.cat([p.model.get_parameter(n).detach().flatten() for n in p.names])
    sizes = [p.model.get_parameter(n).numel() for n in p.names]

    def loss(theta):
        values = {n: t.reshape(p.shapes[n]) for n, t in zip(p.names, torch.split(theta, sizes))}
        x, y = p.train.tensors
        return torch.nn.functional.cross_entropy(torch.func.functional_call(p.model, values, (x,)), y,
                                                 reduction="sum") / len(y)

    want = p.flat(vectors) @ (torch.func.hessian(loss)(flat) + p.dense_damping)
    torch.testing.assert_close(p.flat(hessian.apply(vectors)), want, rtol=1e-10, atol=1e-13)


# -- the solve --------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_zero_steps_equal_the_fitted_query_gradients(mlp_problem, strategy):
    p = mlp_problem
    factors = fi.fit_factors(p.model, p.task, p.train, strategy=strategy, batch_size=8, **QUIET)
    for damping in (None, 0.01):
        refined = refined_query_gradients(p.model, p.task, factors, p.queries, p.train, steps=0, damping=damping,
                                          **QUIET)
        fitted = fi.query_gradients(p.model, p.task, factors, p.queries, damping=damping, **QUIET)
        for layer in fitted:
            torch.testing.assert_close(refined[layer], fitted[layer], rtol=1e-14, atol=0)


@pytest.mark.parametrize("problem,steps", [("mlp_problem", 80), ("cnn_problem", 100)])
def test_cg_converges_to_the_dense_damped_solve(problem, steps, request):
    p = request.getfixturevalue(problem)
    refined = refined_query_gradients(p.model, p.task, p.factors, p.queries, p.train, steps=steps,
                                      curvature_batch_size=5, **QUIET)
    exact = p.dense_solution()
    assert float((p.flat(refined) - exact).norm() / exact.norm()) < 1e-8
    start = p.flat(fi.query_gradients(p.model, p.task, p.factors, p.queries, **QUIET))
    assert float((start - exact).norm() / exact.norm()) > 1e-2  # EKFAC alone is not the exact solve


def test_cg_error_in_the_damped_curvature_norm_never_grows(mlp_problem):
    """The A-norm error never grows, and after k steps the iterate is the A-norm best point of the Krylov space
    span{M g, (M A) M g, ..., (M A)^(k-1) M g}, computed densely (a descent method that is not CG fails this)."""
    p = mlp_problem
    matrix = p.curvature("ggn") + p.dense_damping
    exact = p.dense_solution()
    rhs = layout.to_layout(_unflatten(p, p.g), p.specs)
    size = matrix.shape[0]
    dense_m = p.flat(p.refinement.precondition(layout.to_layout(_unflatten(p, torch.eye(size, dtype=torch.float64)),
                                                                p.specs)))
    iterates = [p.flat(solvers.conjugate_gradients(p.refinement.apply, p.refinement.precondition, rhs, steps))
                for steps in range(13)]
    errors = torch.stack([_a_norm(x - exact, matrix) for x in iterates])
    assert bool((errors[1:] <= errors[:-1] * (1 + 1e-10)).all()), errors
    assert bool((errors[12] < 0.5 * errors[0]).all())
    for steps in range(1, 6):
        for q in range(p.g.shape[0]):
            basis = [dense_m @ p.g[q]]
            for _ in range(steps - 1):
                basis.append(dense_m @ (matrix @ basis[-1]))
            krylov = torch.linalg.qr(torch.stack(basis, dim=1)).Q
            best = krylov @ torch.linalg.solve(krylov.T @ matrix @ krylov, krylov.T @ p.g[q])
            torch.testing.assert_close(iterates[steps][q], best, rtol=1e-8, atol=1e-10)


def _unflatten(p, flat):
    sizes = [p.model.get_parameter(n).numel() for n in p.names]
    return {n: v.reshape(-1, *p.shapes[n]) for n, v in zip(p.names, torch.split(flat, sizes, dim=1))}


def test_richardson_is_the_preconditioned_recursion(mlp_problem):
    p = mlp_problem
    matrix = p.curvature("ggn") + p.dense_damping
    precondition = lambda flat: p.flat(p.refinement.precondition(layout.to_layout(_unflatten(p, flat), p.specs)))  # noqa: E731
    x = precondition(p.g)
    for _ in range(4):
        x = x + 0.5 * precondition(p.g - x @ matrix)
    refined = refined_query_gradients(p.model, p.task, p.factors, p.queries, p.train, steps=4, method="richardson",
                                      step_size=0.5, **QUIET)
    torch.testing.assert_close(p.flat(refined), x, rtol=1e-10, atol=1e-13)


def test_results_do_not_depend_on_query_or_curvature_batches(mlp_problem):
    p = mlp_problem
    together = refined_query_gradients(p.model, p.task, p.factors, p.queries, p.train, steps=4, **QUIET)
    split = refined_query_gradients(p.model, p.task, p.factors, p.queries, p.train, steps=4, query_batch_size=2,
                                    curvature_batch_size=3, batch_size=2, **QUIET)
    for layer in together:
        torch.testing.assert_close(split[layer], together[layer], rtol=1e-11, atol=1e-14)


def test_refined_scores_equal_the_dense_oracle_scores(mlp_problem):
    p = mlp_problem
    train = p._flat_gradients(p.train, "train")
    scores = refined_pairwise_scores(p.model, p.task, p.factors, p.queries, p.train, steps=80, batch_size=6, **QUIET)
    expected = p.dense_solution() @ train.T
    assert float((scores - expected).norm() / expected.norm()) < 1e-8
    zero = refined_pairwise_scores(p.model, p.task, p.factors, p.queries, p.train, steps=0, **QUIET)
    torch.testing.assert_close(zero, fi.pairwise_scores(p.model, p.task, p.factors, p.queries, p.train, **QUIET),
                               rtol=1e-12, atol=1e-14)


def test_empirical_fisher_factors_refine_towards_the_empirical_fisher():
    p = Problem(float64(mlp()), classification_data(n=16), classification_data(n=4, seed=1), empirical=True,
                damping=0.05)
    refined = refined_query_gradients(p.model, p.task, p.factors, p.queries, p.train, steps=80, damping=0.05, **QUIET)
    exact = p.dense_solution("empirical_fisher")
    assert float((p.flat(refined) - exact).norm() / exact.norm()) < 1e-8


def test_arguments_are_checked(mlp_problem):
    p = mlp_problem
    for bad in (dict(steps=-1), dict(steps=1.5), dict(method="lbfgs"), dict(curvature="fisher"),
                dict(query_batch_size=0)):
        with pytest.raises(InfluenceError):
            refined_query_gradients(p.model, p.task, p.factors, p.queries, p.train, **bad, **QUIET)


def test_ggn_needs_the_task_to_call_the_model(mlp_problem):
    p = mlp_problem

    class CallsSubmodules(ClassificationTask):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            first, last = getattr(model, "0"), getattr(model, "2")  # read through the stand-in from the model
            return nn.functional.cross_entropy(last(torch.tanh(first(x))), y, reduction="sum")

    with pytest.raises(InfluenceError, match="call model"):
        refinement_operators(p.model, CallsSubmodules(), p.factors, p.train).apply(
            layout.to_layout(_unflatten(p, p.g), p.specs))


def test_cg_stops_a_query_on_negative_curvature():
    """An indefinite operator: CG warns and keeps the last iterate instead of dividing by p^T A p <= 0."""
    matrix = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    rhs = {"x": torch.tensor([[1.0, 1.0]], dtype=torch.float64)}
    apply = lambda v: {"x": v["x"] @ matrix}  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = solvers.conjugate_gradients(apply, lambda v: v, rhs, steps=3)
    assert any("non-positive curvature" in str(w.message) for w in caught)
    assert torch.isfinite(x["x"]).all()


def test_operator_on_a_sequence_model_with_an_embedding():
    """Per-token losses summed per sequence, an embedding feeding tracked attention layers: ``(H + D) v`` equals the
    dense GGN over the tracked parameters (averaged over sequences, as the factors are)."""
    model, data, task = float64(TinyTransformerLM()), sequence_data(n=6), LMTask()
    factors = fi.fit_factors(model, task, data, strategy="ekfac", use_empirical_fisher=False, batch_size=4, **QUIET)
    specs, shapes = factors.layers, {n: tuple(p.shape) for n, p in model.named_parameters()}
    names = layout.parameter_names(specs)
    refinement = refinement_operators(model, task, factors, data, batch_size=4)
    generator = torch.Generator().manual_seed(0)
    vectors = {n: torch.randn(3, *shapes[n], generator=generator, dtype=torch.float64) for n in names}
    got = layout.to_parameters(refinement.apply(layout.to_layout(vectors, specs)), specs, shapes)
    flat = lambda d: torch.cat([d[n].flatten(1) for n in names], dim=1)  # noqa: E731
    damping = torch.cat([refinement.damping[layer].expand(torch.Size(shapes[n]).numel())
                         for layer, spec in specs.items() for n in layout.parameter_names({layer: spec})])
    want = flat(vectors) @ oracles.dense_ggn(model, task, data, param_names=names) + flat(vectors) * damping
    torch.testing.assert_close(flat(got), want, rtol=1e-10, atol=1e-12)


def test_ggn_of_a_task_that_calls_the_model_twice(mlp_problem):
    """Each call's output is linearised on its own: the loss of two calls (two views of the input) gives the GGN of
    the pair, as the dense oracle (which linearises every call of the model) computes it."""
    p = mlp_problem

    class TwoViews(ClassificationTask):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            return nn.functional.cross_entropy(model(x) + 0.5 * model(2 * x), y, reduction="sum")

    task = TwoViews()
    refinement = refinement_operators(p.model, task, p.factors, p.train, batch_size=5)
    vectors = layout.to_layout(_unflatten(p, p.g), p.specs)
    want = p.g @ (oracles.dense_ggn(p.model, task, p.train, param_names=p.names) + p.dense_damping)
    torch.testing.assert_close(p.flat(refinement.apply(vectors)), want, rtol=1e-10, atol=1e-13)
