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


# -- low-rank query gradients (query_rank, full_svd) ------------------------------------------------

TOKENS = 3


class TokenMLP(nn.Module):
    """Two linear layers applied to each of ``TOKENS`` positions: a query gradient has rank <= TOKENS."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class TokenClassification(fi.Task):
    """Batches ``(x [B, T, 6], y [B, T])``: cross-entropy summed over tokens; the measurement is the same loss."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        logits = model(x).flatten(0, 1)
        if sample:
            with torch.no_grad():
                y = torch.multinomial(logits.detach().softmax(-1), 1).view(x.shape[:2])
        return F.cross_entropy(logits, y.flatten(), reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


def _token_problem(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TokenMLP().double().eval()
    data = TensorDataset(torch.randn(n, TOKENS, 6, generator=g, dtype=torch.float64),
                         torch.randint(0, 4, (n, TOKENS), generator=g))
    return model, TokenClassification(), data


def _oracle_layer_grads(model, task, data, specs, objective="train"):
    from fninfluence.testing import layer_gradients, per_example_gradients
    return layer_gradients(per_example_gradients(model, task, data, objective=objective), specs)


def _truncate(matrix, rank):
    """The best rank-``rank`` approximation (Eckart-Young) of each ``[..., out, in]`` matrix."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]


def test_low_rank_queries_at_or_above_the_true_rank_are_exact():
    """Under the identity curvature a query's gradient on a layer has rank <= TOKENS: a rank-TOKENS
    factorisation, randomised or full, loses nothing, so the scores equal exact gradient dot products."""
    model, task, data = _token_problem()
    queries = Subset(data, [0, 1, 2])
    factors = fi.fit_factors(model, task, data, strategy="identity", **QUIET)
    grads = _oracle_layer_grads(model, task, data, factors.layers)
    expected = sum(torch.einsum("qgoi,ngoi->qn", g[:3], g) for g in grads.values())
    for full_svd in (False, True):
        torch.manual_seed(0)
        scores = fi.pairwise_scores(model, task, factors, queries, data, query_rank=TOKENS, full_svd=full_svd,
                                    query_batch_size=2, **QUIET)
        assert_close(scores, expected, rtol=1e-9)


def _ekfac_queries_and_oracle():
    """The token problem with EKFAC factors: three queries' dense preconditioned gradients and every training
    example's oracle layer gradients."""
    model, task, data = _token_problem()
    queries = Subset(data, [0, 1, 2])
    factors = fi.fit_factors(model, task, data, strategy="ekfac", use_empirical_fisher=True, **QUIET)
    preconditioned = fi.query_gradients(model, task, factors, queries, **QUIET)
    return model, task, data, queries, factors, preconditioned, _oracle_layer_grads(model, task, data, factors.layers)


def test_full_svd_queries_below_the_true_rank_equal_the_best_rank_k_truncation():
    """EKFAC-preconditioned query gradients have full rank; ``full_svd=True`` with ``query_rank=k`` scores
    with their best rank-k approximations, computed here from the dense preconditioned gradients."""
    model, task, data, queries, factors, preconditioned, train = _ekfac_queries_and_oracle()
    rank = 2
    for layer, p in preconditioned.items():
        assert torch.linalg.matrix_rank(p[0, 0]) > rank  # the truncation does lose something here
    expected = {layer: torch.einsum("qgoi,ngoi->qn", _truncate(p, rank), train[layer])
                for layer, p in preconditioned.items()}
    scores = fi.pairwise_scores(model, task, factors, queries, data, query_rank=rank, full_svd=True,
                                per_module=True, **QUIET)
    for layer in expected:
        assert_close(scores[layer], expected[layer], rtol=1e-9)
    dense = fi.pairwise_scores(model, task, factors, queries, data, per_module=True, **QUIET)
    assert any(float((dense[k] - expected[k]).abs().max()) > 1e-6 * float(dense[k].abs().max()) for k in dense)


def test_randomised_low_rank_queries_stay_within_twice_the_truncation_error():
    """``full_svd=False`` (the default) projects each query onto a rank-k subspace found at random; its score
    error is then at most ``|P - P_k|_F |G_n|_F`` per layer if its approximation is within twice the optimal
    one, which it is for these spectra (two power iterations; :func:`test_randomised_factorisation_...`)."""
    model, task, data, queries, factors, preconditioned, train = _ekfac_queries_and_oracle()
    rank = 2
    torch.manual_seed(0)
    scores = fi.pairwise_scores(model, task, factors, queries, data, query_rank=rank, per_module=True, **QUIET)
    for layer, p in preconditioned.items():
        exact = torch.einsum("qgoi,ngoi->qn", p, train[layer])
        optimal = (p - _truncate(p, rank)).flatten(1).norm(dim=1)  # [Q]
        bound = 2 * optimal[:, None] * train[layer].flatten(1).norm(dim=1)[None, :]
        assert bool(((scores[layer] - exact).abs() <= bound).all()), layer
        assert float((scores[layer] - exact).abs().max()) > 0  # it is an approximation: rank 2 < the true rank


def test_randomised_factorisation_is_a_projection_no_better_than_the_truncation():
    """The pure ``low_rank``: with ``full_svd=False`` ``L R = Q Q^T P`` for an orthonormal rank-k ``Q``, so
    ``|P - LR|^2 = |P|^2 - |LR|^2`` (Pythagoras), ``|P - LR| >= |P - P_k|`` (Eckart-Young) and, on a decaying
    spectrum, ``|P - LR| <= 2 |P - P_k|``; ``full_svd=True`` gives ``P_k`` itself; a rank at or above the
    matrix rank reproduces it."""
    from fninfluence.core.scores import low_rank

    g = torch.Generator().manual_seed(0)
    queries, groups, out, inp, rank = 3, 2, 9, 7, 3
    u = torch.linalg.qr(torch.randn(queries, groups, out, inp, generator=g, dtype=W)).Q
    v = torch.linalg.qr(torch.randn(queries, groups, inp, inp, generator=g, dtype=W)).Q
    spectrum = 2.0 ** -torch.arange(inp, dtype=W)
    p = (u * spectrum) @ v.transpose(-1, -2)
    optimal = (p - _truncate(p, rank)).flatten(2).norm(dim=-1)
    torch.manual_seed(0)
    left, right = low_rank(p, rank, False, W, W)
    assert left.shape == (queries, groups, out, rank) and right.shape == (queries, groups, rank, inp)
    approx = left @ right
    error = (p - approx).flatten(2).norm(dim=-1)
    assert_close(error.square(), p.flatten(2).square().sum(-1) - approx.flatten(2).square().sum(-1), rtol=1e-10)
    assert bool((error >= optimal * (1 - 1e-10)).all()) and bool((error <= 2 * optimal).all())
    left, right = low_rank(p, rank, True, W, W)
    assert_close(left @ right, _truncate(p, rank), rtol=1e-12)
    low = (u[..., :rank] * spectrum[:rank]) @ v[..., :rank].transpose(-1, -2)  # rank exactly `rank`
    for full_svd in (False, True):
        left, right = low_rank(low, rank + 1, full_svd, W, W)
        assert_close(left @ right, low, rtol=1e-10)
    assert torch.equal(low_rank(p, inp, False, W, W), p)  # a rank that covers the smaller side: left dense


# -- per-token scores of a layer called twice -------------------------------------------------------

class TwiceBlock(nn.Module):
    """``head(tanh(block(tanh(block(x)))))`` on every token: ``block`` is called twice at each position."""

    def __init__(self):
        super().__init__()
        self.block, self.head = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.block(torch.tanh(self.block(x)))))


