"""nn.MultiheadAttention and nn.TransformerEncoder as they are: fused in_proj and out_proj are tapped."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import fninfluence as fi
from fninfluence.capture import ModelTap
from fninfluence.curvature import per_example_grads
from fninfluence.testing import layer_gradients, per_example_gradients

SEQ, D = 5, 8


class Encoder(nn.Module):
    def __init__(self, causal=False, norm_first=False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=D, nhead=2, dim_feedforward=12, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(D, 3)
        self.causal = causal

    def forward(self, x, padding=None):
        # a boolean causal mask, like the padding mask (mixing mask types makes PyTorch warn, a graph break)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1) if self.causal else None
        h = self.encoder(x, mask=mask, src_key_padding_mask=padding, is_causal=self.causal)
        return self.head(h[:, 0])


class EncoderTask(fi.Task):
    def compute_train_loss(self, batch, model, sample=False):
        x, padding, y = batch
        return F.cross_entropy(model(x, padding), y, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


def _data(n=6, padded=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, SEQ, D, generator=g, dtype=torch.float64)
    padding = torch.zeros(n, SEQ, dtype=torch.bool)
    if padded:
        padding[::2, -2:] = True
    return TensorDataset(x, padding, torch.randint(0, 3, (n,), generator=g))


@pytest.mark.parametrize("causal,padded,norm_first", [(False, False, False), (True, False, True), (False, True, False)])
def test_encoder_per_example_gradients_match_a_loop(causal, padded, norm_first):
    torch.manual_seed(0)
    model = Encoder(causal, norm_first).double().eval()
    task, data = EncoderTask(), _data(padded=padded)
    engine = ModelTap(model, task)
    batch = tuple(t for t in data.tensors)
    _, stats = engine.layer_stats("train", engine.params, engine.buffers, batch, engine.probes_for("train", batch))
    assert "encoder.layers.0.self_attn.in_proj" in engine.specs and "encoder.layers.1.self_attn.out_proj" in engine.specs
    oracle = layer_gradients(per_example_gradients(model, task, data), engine.specs)
    for layer, expected in oracle.items():
        torch.testing.assert_close(per_example_grads(stats[layer]), expected, rtol=1e-9, atol=1e-12)


def test_naming_the_attention_module_tracks_both_projections():
    model = Encoder().double().eval()

    class Only(EncoderTask):
        def tracked_modules(self):
            return ["encoder.layers.0.self_attn"]

    engine = ModelTap(model, Only())
    assert [t.layer for t in engine.targets] == ["encoder.layers.0.self_attn.in_proj",
                                                 "encoder.layers.0.self_attn.out_proj"]


def test_encoder_scores_equal_the_oracle_with_ekfac_running_end_to_end():
    torch.manual_seed(0)
    model = Encoder().double().eval()
    task, data = EncoderTask(), _data()
    identity = fi.fit_factors(model, task, data, strategy="identity", progress=False)
    specs = identity.layers
    grads = layer_gradients(per_example_gradients(model, task, data), specs)
    expected = sum(torch.einsum("qgoi,ngoi->qn", g, g) for g in grads.values())
    torch.testing.assert_close(fi.pairwise_scores(model, task, identity, data, data, progress=False), expected)
    for strategy in ("diagonal", "kfac", "ekfac"):
        factors = fi.fit_factors(model, task, data, strategy=strategy, progress=False)
        pairwise = fi.pairwise_scores(model, task, factors, data, data, progress=False)
        torch.testing.assert_close(fi.self_scores(model, task, factors, data, progress=False), pairwise.diagonal())


def test_cross_attention_in_proj_is_refused_with_a_fix():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
            self.head = nn.Linear(D, 3)

        def forward(self, x, padding=None):
            return self.head(self.attn(x, x.flip(1), x.flip(1), need_weights=False)[0][:, 0])

    model = Cross().double().eval()
    with pytest.raises(fi.InfluenceError, match="self-attention only.*out_proj"):
        fi.fit_factors(model, EncoderTask(), _data(), progress=False)

    class OutOnly(EncoderTask):
        def tracked_modules(self):
            return ["attn.out_proj", "head"]

    factors = fi.fit_factors(model, OutOnly(), _data(), strategy="identity", progress=False)
    assert set(factors.layers) == {"attn.out_proj", "head"}


def test_sequence_first_layers_are_refused_with_a_fix():
    layer = nn.TransformerEncoderLayer(d_model=D, nhead=2, dim_feedforward=12, dropout=0.0, batch_first=False)

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.head = layer, nn.Linear(D, 3)

        def forward(self, x, padding=None):
            return self.head(self.layer(x.transpose(0, 1))[0])

    with pytest.raises(fi.InfluenceError, match="batch dimension first.*batch_first=True.*per_example_vmap=True"):
        fi.fit_factors(SeqFirst().double().eval(), EncoderTask(), _data(), progress=False)


@pytest.mark.slow
def test_encoder_compiles_as_one_graph_per_step_with_eager_results():
    """Compiled, PyTorch would take its fused encoder fast path (invisible to the tap) unless it is turned off."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = Encoder(causal=True).double().eval()
    task, data = EncoderTask(), _data(padded=True)
    torch._dynamo.reset()
    counters.clear()
    results = []
    for compile in (False, {"backend": "aot_eager"}):
        factors = fi.fit_factors(model, task, data, strategy="ekfac", use_empirical_fisher=True, compile=compile,
                                 progress=False)
        results.append(fi.pairwise_scores(model, task, factors, data, data, compile=compile, progress=False))
    torch.testing.assert_close(results[1], results[0], rtol=1e-10, atol=1e-10)
    assert counters["stats"]["unique_graphs"] == 4 and not counters["graph_break"]
    assert torch.backends.mha.get_fastpath_enabled()  # the global switch is restored


