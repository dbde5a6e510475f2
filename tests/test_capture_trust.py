"""The tap never answers silently wrong: every use of a tracked weight is followed or refused.

Oracles: identity scores are exact gradient dot products ``<G_q, G_n>`` of per-example autograd gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import fninfluence as fi
from fninfluence import InfluenceError

QUIET = dict(progress=False)


class CrossEntropy(fi.Task):
    def __init__(self, modules=None):
        self.modules = modules

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def tracked_modules(self):
        return self.modules


def _vectors(n=8, d=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g))


def _tokens(n=6, length=4, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(0, vocab, (n, length), generator=g), torch.randint(0, vocab, (n, length), generator=g))


def exact_identity_scores(model, task, data, parameter_names):
    """``<G_i, G_j>`` over the named parameters, from one autograd call per example."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(data)):
        batch = tuple(t[None] for t in data[i])
        grads = torch.autograd.grad(task.compute_train_loss(batch, model), [params[n] for n in parameter_names])
        rows.append(torch.cat([g.flatten() for g in grads]))
    grads = torch.stack(rows)
    return grads @ grads.T


def _identity_scores(model, task, data):
    factors = fi.fit_factors(model, task, data, strategy="identity", **QUIET)
    return fi.pairwise_scores(model, task, factors, data, data, **QUIET)


# -- item A: aliases of a tracked weight --------------------------------------------------------------


class BesideTheModule(nn.Module):
    """The tracked weight is used a second time through a property view, next to its module call."""

    def __init__(self, view=lambda w: w.T):
        super().__init__()
        self.view = view
        self.fc, self.head = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x) + torch.mm(x, self.view(self.fc.weight))))


class TiedThroughT(nn.Module):
    """An LM head tied to the embedding as ``h @ wte.weight.T``."""

    def __init__(self):
        super().__init__()
        self.wte, self.mix = nn.Embedding(11, 6), nn.Linear(6, 6)

    def forward(self, ids):
        return torch.tanh(self.mix(self.wte(ids))) @ self.wte.weight.T


@pytest.mark.parametrize("view", [lambda w: w.T, lambda w: w.mT, lambda w: w.H, lambda w: w.mH],
                         ids=[".T", ".mT", ".H", ".mH"])
def test_a_weight_used_through_a_property_view_beside_its_module_is_refused(view):
    torch.manual_seed(0)
    with pytest.raises(InfluenceError, match=r"fc: \['mm of its \.m?[TH]'\]"):
        _identity_scores(BesideTheModule(view).double(), CrossEntropy(["fc"]), _vectors())


def test_an_lm_head_tied_through_dot_t_is_refused_while_the_embedding_is_tracked():
    torch.manual_seed(0)
    with pytest.raises(InfluenceError, match=r"wte: \['matmul of its \.T'\]"):
        _identity_scores(TiedThroughT().double(), CrossEntropy(["wte"]), _tokens())


def test_a_view_of_a_view_is_followed():
    torch.manual_seed(0)
    with pytest.raises(InfluenceError, match=r"fc: \['mm of its \.T\.mT\.T'\]"):
        _identity_scores(BesideTheModule(lambda w: w.T.mT.T).double(), CrossEntropy(["fc"]), _vectors())


def test_the_tied_head_is_exact_when_the_weight_is_named_as_a_parameter():
    """The refusal's fix works: naming ``wte.weight`` analyses every use of it, exactly."""
    torch.manual_seed(0)
    model, data, task = TiedThroughT().double(), _tokens(), CrossEntropy(["wte.weight"])
    scores = _identity_scores(model, task, data)
    torch.testing.assert_close(scores, exact_identity_scores(model, task, data, ["wte.weight"]), rtol=1e-10, atol=1e-10)


