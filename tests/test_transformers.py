"""Hugging Face GPT-2 from a config, as it is: its Conv1D layers are tracked through torch.addmm."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.data import Subset, TensorDataset

import fninfluence as fi
from fninfluence.capture import ModelTap
from fninfluence.curvature import per_example_grads
from fninfluence.testing import layer_gradients, per_example_gradients
from kronfluence_reference import kronfluence_scores

import transformers  # a test dependency: pip install ".[test]"

VOCAB, SEQ = 40, 10


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(config).double().eval()


def conv1d_names(model):
    return [name for name, module in model.named_modules() if type(module).__name__ == "Conv1D"]


class CausalLM(fi.Task):
    """Next-token cross-entropy summed over tokens and sequences; the measurement is the same loss."""

    def __init__(self, modules):
        self.modules = modules

    def compute_train_loss(self, batch, model, sample=False):
        (ids,) = batch
        logits = model(input_ids=ids).logits[:, :-1].flatten(0, 1)
        targets = ids[:, 1:].flatten()
        if sample:
            with torch.no_grad():
                targets = torch.multinomial(logits.detach().softmax(-1), 1).flatten()
        return F.cross_entropy(logits, targets, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def tracked_modules(self):
        return self.modules


def sequences(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(0, VOCAB, (n, SEQ), generator=g))


def as_linear(model):
    """A copy of the model with every Conv1D rewritten as the equivalent nn.Linear (what Kronfluence needs)."""
    model = copy.deepcopy(model)
    for name in conv1d_names(model):
        parent_name, _, child = name.rpartition(".")
        conv = model.get_submodule(name)
        linear = nn.Linear(conv.weight.shape[0], conv.nf).double()
        with torch.no_grad():
            linear.weight.copy_(conv.weight.T)
            linear.bias.copy_(conv.bias)
        setattr(model.get_submodule(parent_name), child, linear)
    return model


def test_gpt2_per_example_gradients_match_a_per_example_loop():
    model = tiny_gpt2()
    task, data = CausalLM(conv1d_names(model)), sequences()
    engine = ModelTap(model, task)
    batch = (data.tensors[0],)
    _, stats = engine.layer_stats("train", engine.params, engine.buffers, batch, engine.probes_for("train", batch))
    oracle = layer_gradients(per_example_gradients(model, task, data), engine.specs)
    assert set(oracle) == set(conv1d_names(model)) and all(spec.op == "addmm" for spec in engine.specs.values())
    for layer, expected in oracle.items():
        torch.testing.assert_close(per_example_grads(stats[layer]), expected, rtol=1e-10, atol=1e-13)


def test_gpt2_tied_lm_head_is_reported_when_tracked():
    model = tiny_gpt2()
    with pytest.raises(fi.InfluenceError, match=r"lm_head: \['embedding'\]"):
        fi.fit_factors(model, CausalLM(None), sequences(), progress=False)


@pytest.mark.parity
@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
def test_gpt2_matches_kronfluence_on_the_linear_rewrite(strategy, tmp_path):
    model = tiny_gpt2()
    names = conv1d_names(model)
    data, queries = sequences(), Subset(sequences(seed=1), range(3))
    expected, expected_self = kronfluence_scores(as_linear(model), CausalLM(names), data, queries, strategy, None,
                                                 tmp_path, batch_size=3)
    task = CausalLM(names)
    factors = fi.fit_factors(model, task, data, strategy=strategy, use_empirical_fisher=True, batch_size=3,
                             progress=False)
    scores = fi.pairwise_scores(model, task, factors, queries, data, batch_size=3, progress=False)
    self_scores = fi.self_scores(model, task, factors, data, batch_size=3, progress=False)
    assert float((scores - expected).abs().max() / expected.abs().max()) <= 1e-7
    assert float((self_scores - expected_self).abs().max() / expected_self.abs().max()) <= 1e-7


@pytest.mark.slow
def test_gpt2_compiles_as_one_graph_per_step_with_eager_results():
    model = tiny_gpt2()
    task, data = CausalLM(conv1d_names(model)), sequences()
    results = []
    torch._dynamo.reset()
    counters.clear()
    for compile in (False, {"backend": "aot_eager"}):
        factors = fi.fit_factors(model, task, data, strategy="ekfac", use_empirical_fisher=True, batch_size=3,
                                 compile=compile, progress=False)
        results.append(fi.pairwise_scores(model, task, factors, data, data, batch_size=3, compile=compile,
                                          progress=False))
    torch.testing.assert_close(results[1], results[0], rtol=1e-10, atol=1e-10)
    assert counters["stats"]["unique_graphs"] == 4 and not counters["graph_break"]


class MaskedCausalLM(CausalLM):
    """Right-padded batches ``(ids, mask)``: padding is excluded from the loss, the attention and the statistics."""

    def compute_train_loss(self, batch, model, sample=False):
        ids, mask = batch
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        losses = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        return (losses * mask[:, 1:].flatten().to(losses.dtype)).sum()

    def get_attention_mask(self, batch):
        return batch[1]


@pytest.mark.parametrize("strategy", ["identity", "ekfac"])
def test_padded_queries_score_like_the_same_queries_alone(strategy):
    model = tiny_gpt2()
    names = conv1d_names(model)
    train = sequences(n=8)
    train_masked = TensorDataset(train.tensors[0], torch.ones_like(train.tensors[0]))
    task = MaskedCausalLM(names)
    factors = fi.fit_factors(model, task, train_masked, strategy=strategy, use_empirical_fisher=True, batch_size=4,
                             progress=False)
    lengths = [4, 7, SEQ]
    raw = sequences(n=3, seed=5).tensors[0]
    padded = torch.zeros(3, SEQ, dtype=torch.long)
    mask = torch.zeros(3, SEQ, dtype=torch.long)
    for i, n in enumerate(lengths):
        padded[i, :n], mask[i, :n] = raw[i, :n], 1
    together = fi.pairwise_scores(model, task, factors, TensorDataset(padded, mask), train_masked, batch_size=4,
                                  progress=False)
    for i, n in enumerate(lengths):
        alone = TensorDataset(raw[i:i + 1, :n], torch.ones(1, n, dtype=torch.long))
        expected = fi.pairwise_scores(model, task, factors, alone, train_masked, batch_size=4, progress=False)
        torch.testing.assert_close(together[i:i + 1], expected, rtol=1e-9, atol=1e-9)


def test_padding_does_not_change_the_fitted_statistics():
    """Factors fitted on padded sequences equal factors fitted on the same sequences without padding."""
    model = tiny_gpt2()
    names = conv1d_names(model)
    raw = sequences(n=4, seed=3).tensors[0]
    padded = torch.cat([raw, torch.zeros(4, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones_like(raw), torch.zeros(4, 3, dtype=torch.long)], dim=1)
    task = MaskedCausalLM(names)
    plain = fi.fit_factors(model, task, TensorDataset(raw, torch.ones_like(raw)), strategy="ekfac",
                           use_empirical_fisher=True, progress=False)
    padded_factors = fi.fit_factors(model, task, TensorDataset(padded, mask), strategy="ekfac",
                                    use_empirical_fisher=True, progress=False)
    for layer in plain.tensors:
        for name in ("activation_covariance", "gradient_covariance", "lambda", "num_tokens"):
            torch.testing.assert_close(padded_factors[layer][name], plain[layer][name], rtol=1e-9, atol=1e-12)


def test_language_model_example_runs():
    """docs/examples/language_model.py, smaller: it asserts that per-token scores add up to pairwise ones."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "docs" / "examples" / "language_model.py"
    spec = importlib.util.spec_from_file_location("language_model_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(train_size=120)