def _per_token_gradients(model, data):
    """``{layer: [N, T, out, in + 1]}``: the gradient of example n's loss with respect to a perturbation of the
    layer's weight (and bias, the last column) at position t only, shared by both calls at that position. This
    is what a per-token score contracts with the preconditioned query, built from autograd alone."""
    rows = {"block": [], "head": []}
    for x, y in data:
        deltas = {layer: torch.zeros(x.shape[0], m.out_features, m.in_features + 1, dtype=W, requires_grad=True)
                  for layer, m in (("block", model.block), ("head", model.head))}

        def apply(layer, h):
            m = getattr(model, layer)
            w = torch.cat([m.weight, m.bias[:, None]], dim=1)[None] + deltas[layer]  # [T, out, in + 1]
            return torch.einsum("ti,toi->to", torch.cat([h, torch.ones(h.shape[0], 1, dtype=W)], dim=1), w)

        logits = apply("head", torch.tanh(apply("block", torch.tanh(apply("block", x)))))
        grads = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), list(deltas.values()))
        for layer, grad in zip(deltas, grads):
            rows[layer].append(grad)
    return {layer: torch.stack(r) for layer, r in rows.items()}


def test_per_token_scores_of_a_layer_called_twice_equal_the_per_position_oracle():
    """Each token's score is ``<P_q, dL_n/dW_t>`` with both calls at position t counted (per layer and in
    total), and the per-token scores sum over tokens to the pairwise scores."""
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model, task = TwiceBlock().double().eval(), TokenClassification()
    data = TensorDataset(torch.randn(8, 4, 5, generator=g, dtype=W), torch.randint(0, 3, (8, 4), generator=g))
    queries = Subset(data, [0, 5])
    factors = fi.fit_factors(model, task, data, strategy="ekfac", use_empirical_fisher=True, **QUIET)
    assert factors.layers["block"].calls == 2
    preconditioned = fi.query_gradients(model, task, factors, queries, **QUIET)
    per_position = _per_token_gradients(model, data)
    expected = {layer: torch.einsum("qoi,ntoi->qnt", preconditioned[layer][:, 0], per_position[layer])
                for layer in per_position}
    per_token = fi.pairwise_scores(model, task, factors, queries, data, per_token=True, per_module=True,
                                   batch_size=3, **QUIET)
    for layer in expected:
        assert_close(per_token[layer], expected[layer], rtol=1e-9)
    total = fi.pairwise_scores(model, task, factors, queries, data, per_token=True, batch_size=3, **QUIET)
    assert_close(total, expected["block"] + expected["head"], rtol=1e-9)
    pairwise = fi.pairwise_scores(model, task, factors, queries, data, batch_size=5, **QUIET)
    assert_close(total.sum(-1), pairwise, rtol=1e-9)


