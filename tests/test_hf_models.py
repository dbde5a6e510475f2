"""Hugging Face BERT and ViT from configs, as they are: every nn.Linear (and ViT's patch-embedding Conv2d) is tapped.

BERT mixes layers with a token dimension (the encoder, on right-padded sequences with an attention mask) and
layers without one (the pooler and the classifier, which see the [CLS] vector only). ViT's first layer is a
Conv2d over patches. Both run from random-init configs in float64, so no download is needed.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader, TensorDataset

import fninfluence as fi
from fninfluence.capture import ModelTap
from fninfluence.curvature import per_example_grads
from fninfluence.testing import dense_fisher, dense_influence, layer_gradients, per_example_gradients

import transformers  # a test dependency: pip install ".[test]"

VOCAB, SEQ, CLASSES = 40, 8, 3
LENGTHS = [SEQ, 5, SEQ, 3, 6, SEQ]  # right padding on half of the sequences
IMAGE, PATCH = 8, 4
STRATEGIES = ["identity", "diagonal", "kfac", "ekfac"]


def tiny_bert(layers=2):
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=layers, hidden_size=16, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=VOCAB, max_position_embeddings=16,
                                     num_labels=CLASSES, attn_implementation="eager")
    return transformers.BertForSequenceClassification(config).double().eval()


def tiny_vit(layers=2):
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=IMAGE, patch_size=PATCH, num_channels=3, hidden_size=16,
                                    num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
                                    num_labels=CLASSES, attn_implementation="eager")
    return transformers.ViTForImageClassification(config).double().eval()


def _cross_entropy(logits, labels, sample):
    if sample:  # labels drawn from the model: the true Fisher
        with torch.no_grad():
            labels = torch.multinomial(logits.detach().softmax(-1), 1).squeeze(-1)
    return F.cross_entropy(logits, labels, reduction="sum")


class SequenceClassification(fi.Task):
    """Batches ``(input_ids, attention_mask, labels)``; summed cross-entropy; the measurement is the same loss."""

    def compute_train_loss(self, batch, model, sample=False):
        ids, mask, labels = batch
        return _cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels, sample)

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def get_attention_mask(self, batch):
        return batch[1]


class ImageClassification(fi.Task):
    """Batches ``(pixel_values, labels)``; summed cross-entropy; the measurement is the same loss."""

    def compute_train_loss(self, batch, model, sample=False):
        pixels, labels = batch
        return _cross_entropy(model(pixel_values=pixels).logits, labels, sample)

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


def sentences(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    for i, length in enumerate(LENGTHS[:n]):
        ids[i, length:], mask[i, length:] = 0, 0  # token 0 is BERT's pad_token_id
    return TensorDataset(ids, mask, torch.randint(0, CLASSES, (n,), generator=g))


def images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, IMAGE, IMAGE, generator=g, dtype=torch.float64)
    return TensorDataset(pixels, torch.randint(0, CLASSES, (n,), generator=g))


MODELS = {
    "bert": (tiny_bert, SequenceClassification, sentences),
    "vit": (tiny_vit, ImageClassification, images),
}


def tracked_by_default(model):
    """Every layer the default (``tracked_modules() -> None``) should find: here nn.Linear and nn.Conv2d."""
    return {name for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))}


def relative_error(actual, expected):
    return float((actual - expected).abs().max() / expected.abs().max())


# -- an oracle for the per-token statistics, with ordinary module hooks on a copy of the model -------

def token_statistics(model, task, data, specs):
    """``{layer: (a [tokens, in (+1)], g [tokens, out])}`` over the unmasked tokens of ``data``.

    ``a`` is the layer input (im2col patches for a convolution) with a column of ones for the bias, ``g``
    the gradient of the summed training loss with respect to the layer output: read with forward hooks
    and one ``torch.autograd.grad`` over the whole data set, independently of fninfluence's tap.
    """
    model = copy.deepcopy(model)
    batch = next(iter(DataLoader(data, batch_size=len(data), shuffle=False)))
    mask = task.get_attention_mask(batch)
    seen = {}

    def record(layer):
        def hook(module, inputs, output):
            seen[layer] = (module, inputs[0], output)
        return hook

    handles = [model.get_submodule(layer).register_forward_hook(record(layer)) for layer in specs]
    loss = task.compute_train_loss(batch, model, sample=False)
    for handle in handles:
        handle.remove()
    output_grads = torch.autograd.grad(loss, [seen[layer][2] for layer in specs])
    statistics = {}
    for (layer, spec), g in zip(specs.items(), output_grads):
        module, a, _ = seen[layer]
        if isinstance(module, nn.Conv2d):
            a = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
            g = g.flatten(2).transpose(1, 2)
        a, g = a.detach(), g.detach()
        if a.dim() == 3 and mask is not None and a.shape[1] == mask.shape[1]:
            a, g = a[mask.bool()], g[mask.bool()]
        a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        if spec.has_bias:
            a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        statistics[layer] = (a, g)
    return statistics


def oracle_scores(strategy, model, task, data, factors):
    """``[N, N]`` scores of ``data`` against itself built from per-example autograd gradients (dense curvature)."""
    grads = layer_gradients(per_example_gradients(model, task, data), factors.layers)
    tokens = token_statistics(model, task, data, factors.layers) if strategy in ("kfac", "ekfac") else {}
    expected = 0
    for layer, g in grads.items():
        if strategy == "identity":
            expected = expected + torch.einsum("qgoi,ngoi->qn", g, g)
            continue
        if strategy == "diagonal":
            second_moment = g.square().mean(0)
            torch.testing.assert_close(factors[layer]["lambda"], second_moment, rtol=1e-9, atol=1e-14)
            preconditioned = g / (second_moment + 0.1 * second_moment.mean())
            expected = expected + torch.einsum("qgoi,ngoi->qn", preconditioned, g)
            continue
        a, s = tokens[layer]
        activation, gradient = a.T @ a / a.shape[0], s.T @ s / s.shape[0]
        fitted = factors[layer]
        torch.testing.assert_close(fitted["activation_covariance"][0], activation, rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(fitted["gradient_covariance"][0], gradient, rtol=1e-9, atol=1e-14)
        if strategy == "kfac":  # (S x A + damping)^-1 with damping = 0.1 mean(l_S l_A^T), basis-free
            curvature = torch.kron(gradient, activation)
            damping = 0.1 * torch.trace(gradient) / gradient.shape[0] * torch.trace(activation) / activation.shape[0]
        else:  # the fitted Kronecker eigenbasis (checked to diagonalise A and S), EKFAC's Lambda from the oracle
            qa, qs = fitted["activation_eigenvectors"][0], fitted["gradient_eigenvectors"][0]
            for q, covariance in ((qa, activation), (qs, gradient)):
                rotated = q.T @ covariance @ q
                torch.testing.assert_close(rotated, torch.diag(rotated.diagonal()), rtol=0,
                                           atol=1e-10 * float(covariance.abs().max()))
            basis = torch.kron(qs, qa)
            eigenvalues = (basis.T @ dense_fisher(g) @ basis).diagonal()
            torch.testing.assert_close(fitted["lambda"][0].flatten(), eigenvalues, rtol=1e-9,
                                       atol=1e-12 * float(eigenvalues.max()))
            curvature = basis @ torch.diag(eigenvalues) @ basis.T
            damping = 0.1 * eigenvalues.mean()
        expected = expected + dense_influence(g, g, curvature, float(damping))
    return expected


# -- the tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(MODELS))
def test_per_example_gradients_match_a_per_example_loop(name):
    make_model, make_task, make_data = MODELS[name]
    model, task, data = make_model(), make_task(), make_data()
    engine = ModelTap(model, task)
    batch = tuple(data.tensors)
    _, stats = engine.layer_stats("train", engine.params, engine.buffers, batch, engine.probes_for("train", batch))
    assert set(engine.specs) == tracked_by_default(model)
    tokens = {layer: s["a"].shape[1] for layer, s in stats.items()}
    if name == "bert":  # the pooler and the classifier see one vector per example, the encoder every token
        assert tokens.pop("bert.pooler.dense") == 1 and tokens.pop("classifier") == 1
        assert set(tokens.values()) == {SEQ}
        assert all(float(stats[layer]["tokens"]) == sum(LENGTHS) for layer in tokens)  # padding is not counted
    else:  # 2 x 2 patches, then the [CLS] token and the patches; the classifier sees the [CLS] vector only
        conv = "vit.embeddings.patch_embeddings.projection"
        assert engine.specs[conv].op == "conv2d" and tokens.pop(conv) == (IMAGE // PATCH) ** 2
        assert tokens.pop("classifier") == 1 and set(tokens.values()) == {(IMAGE // PATCH) ** 2 + 1}
    oracle = layer_gradients(per_example_gradients(model, task, data), engine.specs)
    for layer, expected in oracle.items():
        torch.testing.assert_close(per_example_grads(stats[layer]), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_scores_equal_the_oracle_and_self_scores_the_diagonal(name, strategy):
    make_model, make_task, make_data = MODELS[name]
    model, task, data = make_model(), make_task(), make_data()
    factors = fi.fit_factors(model, task, data, strategy=strategy, use_empirical_fisher=True, batch_size=4,
                             progress=False)
    assert set(factors.layers) == tracked_by_default(model)
    pairwise = fi.pairwise_scores(model, task, factors, data, data, batch_size=4, progress=False)
    self_scores = fi.self_scores(model, task, factors, data, batch_size=4, progress=False)
    measured = fi.self_scores(model, task, factors, data, batch_size=4, use_measurement=True, progress=False)
    assert pairwise.shape == (len(data), len(data)) and self_scores.shape == (len(data),)
    assert torch.isfinite(pairwise).all() and torch.isfinite(self_scores).all()
    torch.testing.assert_close(self_scores, pairwise.diagonal(), rtol=1e-8, atol=0)
    torch.testing.assert_close(measured, pairwise.diagonal(), rtol=1e-8, atol=0)
    expected = oracle_scores(strategy, model, task, data, factors)
    assert relative_error(pairwise, expected) <= 1e-9


@pytest.mark.parametrize("name", sorted(MODELS))
def test_true_fisher_fit_samples_labels_and_gives_finite_scores(name):
    make_model, make_task, make_data = MODELS[name]
    model, task, data = make_model(), make_task(), make_data()
    torch.manual_seed(1)
    factors = fi.fit_factors(model, task, data, strategy="ekfac", batch_size=4, progress=False)
    pairwise = fi.pairwise_scores(model, task, factors, data, data, batch_size=4, progress=False)
    assert torch.isfinite(pairwise).all() and pairwise.diagonal().min() > 0


def test_bert_per_token_scores_spread_the_pooler_and_classifier_over_tokens():
    """Per token, the layers without tokens (pooler, classifier) spread evenly; summed over tokens it is pairwise."""
    model, task, data = tiny_bert(), SequenceClassification(), sentences()
    factors = fi.fit_factors(model, task, data, strategy="ekfac", use_empirical_fisher=True, batch_size=4,
                             progress=False)
    pairwise = fi.pairwise_scores(model, task, factors, data, data, batch_size=4, per_module=True, progress=False)
    per_token = fi.pairwise_scores(model, task, factors, data, data, batch_size=4, per_module=True, per_token=True,
                                   progress=False)
    for layer in ("bert.pooler.dense", "classifier"):
        torch.testing.assert_close(per_token[layer], pairwise[layer][..., None].expand(-1, -1, SEQ) / SEQ)
    encoder = per_token["bert.encoder.layer.1.output.dense"]
    padding = (data.tensors[1] == 0)[None].expand(len(data), -1, -1)
    assert encoder.shape == (len(data), len(data), SEQ) and float(encoder[padding].abs().max()) == 0
    for layer, scores in per_token.items():
        torch.testing.assert_close(scores.sum(-1), pairwise[layer], rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiles_as_one_graph_per_step_with_eager_results(name):
    """One encoder layer: Dynamo's tracing time grows with depth (about 40 s per model with two layers on two
    CPU cores, against about 25 s with one) and a second layer runs the same code."""
    make_model, make_task, make_data = MODELS[name]
    model, task, data = make_model(layers=1), make_task(), make_data()
    results = []
    torch._dynamo.reset()
    counters.clear()
    for compile in (False, {"backend": "aot_eager"}):
        factors = fi.fit_factors(model, task, data, strategy="ekfac", use_empirical_fisher=True, batch_size=3,
                                 compile=compile, progress=False)
        results.append(fi.pairwise_scores(model, task, factors, data, data, batch_size=3, compile=compile,
                                          progress=False))
    torch.testing.assert_close(results[1], results[0], rtol=1e-10, atol=1e-10)
    # covariance, lambda, query gradients, pairwise train pass: one graph each (both batches have one shape)
    assert counters["stats"]["unique_graphs"] == 4 and not counters["graph_break"]
