"""Library-only identity and oracle tests for paths that were checked only against Kronfluence, or not at all.

Each test compares fninfluence with something computed independently of it (a per-example autograd loop, an
exact dot product of gradients, a closed form, the same computation on unpadded or unaggregated data), so it
catches a bug whether or not Kronfluence is installed. Everything runs in float64 on tiny models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset, TensorDataset

import fninfluence as fi
from fninfluence.compat import kronfluence as compat

QUIET = dict(progress=False)
COVARIANCES = ("activation_covariance", "gradient_covariance", "num_tokens")


def assert_close(actual, expected, rtol=1e-10):
    """``max |actual - expected| <= rtol * max |expected|``: one scale for the whole tensor."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = float(expected.abs().max())
    error = float((actual - expected).abs().max())
    assert error <= rtol * max(scale, 1e-300), f"max error {error:.3g} against scale {scale:.3g}"


# -- attention masks reach the output gradients --------------------------------------------------------

VOCAB, TAGS, WIDTH = 7, 3, 4
LENGTHS = [6, 3, 5, 2, 6, 4]


class Tagger(nn.Module):
    """Tags every token on its own (no mixing between positions): a padded position changes no other's gradient."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.fc1, self.fc2 = nn.Linear(WIDTH, 5), nn.Linear(5, TAGS)

    def forward(self, ids):
        return self.fc2(torch.tanh(self.fc1(self.embed(ids))))


class UnmaskedTagging(fi.Task):
    """Batches ``(ids, tags, mask)``. The loss sums over *every* position, padding included: only the attention
    mask says which tokens count, so padded tokens have non-zero output gradients that the library must drop."""

    def compute_train_loss(self, batch, model, sample=False):
        ids, tags, _ = batch
        return F.cross_entropy(model(ids).flatten(0, 1), tags.flatten(), reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def get_attention_mask(self, batch):
        return batch[2]

    def tracked_modules(self):
        return ["embed", "fc1", "fc2"]


class CompatUnmaskedTagging(compat.Task, UnmaskedTagging):
    """The same task through the Kronfluence-compatible API."""


def _tagging_data(seed=0):
    """The sequences right-padded to one length (pad id and tag 0, mask 0) and, unpadded, one example each."""
    g = torch.Generator().manual_seed(seed)
    longest = max(LENGTHS)
    ids = torch.randint(1, VOCAB, (len(LENGTHS), longest), generator=g)
    tags = torch.randint(0, TAGS, (len(LENGTHS), longest), generator=g)
    mask = torch.zeros(len(LENGTHS), longest, dtype=torch.long)
    for row, length in enumerate(LENGTHS):
        ids[row, length:], tags[row, length:], mask[row, :length] = 0, 0, 1
    padded = TensorDataset(ids, tags, mask)
    unpadded = [(ids[row, :length], tags[row, :length], mask[row, :length]) for row, length in enumerate(LENGTHS)]
    return padded, unpadded


def _tagger():
    torch.manual_seed(0)
    return Tagger().double().eval()


def test_padding_under_a_mask_adds_nothing_to_the_factors_when_the_loss_counts_it():
    """With a loss that does not mask padding, A, S, the token counts and Lambda of padded, masked sequences equal
    those of the same sequences without padding (fitted one by one). Masking the inputs but not the output
    gradients would count the padded tokens' gradients in S."""
    model, task = _tagger(), UnmaskedTagging()
    padded, unpadded = _tagging_data()
    fit = dict(strategy="ekfac", use_empirical_fisher=True, **QUIET)
    with_padding = fi.fit_factors(model, task, padded, batch_size=4, **fit)
    without = fi.fit_factors(model, task, unpadded, batch_size=1, **fit)
    for layer in ("fc1", "fc2"):
        for name in COVARIANCES:
            assert_close(with_padding[layer][name], without[layer][name])
    assert float(with_padding["fc1"]["num_tokens"]) == sum(LENGTHS)
    assert_close(with_padding["embed"]["gradient_covariance"], without["embed"]["gradient_covariance"])
    assert_close(with_padding["embed"]["activation_diagonal"], without["embed"]["activation_diagonal"])
    # Lambda enters through the scores, which do not depend on the eigenvectors' signs
    queries = Subset(padded, [0, 3])
    scores = [fi.pairwise_scores(model, task, f, queries, padded, batch_size=4, per_module=True, **QUIET)
              for f in (with_padding, without)]
    for layer in scores[1]:
        assert_close(scores[0][layer], scores[1][layer], rtol=1e-9)


def test_padded_scores_equal_the_oracle_on_unpadded_sequences():
    """Identity scores of padded, masked sequences are exact dot products of the unpadded sequences' gradients."""
    from fninfluence.testing import flat_gradients, per_example_gradients

    model, task = _tagger(), UnmaskedTagging()
    padded, unpadded = _tagging_data()
    factors = fi.fit_factors(model, task, padded, strategy="identity", **QUIET)
    names = [n for n, _ in model.named_parameters()]
    grads = flat_gradients(per_example_gradients(model, task, unpadded), names)
    assert_close(fi.pairwise_scores(model, task, factors, padded, padded, batch_size=4, **QUIET), grads @ grads.T)
    assert_close(fi.self_scores(model, task, factors, padded, batch_size=4, **QUIET), grads.square().sum(1))


def test_compat_attention_mask_reaches_the_gradient_covariance(tmp_path):
    """Through the compat Analyzer (Task.get_attention_mask as in Kronfluence): the stored covariance sums and
    counts equal those of the unpadded sequences."""
    model, task = _tagger(), CompatUnmaskedTagging()
    padded, unpadded = _tagging_data()
    analyzer = compat.Analyzer("mask", model, task, cpu=True, disable_tqdm=True, output_dir=str(tmp_path))
    analyzer.fit_all_factors("f", padded, per_device_batch_size=4,
                             factor_args=compat.FactorArguments(strategy="kfac", use_empirical_fisher=True,
                                                                **WIDE_FACTORS))
    loaded = analyzer.load_covariance_matrices("f")
    without = fi.fit_factors(model, task, unpadded, strategy="kfac", use_empirical_fisher=True, batch_size=1,
                             **QUIET)
    for layer in ("fc1", "fc2"):
        tokens = without[layer]["num_tokens"]
        assert int(loaded["num_gradient_covariance_processed"][layer]) == sum(LENGTHS)
        for name in ("activation_covariance", "gradient_covariance"):
            assert_close(loaded[name][layer], without[layer][name][0] * tokens)


W = torch.float64
WIDE_FACTORS = dict(activation_covariance_dtype=W, gradient_covariance_dtype=W, eigendecomposition_dtype=W,
                    per_sample_gradient_dtype=W, lambda_dtype=W)
WIDE_SCORES = dict(per_sample_gradient_dtype=W, precondition_dtype=W, score_dtype=W, query_gradient_svd_dtype=W)