# -- true-Fisher label sampling -----------------------------------------------------------------------

class AlwaysClassZero(fi.Task):
    """Batches ``(x, y)`` with every ``y = 0``; with ``sample=True`` labels are drawn from the model's softmax."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        logits = model(x)
        if sample:
            with torch.no_grad():
                y = torch.multinomial(logits.detach().softmax(-1), 1).squeeze(-1)
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


def test_true_fisher_gradient_covariance_matches_its_closed_form_expectation():
    """For logits ``W x + b`` and labels drawn from the model, the output gradient is ``p - e_y`` and
    ``E_y[(p - e_y)(p - e_y)^T] = diag(p) - p p^T``: the true-Fisher S must match
    ``mean_n diag(p_n) - p_n p_n^T`` within 5 standard errors, entry by entry. The standard errors are exact:
    ``sqrt(sum_n Var_y[g_i g_j]) / N``, the variances summed over the classes. The empirical Fisher (every
    label 0) is far from it, and A does not depend on the labels."""
    n, d, classes = 3000, 2, 3
    g = torch.Generator().manual_seed(0)
    x = 1.5 * torch.randn(n, d, generator=g, dtype=W)
    data = TensorDataset(x, torch.zeros(n, dtype=torch.long))
    torch.manual_seed(0)
    model = nn.Linear(d, classes).double().eval()
    with torch.no_grad():
        p = model(x).softmax(-1)  # [N, C]
    outcomes = p[:, None, :] - torch.eye(classes, dtype=W)[None]  # [N, y, C]: p_n - e_y
    products = outcomes[..., :, None] * outcomes[..., None, :]  # [N, y, C, C]
    weights = p[:, :, None, None]
    mean = (weights * products).sum(1)  # [N, C, C]
    torch.testing.assert_close(mean, torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
    variance = (weights * products.square()).sum(1) - mean.square()
    expected, stderr = mean.mean(0), variance.sum(0).sqrt() / n

    torch.manual_seed(1)
    true_fisher = fi.fit_factors(model, AlwaysClassZero(), data, strategy="kfac", use_empirical_fisher=False,
                                 batch_size=500, **QUIET)
    s = true_fisher[""]["gradient_covariance"][0]
    assert bool(((s - expected).abs() <= 5 * stderr).all()), ((s - expected) / stderr)
    empirical = fi.fit_factors(model, AlwaysClassZero(), data, strategy="kfac", use_empirical_fisher=True,
                               batch_size=500, **QUIET)
    s_empirical = empirical[""]["gradient_covariance"][0]
    assert float(((s_empirical - expected).abs() / stderr).max()) > 50
    augmented = torch.cat([x, torch.ones(n, 1, dtype=W)], dim=1)
    for factors in (true_fisher, empirical):
        assert_close(factors[""]["activation_covariance"][0], augmented.T @ augmented / n, rtol=1e-12)


def test_true_fisher_on_a_hugging_face_gpt2_through_the_compat_analyzer(tmp_path):
    """A tiny random GPT-2 through the compat Analyzer with the default true Fisher: the task is asked for sampled
    labels, which have the targets' shape and lie in the vocabulary, the factors are finite and differ from the
    empirical Fisher's, and the scores are finite with positive self-influence."""
    transformers = __import__("pytest").importorskip("transformers")
    vocab, seq = 30, 6
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=vocab, n_positions=8,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).double().eval()
    modules = [name for name, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    sampled = []

    class SampledCausalLM(compat.Task):
        def compute_train_loss(self, batch, model, sample=False):
            (ids,) = batch
            logits = model(input_ids=ids).logits[:, :-1].flatten(0, 1)
            targets = ids[:, 1:].flatten()
            if sample:
                with torch.no_grad():
                    targets = torch.multinomial(logits.detach().softmax(-1), 1).flatten()
                sampled.append((tuple(targets.shape), ids.shape[0] * (seq - 1), targets.tolist()))
            return F.cross_entropy(logits, targets, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return modules

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, vocab, (8, seq), generator=g))
    task = SampledCausalLM()
    analyzer = compat.Analyzer("gpt2", compat.prepare_model(model, task), task, cpu=True, disable_tqdm=True,
                               output_dir=str(tmp_path))
    torch.manual_seed(0)
    analyzer.fit_all_factors("true", data, per_device_batch_size=4,
                             factor_args=compat.FactorArguments(strategy="ekfac", **WIDE_FACTORS))
    assert sampled, "the true Fisher never asked the task for sampled labels"
    drawn = [label for _, _, labels in sampled for label in labels]
    assert all(shape == (count,) for shape, count, _ in sampled)
    assert min(drawn) >= 0 and max(drawn) < vocab and len(set(drawn)) > 1
    analyzer.fit_all_factors("empirical", data, per_device_batch_size=4,
                             factor_args=compat.FactorArguments(strategy="ekfac", use_empirical_fisher=True,
                                                                **WIDE_FACTORS))
    true, empirical = (analyzer.load_covariance_matrices(name) for name in ("true", "empirical"))
    lambdas = analyzer.load_lambda_matrices("true")
    for layer in modules:
        for factors in (true["gradient_covariance"], true["activation_covariance"], lambdas["lambda_matrix"]):
            assert bool(torch.isfinite(factors[layer]).all())
        torch.testing.assert_close(true["activation_covariance"][layer], empirical["activation_covariance"][layer])
    assert any(not torch.allclose(true["gradient_covariance"][m], empirical["gradient_covariance"][m])
               for m in modules)
    scores = analyzer.compute_pairwise_scores("s", "true", data, data, per_device_query_batch_size=4,
                                              per_device_train_batch_size=4,
                                              score_args=compat.ScoreArguments(**WIDE_SCORES))["all_modules"]
    assert bool(torch.isfinite(scores).all()) and float(scores.diagonal().min()) > 0