class ReadsMetadata(nn.Module):
    """A legitimate model that reads its weights' attributes (shapes, dtypes, views of them) around the calls."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        assert self.fc.weight.T.shape == (5, 4) and self.fc.weight.mT.dtype == x.dtype
        assert self.head.weight.data.device == x.device and self.head.bias.data.numel() == 3
        return self.head(torch.tanh(self.fc(x.to(self.fc.weight.dtype))))


def test_a_model_that_only_reads_weight_attributes_is_accepted_and_exact():
    torch.manual_seed(0)
    model, data, task = ReadsMetadata().double(), _vectors(), CrossEntropy()
    names = ["fc.weight", "fc.bias", "head.weight", "head.bias"]
    torch.testing.assert_close(_identity_scores(model, task, data), exact_identity_scores(model, task, data, names),
                               rtol=1e-10, atol=1e-10)


class Escapes(nn.Module):
    """Uses the tracked weight where no torch function mode can see it: only the exactness check notices."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        with torch._C.DisableTorchFunction():
            hidden = torch.mm(x, self.fc.weight.t())
        return self.head(torch.tanh(self.fc(x) + hidden))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_use_the_tap_cannot_see_is_caught_by_the_exactness_check(dtype):
    torch.manual_seed(0)
    data = TensorDataset(*(t.to(dtype) if t.is_floating_point() else t for t in _vectors().tensors))
    with pytest.raises(InfluenceError, match="'fc' differs from autograd's.*fc.weight"):
        _identity_scores(Escapes().to(dtype), CrossEntropy(["fc"]), data)


class SwitchesToAnEscape(Escapes):
    """Exact until ``escape`` is set: then it uses the weight where the tap cannot see it, as Escapes does."""

    escape = False

    def forward(self, x):
        return super().forward(x) if self.escape else self.head(torch.tanh(self.fc(x)))


def test_the_exactness_check_runs_once_per_model_task_and_parameters_and_again_when_they_change():
    """The check is repeated only when its answer could differ: another task object, or parameters changed in
    place (a training step) or replaced. (Code that switches paths on an attribute is checked on first use only.)"""
    from fninfluence.capture import engine

    calls = []
    original = engine.ModelTap._check_exact
    engine.ModelTap._check_exact = lambda self, *args: calls.append(args[0]) or original(self, *args)
    try:
        torch.manual_seed(0)
        model, data, task = SwitchesToAnEscape().double(), _vectors(), CrossEntropy(["fc"])
        _identity_scores(model, task, data)
        first = len(calls)
        _identity_scores(model, task, data)
        assert first > 0 and len(calls) == first  # the same model, task and parameters: not checked again
        _identity_scores(model, CrossEntropy(["fc"]), data)
        assert len(calls) == 2 * first  # another task object
        model.escape = True
        with torch.no_grad():
            model.fc.weight.mul_(1.0)  # a parameter changed in place: checked again, and the escape is caught
        with pytest.raises(InfluenceError, match="'fc' differs from autograd's"):
            _identity_scores(model, task, data)
    finally:
        engine.ModelTap._check_exact = original


def test_the_exactness_check_leaves_the_random_state_alone():
    """True-Fisher label sampling draws from the global generator: the check must not draw more than the pass."""
    from fninfluence.capture import ModelTap

    torch.manual_seed(0)
    model, data = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double(), _vectors()
    task = fi.classification_task()
    torch.manual_seed(3)
    with torch.no_grad():
        task.compute_train_loss(data.tensors, model, sample=True)  # what the discovery pass itself draws
    expected = torch.random.get_rng_state()
    torch.manual_seed(3)
    ModelTap(model, task).probes_for("train_sampled", data.tensors)
    assert torch.equal(torch.random.get_rng_state(), expected)


# -- item B: random ops in training mode ---------------------------------------------------------------


class Noisy(nn.Module):
    def __init__(self, noise):
        super().__init__()
        self.noise = noise
        self.fc, self.head = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.noise(torch.tanh(self.fc(x))))


NOISES = {
    "Dropout": nn.Dropout(0.3),
    "Dropout1d": nn.Dropout1d(0.3),
    "AlphaDropout": nn.AlphaDropout(0.3),
    "RReLU": nn.RReLU(),
    "randn_like": lambda h: h + 0.1 * torch.randn_like(h),
    "bernoulli": lambda h: h * torch.bernoulli(torch.full_like(h, 0.5)),
    "functional dropout": lambda h: F.dropout(h, 0.2),
}


def _noisy(name):
    torch.manual_seed(0)
    noise = NOISES[name]
    return Noisy(noise if isinstance(noise, nn.Module) else _Lambda(noise)).double().train()


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("empirical", [True, False], ids=["empirical", "true-fisher"])
@pytest.mark.parametrize("name", list(NOISES))
def test_a_random_op_in_the_model_is_refused_naming_model_eval(name, empirical):
    with pytest.raises(InfluenceError, match=r"model draws random numbers.*model\.eval\(\)"):
        fi.fit_factors(_noisy(name), fi.classification_task(), _vectors(), strategy="identity",
                       use_empirical_fisher=empirical, **QUIET)


