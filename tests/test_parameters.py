"""Any other parameter (norms, positional tables, a custom module's bias) through per-example vmap gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

import fninfluence as fi
from fninfluence.testing import dense_fisher, dense_influence, layer_gradients, per_example_gradients
from models import LMTask, TinyTransformerLM, classification_data, sequence_data


class Scaled(nn.Module):
    """A custom module: elementwise scale and bias, invisible to the tap."""

    def __init__(self, width):
        super().__init__()
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(width))
        self.shift = nn.Parameter(0.1 * torch.randn(width))

    def forward(self, x):
        return x * self.scale + self.shift


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.norm, self.custom, self.head = nn.Linear(6, 5), nn.LayerNorm(5), Scaled(5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.custom(self.norm(self.fc(x)))))


class CrossEntropy(fi.Task):
    def __init__(self, modules):
        self.modules = modules

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def tracked_modules(self):
        return self.modules


def _model():
    torch.manual_seed(0)
    return Normed().double().eval()


@pytest.mark.parametrize("strategy", ["identity", "diagonal"])
def test_parameter_layers_against_the_loop_oracle(strategy):
    model, data = _model(), classification_data()
    task = CrossEntropy(["fc", "norm", "custom", "head"])
    factors = fi.fit_factors(model, task, data, strategy=strategy, use_empirical_fisher=True, batch_size=5,
                             progress=False)
    assert factors.layers["norm"].op == "parameters" and factors.layers["norm"].in_features == 10
    grads = layer_gradients(per_example_gradients(model, task, data), factors.layers)
    scores = fi.pairwise_scores(model, task, factors, data, data, per_module=True, batch_size=7, progress=False)
    self_scores = fi.self_scores(model, task, factors, data, per_module=True, progress=False)
    for layer in ("norm", "custom"):
        g = grads[layer]
        if strategy == "identity":
            expected = torch.einsum("qgoi,ngoi->qn", g, g)
        else:
            second = g.square().mean(0)
            torch.testing.assert_close(factors[layer]["lambda"], second, rtol=1e-12, atol=0)
            expected = torch.einsum("qgoi,ngoi->qn", g / (second + 0.1 * second.mean()), g)
        torch.testing.assert_close(scores[layer], expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(self_scores[layer], expected.diagonal(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_kfac_on_a_small_parameter_layer_is_its_exact_fisher_block(strategy):
    model, data = _model(), classification_data()
    task = CrossEntropy(["norm"])
    queries = Subset(classification_data(seed=3), range(4))
    factors = fi.fit_factors(model, task, data, strategy=strategy, use_empirical_fisher=True, progress=False)
    train_grads = layer_gradients(per_example_gradients(model, task, data), factors.layers)["norm"]
    query_grads = layer_gradients(per_example_gradients(model, task, queries, objective="measurement"),
                                  factors.layers)["norm"]
    expected = dense_influence(query_grads, train_grads, dense_fisher(train_grads), 0.05)
    scores = fi.pairwise_scores(model, task, factors, queries, data, damping=0.05, progress=False)
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)


def test_a_positional_table_of_the_root_module_compiles():
    class Positions(LMTask):
        def tracked_modules(self):
            return ["", "q", "lm_head"]  # "" is the root module: its own parameter is the positional table

    torch.manual_seed(0)
    model, data, task = TinyTransformerLM().double().eval(), sequence_data(), Positions()
    results = []
    for compile in (False, {"backend": "aot_eager"}):
        factors = fi.fit_factors(model, task, data, strategy="diagonal", use_empirical_fisher=True, compile=compile,
                                 progress=False)
        results.append(fi.pairwise_scores(model, task, factors, data, data, per_module=True, compile=compile,
                                          progress=False))
    assert results[0][""].abs().sum() > 0
    for layer in results[0]:
        torch.testing.assert_close(results[1][layer], results[0][layer], rtol=1e-10, atol=1e-12)


def test_large_parameter_layers_need_diagonal_or_identity():
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)
            self.table = Scaled(5000)

        def forward(self, x):
            return self.fc(x) + self.table(torch.zeros(5000, dtype=x.dtype))[:3]

    with pytest.raises(fi.InfluenceError, match=r"'table': 10000.*strategy='diagonal'"):
        fi.fit_factors(Wide().double(), CrossEntropy(["fc", "table"]), classification_data(), progress=False)


def test_a_module_without_parameters_of_its_own_is_refused():
    model = nn.Sequential(nn.Sequential(nn.Linear(6, 3))).double()
    with pytest.raises(fi.InfluenceError, match="no parameters of its own.*Track its submodules"):
        fi.fit_factors(model, CrossEntropy(["0"]), classification_data(), progress=False)


def test_a_tied_weight_named_as_a_parameter_counts_every_use():
    """An LM head tied to the embedding: the tap refuses the head, naming the weight gives its exact gradient."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(7, 4)
            self.mix = nn.Linear(4, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.mix(self.embed(ids))))

    torch.manual_seed(0)
    model = Tied().double().eval()
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randint(0, 7, (9,), generator=g), torch.randint(0, 7, (9,), generator=g))
    with pytest.raises(fi.InfluenceError, match=r"head: \['embedding'\].*name the weight itself there instead.*'embed.weight'"):
        fi.fit_factors(model, CrossEntropy(["head", "mix"]), data, progress=False)
    task = CrossEntropy(["head.weight", "mix"])  # the tied alias's name works as well as "embed.weight"
    factors = fi.fit_factors(model, task, data, strategy="identity", progress=False)
    assert factors.layers["head.weight"].parameters == ("embed.weight",)
    grads = per_example_gradients(model, task, data, param_names=["embed.weight"])["embed.weight"].flatten(1)
    scores = fi.pairwise_scores(model, task, factors, data, data, per_module=True, progress=False)
    torch.testing.assert_close(scores["head.weight"], grads @ grads.T, rtol=1e-10, atol=1e-12)