# -- scoring options: identities against plain pairwise scores -----------------------------------------

def _three_layers():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()


def _options_problem():
    """A three-layer MLP, EKFAC factors, and a measurement (minus the margin) that is not the training loss."""
    from models import ClassificationTask, classification_data

    model, task, data = _three_layers(), ClassificationTask(), classification_data(n=13)
    factors = fi.fit_factors(model, task, data, strategy="ekfac", use_empirical_fisher=True, batch_size=5, **QUIET)
    return model, task, data, Subset(data, [0, 4, 7, 9, 12]), factors


def test_aggregated_gradients_give_the_sums_of_pairwise_scores():
    """``aggregate_train`` sums each query's scores over the training examples (``[Q, 1]``), ``aggregate_queries``
    sums each example's over the queries (``[1, N]``): scores are linear in both gradients. Per layer too, in memory
    and through a store with data and module partitions."""
    model, task, data, queries, factors = _options_problem()
    score = lambda **options: fi.pairwise_scores(model, task, factors, queries, data, batch_size=4,
                                                 query_batch_size=2, per_module=True, **options, **QUIET)
    pairwise = score()
    expected = {"aggregate_train": {k: v.sum(1, keepdim=True) for k, v in pairwise.items()},
                "aggregate_queries": {k: v.sum(0, keepdim=True) for k, v in pairwise.items()}}
    both = {k: v.sum().reshape(1, 1) for k, v in pairwise.items()}
    for option, wanted in expected.items():
        for layer, value in score(**{option: True}).items():
            assert_close(value, wanted[layer])
    for layer, value in score(aggregate_train=True, aggregate_queries=True).items():
        assert_close(value, both[layer])
    assert_close(score(aggregate_train=True, queries_per_pass=2)["4"], expected["aggregate_train"]["4"])


