"""fninfluence.damping.choose_damping: the stationarity (Newton-decrement) criterion picks the damping."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import fninfluence as fi
from fninfluence.damping import choose_damping, default_candidates
from fninfluence.errors import InfluenceError
from fninfluence.testing.oracles import ridge_influence, ridge_solution

QUIET = dict(progress=False)


class RidgeTask(fi.Task):
    """Summed squared error / 2. Sampled loss ``sum(out * s)``, ``s = +-1``: its gradients give the Fisher
    ``mean x x^T`` exactly (s^2 = 1), so EKFAC is the exact curvature of the data loss. Measurement: the prediction."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        out = model(x).squeeze(-1)
        if sample:
            return (out * (torch.randint(0, 2, out.shape).to(out.dtype) * 2 - 1)).sum()
        return 0.5 * (out - y).square().sum()

    def compute_measurement(self, batch, model):
        return model(batch[0]).sum()


def _ridge(l2, n=200, d=5, anchor=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    if anchor is None:
        theta = ridge_solution(x, y, l2)
    else:  # argmin sum (x^T t - y)^2 / 2 + l2 / 2 |t - anchor|^2
        theta = torch.linalg.solve(x.T @ x + l2 * torch.eye(d, dtype=x.dtype), x.T @ y + l2 * anchor)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(theta[None])
    data = TensorDataset(x, y)
    torch.manual_seed(0)
    return model, data, fi.fit_factors(model, RidgeTask(), data, strategy="ekfac", use_empirical_fisher=False,
                                          **QUIET), x, y


@pytest.mark.parametrize("l2", [3.0, 100.0])
def test_ridge_recovers_the_penalty_within_a_factor_of_three(l2):
    model, data, factors, _, _ = _ridge(l2)
    truth = l2 / len(data)  # factors are means over examples: the penalty on their scale is l2 / N
    choice = choose_damping(model, RidgeTask(), factors, data)  # default grid, which does not contain the truth
    assert choice.damping is not None and truth / 3 <= choice.damping <= truth * 3
    assert choice.estimate == pytest.approx(truth, rel=1e-8)
    assert choice.damping in choice.candidates and len(choice.values) == len(choice.candidates)


def test_ridge_with_the_truth_among_candidates_gives_the_exact_influence():
    l2 = 30.0
    model, data, factors, x, y = _ridge(l2)
    n = len(data)
    candidates = [l2 / n * 10 ** (k / 2) for k in range(-4, 5)]
    choice = choose_damping(model, RidgeTask(), factors, data, candidates=[None] + candidates, batch_size=64)
    assert choice.damping == candidates[4]
    assert choice.values[5] == pytest.approx(0.0, abs=1e-20)
    xq = torch.randn(6, x.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    queries = TensorDataset(xq, torch.zeros(6, dtype=torch.float64))
    scores = fi.pairwise_scores(model, RidgeTask(), factors, queries, data, damping=choice.damping, **QUIET)
    torch.testing.assert_close(scores / n, ridge_influence(x, y, l2, xq), rtol=1e-8, atol=1e-12)


def test_anchor_moves_the_penalty_centre():
    l2, d = 40.0, 5
    anchor = torch.linspace(-1, 1, d, dtype=torch.float64)
    model, data, factors, _, _ = _ridge(l2, anchor=anchor)
    truth = l2 / len(data)
    candidates = [truth * 10 ** (k / 2) for k in range(-4, 5)]
    with_anchor = choose_damping(model, RidgeTask(), factors, data, candidates=candidates,
                                 anchor={"weight": anchor[None]})
    assert with_anchor.damping == candidates[4] and with_anchor.estimate == pytest.approx(truth, rel=1e-8)
    without = choose_damping(model, RidgeTask(), factors, data, candidates=candidates)
    assert without.estimate != pytest.approx(truth, rel=1e-2)


def _mlp():
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        (nn.functional.cross_entropy(model(x), y) + 1e-2 * sum(p.square().sum() for p in model.parameters())
         ).backward()
        optimizer.step()
    data = TensorDataset(x, y)
    task = fi.classification_task()
    return model, task, data, fi.fit_factors(model, task, data, strategy="ekfac", **QUIET)


def test_returns_a_candidate_and_is_deterministic():
    model, task, data, factors = _mlp()
    first = choose_damping(model, task, factors, data, batch_size=16)
    second = choose_damping(model, task, factors, data, batch_size=16)
    assert first.candidates == default_candidates(factors) and first.candidates[0] is None
    assert first.damping in first.candidates
    assert first.values == second.values and first.damping == second.damping
    assert first.values[first.candidates.index(first.damping)] == min(first.values)
    explicit = choose_damping(model, task, factors, data, candidates=[1e-3, 1e-2, None])
    assert explicit.damping in (1e-3, 1e-2, None) and len(explicit.values) == 3
    assert "chosen" in explicit.table()


@pytest.mark.parametrize("bad", [[], [-1.0], [float("nan")], [float("inf")], [True], ["0.1"], [0.1, 0.1], "0.1", 0.1])
def test_bad_candidates_are_refused(bad):
    model, task, data, factors = _mlp()
    with pytest.raises(InfluenceError, match="candidate|damping"):
        choose_damping(model, task, factors, data, candidates=bad)


def test_unknown_criterion_and_identity_factors_are_refused():
    model, task, data, factors = _mlp()
    with pytest.raises(InfluenceError, match="criterion"):
        choose_damping(model, task, factors, data, criterion="lds")
    plain = fi.fit_factors(model, task, data, strategy="identity", **QUIET)
    with pytest.raises(InfluenceError, match="candidates="):
        choose_damping(model, task, plain, data)
    assert choose_damping(model, task, plain, data, candidates=[1e-2, 1e-1]).damping in (1e-2, 1e-1)
