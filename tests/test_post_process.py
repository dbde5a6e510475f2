"""``post_process_per_sample_gradient`` applies on every path that forms or implies a per-example gradient.

Oracles: a per-example autograd loop (the multiple-choice task's post-processing, summing the choices'
gradients, gives each example's own gradient), the per-example vmap mode (which folds an example's rows
into tokens and so sums the choices without any post-processing), and scale identities (doubling every
gradient multiplies identity scores by 4 and leaves EKFAC scores with the heuristic damping unchanged:
any path that skipped the post-processing would break them).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import fninfluence as fi
from fninfluence import InfluenceError
from fninfluence.compat import kronfluence as compat
from fninfluence.testing import oracles
from models import ClassificationTask, classification_data, mlp

QUIET = dict(progress=False)
CHOICES = 3


class ChoiceScorer(nn.Module):
    """Scores each of an example's choices with one MLP: ``[B, C, d] -> [B, C]`` through ``B * C`` rows."""

    def __init__(self, d=5):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, x):
        b, c, d = x.shape
        return self.net(x.reshape(b * c, d)).reshape(b, c)


class MultipleChoice(fi.Task):
    enable_post_process_per_sample_gradient = True

    def __init__(self, post_process=True):
        self.enable_post_process_per_sample_gradient = post_process

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def post_process_per_sample_gradient(self, module_name, gradient):
        return gradient.reshape(-1, CHOICES, *gradient.shape[1:]).sum(1)  # the choices' rows -> one example


def choice_data(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, CHOICES, 5, generator=g, dtype=torch.float64),
                         torch.randint(0, CHOICES, (n,), generator=g))


@pytest.fixture(scope="module")
def choices():
    torch.manual_seed(0)
    return ChoiceScorer().double().eval(), choice_data(10), choice_data(4, seed=1)