def test_aggregated_gradients_through_a_partitioned_store(tmp_path):
    model, task, data, queries, factors = _options_problem()
    pairwise = fi.pairwise_scores(model, task, factors, queries, data, per_module=True, **QUIET)
    for option, dim in (("aggregate_train", 1), ("aggregate_queries", 0)):
        stored = fi.pairwise_scores(model, task, factors, queries, data, batch_size=3, per_module=True,
                                    store=tmp_path / option, data_partitions=3, module_partitions=2,
                                    **{option: True}, **QUIET)
        assert set(stored) == set(pairwise)
        for layer, value in stored.items():
            assert_close(value, pairwise[layer].sum(dim, keepdim=True))
        total = fi.pairwise_scores(model, task, factors, queries, data, batch_size=3,
                                   store=tmp_path / f"{option}-total", data_partitions=3, module_partitions=2, **{option: True}, **QUIET)
        assert_close(total, sum(pairwise.values()).sum(dim, keepdim=True))


def test_any_number_of_queries_per_pass_equals_one_pass():
    """``queries_per_pass`` only groups the queries into passes over the training data: any value, with query
    batches that do or do not divide it, gives the one-pass scores (per layer and in total, per token too)."""
    model, task, data, queries, factors = _options_problem()
    one_pass = fi.pairwise_scores(model, task, factors, queries, data, per_module=True, **QUIET)
    for per_pass, query_batch_size in ((1, 1), (2, 1), (3, 2), (4, 2), (5, 2), (9, 2)):
        grouped = fi.pairwise_scores(model, task, factors, queries, data, batch_size=4,
                                     query_batch_size=query_batch_size, queries_per_pass=per_pass,
                                     per_module=True, **QUIET)
        for layer in one_pass:
            assert_close(grouped[layer], one_pass[layer])
    model, task, data = _token_problem()
    factors = fi.fit_factors(model, task, data, strategy="kfac", use_empirical_fisher=True, **QUIET)
    tokens = fi.pairwise_scores(model, task, factors, Subset(data, [0, 1, 2]), data, per_token=True, **QUIET)
    grouped = fi.pairwise_scores(model, task, factors, Subset(data, [0, 1, 2]), data, per_token=True,
                                 query_batch_size=1, queries_per_pass=2, **QUIET)
    assert_close(grouped, tokens)