def test_dropout_in_eval_mode_is_accepted_and_exact():
    model, data, task = _noisy("Dropout").eval(), _vectors(), CrossEntropy()
    names = [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(_identity_scores(model, task, data), exact_identity_scores(model, task, data, names),
                               rtol=1e-10, atol=1e-10)


def test_attention_dropout_in_training_mode_is_refused():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.head = nn.MultiheadAttention(4, 2, dropout=0.1, batch_first=True), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0].mean(1))

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(6, 3, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    for tracked in (["head"], ["attn", "head"]):  # run natively (untracked) and through the tap's rewrite
        with pytest.raises(InfluenceError, match="multi_head_attention_forward \\(training=True, dropout_p=0.1\\)"):
            fi.fit_factors(Attention().double().train(), CrossEntropy(tracked), data, strategy="identity", **QUIET)


def test_a_random_op_in_the_task_is_refused_but_true_fisher_label_sampling_is_not():
    class NoisyLoss(CrossEntropy):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            return super().compute_train_loss((x + 0.1 * torch.randn_like(x), y), model)

    model = _noisy("Dropout").eval()
    with pytest.raises(InfluenceError, match=r"task draws random numbers.*randn_like"):
        fi.fit_factors(model, NoisyLoss(), _vectors(), strategy="identity", use_empirical_fisher=True, **QUIET)
    factors = fi.fit_factors(model, fi.classification_task(), _vectors(), strategy="kfac", **QUIET)  # multinomial
    assert torch.isfinite(factors["fc"]["gradient_covariance"]).all() and factors["fc"]["gradient_covariance"].any()


# -- items C and D: activation checkpointing, requires_grad_ -------------------------------------------

STRATEGIES = ["identity", "diagonal", "kfac", "ekfac"]


class Checkpointed(nn.Module):
    """The same network run plainly or under each form of torch.utils.checkpoint."""

    def __init__(self, how="none"):
        super().__init__()
        self.how = how
        self.block, self.mid, self.head = nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3)

    def _block(self, x):
        return torch.tanh(self.block(x))

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint, checkpoint_sequential

        layers = nn.Sequential(self.block, nn.Tanh(), self.mid, nn.Tanh())
        if self.how == "none":
            return self.head(layers(x))
        if self.how == "sequential":
            return self.head(checkpoint_sequential(layers, 2, x, use_reentrant=False))
        if self.how == "decorator":
            h = checkpoint(use_reentrant=False)(self._block)(x)
        else:
            h = checkpoint(self._block, x, use_reentrant=self.how == "reentrant")
        return self.head(checkpoint(lambda z: torch.tanh(self.mid(z)), h, use_reentrant=self.how == "reentrant"))


def _all_scores(model, task, data, strategy, use_empirical_fisher=False, **options):
    factors = fi.fit_factors(model, task, data, strategy=strategy, batch_size=4, use_empirical_fisher=use_empirical_fisher,
                             **QUIET, **options)
    return (fi.pairwise_scores(model, task, factors, data, data, batch_size=4, **QUIET, **options),
            fi.self_scores(model, task, factors, data, batch_size=4, **QUIET, **options))


def _checkpointed(how):
    torch.manual_seed(0)
    return Checkpointed(how).double().eval()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("how", ["reentrant", "non-reentrant", "decorator", "sequential"])
def test_activation_checkpointing_gives_the_scores_of_the_unchecked_model(how, strategy):
    data = _vectors(n=8, d=6)
    task = fi.classification_task()  # true Fisher: the sampled labels must match too
    torch.manual_seed(5)
    expected = _all_scores(_checkpointed("none"), task, data, strategy)
    torch.manual_seed(5)
    for got, want in zip(_all_scores(_checkpointed(how), task, data, strategy), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_activation_checkpointing_in_the_task_and_with_compile():
    from torch.utils.checkpoint import checkpoint

    class CheckpointingTask(CrossEntropy):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            return F.cross_entropy(checkpoint(model, x, use_reentrant=False), y, reduction="sum")

    data, model = _vectors(n=8, d=6), _checkpointed("none")
    expected = _all_scores(model, CrossEntropy(), data, "ekfac", use_empirical_fisher=True)
    with pytest.warns(UserWarning, match="compile is ignored"):
        got = _all_scores(model, CheckpointingTask(), data, "ekfac", use_empirical_fisher=True, compile=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_checkpointing_leaves_torch_utils_checkpoint_as_it_was():
    import torch.utils.checkpoint as checkpoint_module

    before = checkpoint_module._checkpoint_impl
    _all_scores(_checkpointed("reentrant"), CrossEntropy(), _vectors(n=8, d=6), "identity")
    assert checkpoint_module._checkpoint_impl is before
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)  # and ordinary checkpointing still recomputes
    model = _checkpointed("non-reentrant")
    model(x).sum().backward()
    assert x.grad is not None


class RequiresGrad(nn.Module):
    """Calls requires_grad_ in its forward, as Hugging Face's enable_input_require_grads hook does."""

    def __init__(self, call=True):
        super().__init__()
        self.call = call
        self.fc, self.norm, self.head = nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x)
        if self.call:
            h.requires_grad_(True)
        return self.head(torch.tanh(self.norm(h)))