class SequenceFirst(nn.Module):
    """A batch_first=False encoder layer: its linear layers see [sequence, batch, features]."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d_model=D, nhead=2, dim_feedforward=12, dropout=0.0,
                                                batch_first=False)
        self.head = nn.Linear(D, 3)

    def forward(self, x, padding=None):
        return self.head(self.layer(x.transpose(0, 1), src_key_padding_mask=padding)[0])


def test_per_example_vmap_mode_handles_sequence_first_layers_exactly():
    torch.manual_seed(0)
    model, task, data = SequenceFirst().double().eval(), EncoderTask(), _data(padded=True)
    factors = fi.fit_factors(model, task, data, strategy="identity", per_example_vmap=True, progress=False)
    grads = layer_gradients(per_example_gradients(model, task, data), factors.layers)
    expected = sum(torch.einsum("qgoi,ngoi->qn", g, g) for g in grads.values())
    scores = fi.pairwise_scores(model, task, factors, data, data, per_example_vmap=True, progress=False)
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac"])
def test_per_example_vmap_mode_equals_the_batched_tap(strategy):
    torch.manual_seed(0)
    model, task, data = Encoder().double().eval(), EncoderTask(), _data(padded=True)
    results = []
    for vmap in (False, True):
        factors = fi.fit_factors(model, task, data, strategy=strategy, use_empirical_fisher=True, batch_size=4,
                                 per_example_vmap=vmap, progress=False)
        results.append((fi.pairwise_scores(model, task, factors, data, data, per_example_vmap=vmap, progress=False),
                        fi.self_scores(model, task, factors, data, per_example_vmap=vmap, progress=False)))
    for batched, vmapped in zip(*results):
        torch.testing.assert_close(vmapped, batched, rtol=1e-9, atol=1e-12)


class KdimVdimAttention(nn.Module):
    """Cross-attention whose keys and values have their own widths: q/k/v_proj_weight instead of in_proj_weight."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, 2, kdim=5, vdim=6, batch_first=True)
        self.head = nn.Linear(D, 3)

    def forward(self, x, keys, values):
        return self.head(self.attn(x, keys, values, need_weights=False)[0][:, 0])


class KdimVdimTask(fi.Task):
    def compute_train_loss(self, batch, model, sample=False):
        x, keys, values, y = batch
        return F.cross_entropy(model(x, keys, values), y, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def tracked_modules(self):
        return ["attn", "head"]


def test_attention_with_kdim_vdim_scores_every_parameter_or_is_refused():
    """Naming an nn.MultiheadAttention(kdim, vdim) must not silently drop q/k/v_proj_weight or in_proj_bias:
    either the identity scores equal the exact dot products of the gradients of *all* its parameters (and the
    head's), or the call is refused with an InfluenceError."""
    torch.manual_seed(0)
    model, task = KdimVdimAttention().double().eval(), KdimVdimTask()
    g = torch.Generator().manual_seed(0)
    n = 5
    data = TensorDataset(torch.randn(n, SEQ, D, generator=g, dtype=torch.float64),
                         torch.randn(n, 4, 5, generator=g, dtype=torch.float64),
                         torch.randn(n, 4, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
    names = [name for name, _ in model.named_parameters()]
    assert {"attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.in_proj_bias"} <= set(names)
    try:
        factors = fi.fit_factors(model, task, data, strategy="identity", progress=False)
    except fi.InfluenceError:
        return  # refused: acceptable, as long as it is refused rather than silently partial
    grads = per_example_gradients(model, task, data)
    flat = torch.cat([grads[name].flatten(1) for name in names], dim=1)
    scores = fi.pairwise_scores(model, task, factors, data, data, progress=False)
    torch.testing.assert_close(scores, flat @ flat.T, rtol=1e-9, atol=1e-12)
    for strategy in ("kfac", "ekfac"):
        fitted = fi.fit_factors(model, task, data, strategy=strategy, use_empirical_fisher=True, progress=False)
        pairwise = fi.pairwise_scores(model, task, fitted, data, data, progress=False)
        torch.testing.assert_close(fi.self_scores(model, task, fitted, data, progress=False), pairwise.diagonal())