def test_self_scores_with_the_measurement_are_the_diagonal_of_pairwise_scores(tmp_path):
    """docs/concepts.md: with ``use_measurement=True`` self-influence is ``<P(grad f(z_n)), grad L(z_n)>``, the
    diagonal of pairwise scores with the data as queries (the measurement side) and as training examples (the
    loss side). The measurement here is not the loss, so the default self scores differ from it; and both equal
    exact preconditioned dot products of autograd gradients."""
    model, task, data, _, factors = _options_problem()
    pairwise = fi.pairwise_scores(model, task, factors, data, data, batch_size=4, per_module=True, **QUIET)
    measured = fi.self_scores(model, task, factors, data, use_measurement=True, batch_size=5, per_module=True,
                              **QUIET)
    plain = fi.self_scores(model, task, factors, data, batch_size=5, per_module=True, **QUIET)
    preconditioned_loss = fi.query_gradients(model, _LossAsMeasurement(task), factors, data, **QUIET)
    train = _oracle_layer_grads(model, task, data, factors.layers)
    for layer in pairwise:
        assert_close(measured[layer], pairwise[layer].diagonal())
        assert_close(plain[layer], torch.einsum("ngoi,ngoi->n", preconditioned_loss[layer], train[layer]))
        assert float((plain[layer] - measured[layer]).abs().max()) > 1e-3 * float(plain[layer].abs().max())
    stored = fi.self_scores(model, task, factors, data, use_measurement=True, batch_size=5, store=tmp_path / "s",
                            data_partitions=2, module_partitions=2, per_module=True, **QUIET)
    for layer in pairwise:
        assert_close(stored[layer], pairwise[layer].diagonal())


class _LossAsMeasurement(fi.Task):
    """``task`` with its training loss as the measurement."""

    def __init__(self, task):
        self.task = task

    def compute_train_loss(self, batch, model, sample=False):
        return self.task.compute_train_loss(batch, model, sample)

    def compute_measurement(self, batch, model):
        return self.task.compute_train_loss(batch, model)


def test_stored_scores_with_module_partitions_equal_unpartitioned_and_modules_sum_to_the_total(tmp_path):
    """A store filled cell by cell (3 data x 2 module partitions, each cell by its own call) holds the in-memory
    per-module scores, and its total is their sum; pairwise, per-token and self scores."""
    model, task, data, queries, factors = _options_problem()
    memory = fi.pairwise_scores(model, task, factors, queries, data, per_module=True, **QUIET)
    cells = dict(store=tmp_path / "p", data_partitions=3, module_partitions=2, batch_size=3, **QUIET)
    for m in range(2):
        for d in range(3):
            partial = fi.pairwise_scores(model, task, factors, queries, data, per_module=True,
                                         target_data_partitions=[d], target_module_partitions=[m], **cells)
    assert partial is not None  # the last cell completes the store
    for layer in memory:
        assert_close(partial[layer], memory[layer])
    total = fi.pairwise_scores(model, task, factors, queries, data, **dict(cells, store=tmp_path / "total"))
    assert_close(total, sum(memory.values()))
    assert_close(total, fi.pairwise_scores(model, task, factors, queries, data, **QUIET))

    self_memory = fi.self_scores(model, task, factors, data, per_module=True, **QUIET)
    self_stored = fi.self_scores(model, task, factors, data, per_module=True, store=tmp_path / "self",
                                 data_partitions=2, module_partitions=3, batch_size=4, **QUIET)
    for layer in self_memory:
        assert_close(self_stored[layer], self_memory[layer])
    assert_close(fi.self_scores(model, task, factors, data, store=tmp_path / "self-total", data_partitions=2,
                                module_partitions=3, batch_size=4, **QUIET), sum(self_memory.values()))

    model, task, data = _token_problem()
    factors = fi.fit_factors(model, task, data, strategy="ekfac", use_empirical_fisher=True, **QUIET)
    tokens = fi.pairwise_scores(model, task, factors, Subset(data, [0, 1]), data, per_token=True, per_module=True,
                                **QUIET)
    stored = fi.pairwise_scores(model, task, factors, Subset(data, [0, 1]), data, per_token=True, per_module=True,
                                store=tmp_path / "t", data_partitions=2, module_partitions=2, batch_size=3, **QUIET)
    for layer in tokens:
        assert_close(stored[layer], tokens[layer])