@pytest.mark.parametrize("strategy", ["identity", "ekfac"])
def test_requires_grad_in_the_forward_is_harmless(strategy):
    data, task = _vectors(), CrossEntropy(["fc", "norm", "head"])  # "norm" goes through per-example vmap gradients
    models = []
    for call in (True, False):
        torch.manual_seed(0)
        models.append(RequiresGrad(call).double().eval())
    got, expected = (_all_scores(m, task, data, strategy, use_empirical_fisher=True) for m in models)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    if strategy == "identity":
        names = [n for n, _ in models[0].named_parameters()]
        torch.testing.assert_close(got[0], exact_identity_scores(models[0], task, data, names), rtol=1e-10, atol=1e-10)


VOCAB = 13


def _tiny_gpt2():
    import transformers
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=VOCAB, n_positions=8, bos_token_id=0,
                                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     attn_implementation="eager")
    return transformers.GPT2LMHeadModel(config).double()


class NextToken(fi.Task):
    def compute_train_loss(self, batch, model, sample=False):
        ids = batch[0]
        logits = model(input_ids=ids).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def tracked_modules(self):
        return ["transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_attn", "transformer.h.1.ln_2"]


def test_hugging_face_gradient_checkpointing():
    """In eval mode nothing is checkpointed but HF's input-grad hook calls requires_grad_ (item 13); in train mode
    (no dropout) every block runs under torch.utils.checkpoint. Both give the plain eval model's scores."""
    data = TensorDataset(torch.randint(0, VOCAB, (6, 5), generator=torch.Generator().manual_seed(0)))
    expected = _all_scores(_tiny_gpt2().eval(), NextToken(), data, "ekfac", use_empirical_fisher=True)
    for mode in ("eval", "train"):
        model = _tiny_gpt2()
        model.gradient_checkpointing_enable()
        getattr(model, mode)()
        got = _all_scores(model, NextToken(), data, "ekfac", use_empirical_fisher=True)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


# -- item E: attention with kdim / vdim other than embed_dim ------------------------------------------


class CrossAttention(nn.Module):
    """Queries of width 4 attend to keys of width 3 and values of width 5: separate q/k/v projection weights."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, kdim=3, vdim=5, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        q, k, v = x[..., :4], x[..., 4:7], x[..., 7:]
        return self.head(torch.tanh(self.attn(q, k, v, need_weights=False)[0]).mean(1))


def test_attention_with_separate_projection_weights_tracks_every_parameter():
    from fninfluence.capture import ModelTap

    torch.manual_seed(0)
    model = CrossAttention().double().eval()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(6, 3, 12, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
    task = CrossEntropy(["attn"])
    engine = ModelTap(model, task)
    engine.probes_for("train", data.tensors)
    assert set(engine.specs) == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.in_proj_bias", "attn.out_proj"}
    names = ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.in_proj_bias",
             "attn.out_proj.weight", "attn.out_proj.bias"]
    assert {n for spec in engine.specs.values() for n in (spec.weight, spec.bias, *spec.parameters) if n} == set(names)
    torch.testing.assert_close(_identity_scores(model, task, data), exact_identity_scores(model, task, data, names),
                               rtol=1e-10, atol=1e-10)
    kfac = fi.fit_factors(model, task, data, strategy="kfac", use_empirical_fisher=True, **QUIET)
    assert kfac["attn.k_proj"]["activation_covariance"].shape[-1] == 3  # kdim, no bias column of its own
