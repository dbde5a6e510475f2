"""Per-token scores on models whose layers have different token counts (a CNN) or none (an MLP), natively and
through the Kronfluence-compatible API, against pairwise scores (the per-token sum) and Kronfluence 1.0.1."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch.utils.data import Subset

import fninfluence as fi
from fninfluence.compat import kronfluence as compat
from fninfluence.errors import InfluenceError
from models import ClassificationTask, SmallCNN, classification_data, float64, image_data, mlp

W = torch.float64


def _cnn():
    """conv1 sees 5 x 5 = 25 positions, conv2 (stride 2) 2 x 2 = 4, the head none."""
    return float64(SmallCNN()), image_data(n=10), ClassificationTask()


def _fit(model, task, data):
    return fi.fit_factors(model, task, data, use_empirical_fisher=True, batch_size=4, progress=False)


def _scores(model, task, factors, queries, data, **options):
    return fi.pairwise_scores(model, task, factors, queries, data, batch_size=4, damping=1e-3, progress=False,
                              **options)


def test_native_cnn_per_token_scores_refuse_mixed_positions_and_sum_them_with_conv_tokens_false(tmp_path):
    model, data, task = _cnn()
    factors, queries = _fit(model, task, data), Subset(data, range(3))
    pairwise = _scores(model, task, factors, queries, data)
    per_layer = _scores(model, task, factors, queries, data, per_module=True)
    with pytest.raises(InfluenceError, match="conv_tokens=False"):
        _scores(model, task, factors, queries, data, per_token=True)
    summed = _scores(model, task, factors, queries, data, per_token=True, conv_tokens=False)
    assert summed.shape == (3, 10, 1)
    torch.testing.assert_close(summed[..., 0], pairwise, rtol=1e-10, atol=1e-12)
    modules = _scores(model, task, factors, queries, data, per_token=True, conv_tokens=False, per_module=True)
    for layer, value in per_layer.items():
        torch.testing.assert_close(modules[layer][..., 0], value, rtol=1e-10, atol=1e-12)
    stored = _scores(model, task, factors, queries, data, per_token=True, conv_tokens=False, store=tmp_path / "s",
                     data_partitions=2, module_partitions=2)
    torch.testing.assert_close(stored, summed, rtol=1e-10, atol=1e-12)


def test_native_per_token_scores_of_one_conv_layer_sum_to_pairwise():
    """With one position count (conv1 and the head only) the positions are the tokens and add up to pairwise."""
    model, data, _ = _cnn()
    task = ClassificationTask(modules=["conv1", "head"])
    factors, queries = _fit(model, task, data), Subset(data, range(3))
    per_token = _scores(model, task, factors, queries, data, per_token=True)
    assert per_token.shape == (3, 10, 25)
    torch.testing.assert_close(per_token.sum(-1), _scores(model, task, factors, queries, data), rtol=1e-10,
                               atol=1e-12)


def test_native_mlp_per_token_scores_keep_their_documented_token_dimension():
    model, data, task = float64(mlp()), classification_data(n=9), ClassificationTask()
    factors, queries = _fit(model, task, data), Subset(data, range(2))
    per_token = _scores(model, task, factors, queries, data, per_token=True)
    assert per_token.shape == (2, 9, 1)
    torch.testing.assert_close(per_token[..., 0], _scores(model, task, factors, queries, data), rtol=1e-10,
                               atol=1e-12)


def _compat_analyzer(model, task, root):
    return compat.Analyzer("tokens", compat.prepare_model(model, task), task, cpu=True, disable_tqdm=True,
                           output_dir=str(root))


FACTORS = dict(use_empirical_fisher=True, activation_covariance_dtype=W, gradient_covariance_dtype=W,
               eigendecomposition_dtype=W, per_sample_gradient_dtype=W, lambda_dtype=W)
SCORES = dict(damping_factor=1e-3, per_sample_gradient_dtype=W, precondition_dtype=W, score_dtype=W,
              query_gradient_svd_dtype=W)


@pytest.mark.parametrize("workload", ["cnn", "mlp"])
def test_compat_per_token_scores_without_tokens_are_q_by_n(tmp_path, workload):
    model, data, task = _cnn() if workload == "cnn" else (float64(mlp()), classification_data(n=9),
                                                          ClassificationTask())
    analyzer = _compat_analyzer(model, task, tmp_path)
    analyzer.fit_all_factors("f", data, per_device_batch_size=4, factor_args=compat.FactorArguments(**FACTORS))
    queries = Subset(data, range(3))
    call = dict(per_device_query_batch_size=2, per_device_train_batch_size=4)
    plain = analyzer.compute_pairwise_scores("plain", "f", queries, data, score_args=compat.ScoreArguments(
        **SCORES, compute_per_module_scores=True), **call)
    for per_module in (False, True):
        args = compat.ScoreArguments(**SCORES, compute_per_token_scores=True, compute_per_module_scores=per_module)
        name = f"tokens{int(per_module)}"
        returned = analyzer.compute_pairwise_scores(name, "f", queries, data, score_args=args, **call)
        loaded = analyzer.load_pairwise_scores(name)
        for scores in (returned, loaded):
            expected = plain if per_module else {"all_modules": sum(plain.values())}
            assert sorted(scores) == sorted(expected)
            for key, value in expected.items():
                assert scores[key].shape == (3, len(data))
                torch.testing.assert_close(scores[key], value, rtol=1e-10, atol=1e-12)


@pytest.mark.parity
def test_compat_cnn_per_token_scores_match_kronfluence(tmp_path, monkeypatch):
    import kronfluence.analyzer as kf_analyzer
    import kronfluence.arguments as kf_arguments
    import kronfluence.computer.computer as kf_computer
    import kronfluence.factor.eigen as kf_eigen

    from kronfluence_reference import kronfluence_task

    for module in (kf_computer, kf_eigen):  # its gc.collect() between stages: most of its time here, no number
        monkeypatch.setattr(module, "release_memory", lambda: None)

    model, data, task = _cnn()
    queries = Subset(data, range(3))
    call = dict(per_device_query_batch_size=2, per_device_train_batch_size=4)
    kron_task = kronfluence_task(task)
    theirs = kf_analyzer.Analyzer("kron", kf_analyzer.prepare_model(copy.deepcopy(model), kron_task), kron_task,
                                  cpu=True, disable_tqdm=True, output_dir=str(tmp_path / "kron"),
                                  log_level=logging.ERROR)
    theirs.fit_all_factors("f", data, per_device_batch_size=4, factor_args=kf_arguments.FactorArguments(**FACTORS))
    ours = _compat_analyzer(copy.deepcopy(model), task, tmp_path / "ours")
    ours.fit_all_factors("f", data, per_device_batch_size=4, factor_args=compat.FactorArguments(**FACTORS))
    for per_module in (False, True):
        fields = dict(SCORES, compute_per_token_scores=True, compute_per_module_scores=per_module)
        theirs.compute_pairwise_scores("s", "f", queries, data, score_args=kf_arguments.ScoreArguments(**fields),
                                       overwrite_output_dir=True, **call)
        expected = theirs.load_pairwise_scores("s")
        got = ours.compute_pairwise_scores("s", "f", queries, data, score_args=compat.ScoreArguments(**fields),
                                           overwrite_output_dir=True, **call)
        assert sorted(got) == sorted(expected)
        for key, value in expected.items():
            assert got[key].shape == value.shape == (3, len(data))
            torch.testing.assert_close(got[key], value, rtol=1e-7, atol=1e-9)


class _PooledSequenceClassifier(torch.nn.Module):
    """A layer with 5 tokens, then a head on the mean-pooled sequence (no tokens)."""

    def __init__(self):
        super().__init__()
        self.encoder, self.head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.encoder(x)).mean(1))


def test_a_module_partition_without_tokens_spreads_over_the_models_tokens(tmp_path):
    """The head alone in a module partition: before, in memory an error, with a store every token got the head's
    whole score (off by a factor T) instead of 1/T of it."""
    torch.manual_seed(0)
    model = _PooledSequenceClassifier().double().eval()
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(6, 5, 3, generator=g, dtype=W),
                                          torch.randint(0, 2, (6,), generator=g))
    task = ClassificationTask()
    factors, queries = _fit(model, task, data), Subset(data, range(2))
    expected = _scores(model, task, factors, queries, data, per_token=True, per_module=True)
    pairwise = _scores(model, task, factors, queries, data, per_module=True)
    torch.testing.assert_close(expected["head"], pairwise["head"][..., None].expand(-1, -1, 5) / 5)
    for options in (dict(), dict(store=tmp_path / "s", data_partitions=2)):
        modules = _scores(model, task, factors, queries, data, per_token=True, per_module=True,
                          module_partitions=2, **options)
        summed = _scores(model, task, factors, queries, data, per_token=True, module_partitions=2,
                         **({k: (v.parent / "t" if k == "store" else v) for k, v in options.items()}))
        for layer, value in expected.items():
            torch.testing.assert_close(modules[layer], value, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(summed, sum(expected.values()), rtol=1e-10, atol=1e-12)