def test_compat_scoring_options_are_identities_of_plain_pairwise_scores(tmp_path):
    """The compat Analyzer's ScoreArguments: aggregate_train_gradients / aggregate_query_gradients give the sums,
    query_gradient_accumulation_steps and data / module partitions change nothing (modules sum to the total), and
    use_measurement_for_self_influence gives the diagonal of pairwise scores of the data against itself."""
    model, task, data, queries, _ = _options_problem()
    analyzer = compat.Analyzer("options", model, task, cpu=True, disable_tqdm=True, output_dir=str(tmp_path))
    analyzer.fit_all_factors("f", data, per_device_batch_size=5, factor_args=compat.FactorArguments(
        strategy="ekfac", use_empirical_fisher=True, **WIDE_FACTORS))

    def pairwise(name, query_data=queries, **fields):
        return analyzer.compute_pairwise_scores(
            name, "f", query_data, data, per_device_query_batch_size=2, per_device_train_batch_size=4,
            score_args=compat.ScoreArguments(damping_factor=None, **WIDE_SCORES, **fields))

    per_module = pairwise("base", compute_per_module_scores=True)
    layers = ["0", "2", "4"]
    assert sorted(per_module) == layers
    total = pairwise("total")["all_modules"]
    assert_close(total, sum(per_module.values()))
    sums = {"aggregate_train_gradients": lambda v: v.sum(1, keepdim=True),
            "aggregate_query_gradients": lambda v: v.sum(0, keepdim=True)}
    for option, reduce in sums.items():
        aggregated = pairwise(option, compute_per_module_scores=True, **{option: True})
        for layer in layers:
            assert_close(aggregated[layer], reduce(per_module[layer]))
    for steps in (2,):
        assert_close(pairwise(f"steps{steps}", query_gradient_accumulation_steps=steps)["all_modules"], total)
    partitioned = pairwise("parts", compute_per_module_scores=True, data_partitions=2, module_partitions=2)
    for layer in layers:
        assert_close(partitioned[layer], per_module[layer])
    assert_close(pairwise("parts-total", data_partitions=3, module_partitions=2)["all_modules"], total)

    train_train = pairwise("train-train", query_data=data, compute_per_module_scores=True)
    measured = analyzer.compute_self_scores("measured", "f", data, per_device_train_batch_size=5,
                                            score_args=compat.ScoreArguments(
                                                damping_factor=None, use_measurement_for_self_influence=True,
                                                compute_per_module_scores=True, module_partitions=2, **WIDE_SCORES))
    plain = analyzer.compute_self_scores("plain", "f", data, per_device_train_batch_size=5,
                                         score_args=compat.ScoreArguments(damping_factor=None, **WIDE_SCORES))
    for layer in layers:
        assert_close(measured[layer], train_train[layer].diagonal())
    assert float((plain["all_modules"] - sum(measured.values())).abs().max()) > 1e-3 * float(plain["all_modules"].abs().max())