def test_multiple_choice_identity_scores_equal_per_example_gradient_dot_products(choices):
    model, train, queries = choices
    task = MultipleChoice()
    factors = fi.fit_factors(model, task, train, strategy="identity", **QUIET)
    scores = fi.pairwise_scores(model, task, factors, queries, train, batch_size=4, **QUIET)
    flat = lambda data: oracles.flat_gradients(oracles.per_example_gradients(model, task, data))
    torch.testing.assert_close(scores, flat(queries) @ flat(train).T, rtol=1e-10, atol=1e-10)
    train_grads = flat(train)
    torch.testing.assert_close(fi.self_scores(model, task, factors, train, batch_size=3, **QUIET),
                               (train_grads ** 2).sum(1), rtol=1e-10, atol=1e-10)
    summed = fi.pairwise_scores(model, task, factors, queries, train, aggregate_train=True, **QUIET)
    torch.testing.assert_close(summed[:, 0], scores.sum(1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac"])
def test_summing_the_choices_equals_the_per_example_vmap_mode(choices, strategy):
    """Per-example vmap folds an example's rows into its tokens, so ``G_n`` is already the choices' sum;
    the covariance pass reads the same rows either way."""
    model, train, queries = choices
    posted, folded = MultipleChoice(), MultipleChoice(post_process=False)
    ours = fi.fit_factors(model, posted, train, strategy=strategy, batch_size=4, **QUIET)
    theirs = fi.fit_factors(model, folded, train, strategy=strategy, batch_size=4, per_example_vmap=True, **QUIET)
    for layer in ours.tensors:
        for name, value in ours.tensors[layer].items():
            torch.testing.assert_close(value, theirs.tensors[layer][name], rtol=1e-9, atol=1e-12, msg=name)
    for damping in (None, 1e-3):
        expected = fi.pairwise_scores(model, folded, theirs, queries, train, damping=damping, per_example_vmap=True,
                                      **QUIET)
        got = fi.pairwise_scores(model, posted, ours, queries, train, damping=damping, **QUIET)
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(fi.self_scores(model, posted, ours, train, use_measurement=True, **QUIET),
                               fi.self_scores(model, folded, theirs, train, use_measurement=True,
                                              per_example_vmap=True, **QUIET), rtol=1e-8, atol=1e-10)


class Doubled(ClassificationTask):
    """Every per-example gradient of the layers in ``layers`` doubled."""

    enable_post_process_per_sample_gradient = True

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def post_process_per_sample_gradient(self, module_name, gradient):
        return 2 * gradient if module_name in self.layers else gradient


@pytest.mark.parametrize("model_maker", [lambda: mlp(), lambda: nn.Sequential(nn.Embedding(7, 4), nn.Flatten(),
                                                                               nn.Linear(12, 3))],
                         ids=["mlp", "embedding"])
def test_scaling_identities_hold_on_every_path(model_maker):
    torch.manual_seed(0)
    model = model_maker().double().eval()
    if isinstance(model[0], nn.Embedding):
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randint(0, 7, (12, 3), generator=g), torch.randint(0, 3, (12,), generator=g))
        layers = ["0", "2"]
    else:
        data, layers = classification_data(n=12), ["0", "2"]
    plain, doubled = ClassificationTask(layers), Doubled({layers[0]})
    doubled.modules = layers
    identity = fi.fit_factors(model, plain, data, strategy="identity", **QUIET)
    base = fi.pairwise_scores(model, plain, identity, data, data, per_module=True, **QUIET)
    scaled = fi.pairwise_scores(model, doubled, identity, data, data, per_module=True, **QUIET)
    torch.testing.assert_close(scaled[layers[0]], 4 * base[layers[0]])
    torch.testing.assert_close(scaled[layers[1]], base[layers[1]])
    # EKFAC: Lambda x 4 and the heuristic damping x 4, both gradients x 2: the scores do not change,
    # unless some path (lambda, query, train, self) skips the post-processing
    ekfac = {task: fi.fit_factors(model, task, data, strategy="ekfac", use_empirical_fisher=True, **QUIET)
             for task in (plain, doubled)}
    torch.testing.assert_close(ekfac[doubled].tensors[layers[0]]["lambda"], 4 * ekfac[plain].tensors[layers[0]]["lambda"])
    torch.testing.assert_close(fi.pairwise_scores(model, doubled, ekfac[doubled], data, data, **QUIET),
                               fi.pairwise_scores(model, plain, ekfac[plain], data, data, **QUIET))
    torch.testing.assert_close(fi.self_scores(model, doubled, ekfac[doubled], data, **QUIET),
                               fi.self_scores(model, plain, ekfac[plain], data, **QUIET))
    # with a fixed damping the doubled layer's scores change: a check that the factors were not simply reused
    assert not torch.allclose(fi.pairwise_scores(model, doubled, ekfac[plain], data, data, damping=1e-3, **QUIET),
                              fi.pairwise_scores(model, plain, ekfac[plain], data, data, damping=1e-3, **QUIET))


def test_wrong_shapes_per_token_and_vmap_are_refused(choices):
    model, train, queries = choices

    class Forgets(MultipleChoice):
        def post_process_per_sample_gradient(self, module_name, gradient):
            return gradient  # B * C rows, not B examples

    factors = fi.fit_factors(model, MultipleChoice(), train, strategy="identity", **QUIET)
    with pytest.raises(InfluenceError, match=r"must return one gradient per example.*\(10, 4, 6\)"):
        fi.self_scores(model, Forgets(), factors, train, **QUIET)
    with pytest.raises(InfluenceError, match="per_token"):
        fi.pairwise_scores(model, MultipleChoice(), factors, queries, train, per_token=True, **QUIET)
    with pytest.raises(InfluenceError, match="per_example_vmap"):
        fi.self_scores(model, MultipleChoice(), factors, train, per_example_vmap=True, **QUIET)


def test_the_compatible_analyzer_applies_a_kronfluence_tasks_post_processing(tmp_path, choices):
    model, train, queries = choices

    class KronfluenceStyle(compat.Task):
        enable_post_process_per_sample_gradient = True
        compute_train_loss = MultipleChoice.compute_train_loss
        compute_measurement = MultipleChoice.compute_measurement
        post_process_per_sample_gradient = MultipleChoice.post_process_per_sample_gradient

    task = KronfluenceStyle()
    model = compat.prepare_model(model, task)
    analyzer = compat.Analyzer("mc", model, task, cpu=True, disable_tqdm=True, output_dir=str(tmp_path))
    args = compat.FactorArguments(strategy="identity")
    analyzer.fit_all_factors("f", train, factor_args=args, per_device_batch_size=4, overwrite_output_dir=True)
    analyzer.compute_pairwise_scores("s", "f", queries, train, per_device_query_batch_size=2,
                                     per_device_train_batch_size=4, overwrite_output_dir=True)
    scores = analyzer.load_pairwise_scores("s")["all_modules"]
    flat = lambda data: oracles.flat_gradients(oracles.per_example_gradients(model, MultipleChoice(), data))
    # ScoreArguments default to float32 scores (as in Kronfluence): float32 rounding, not an algorithmic error
    torch.testing.assert_close(scores.double(), flat(queries) @ flat(train).T, rtol=1e-5, atol=1e-6)
