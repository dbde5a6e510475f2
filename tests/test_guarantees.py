"""The model is left untouched, and bad input gets an error that names the problem and the fix."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fninfluence as fi
from fninfluence import InfluenceError
from fninfluence.precision import Precision
from models import ClassificationTask, SmallCNN, classification_data, float64, image_data, mlp

QUIET = dict(progress=False)


def _snapshot(model):
    return {
        "params": [(name, id(p), p.requires_grad, p.detach().clone()) for name, p in model.named_parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
    }


def _assert_untouched(model, before):
    after = _snapshot(model)
    assert [(n, i, r) for n, i, r, _ in after["params"]] == [(n, i, r) for n, i, r, _ in before["params"]]
    for (_, _, _, v0), (_, _, _, v1) in zip(before["params"], after["params"]):
        assert torch.equal(v0, v1)
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in before["state"])
    assert after["training"] == before["training"]
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._backward_hooks and not module._backward_pre_hooks
    for p in model.parameters():
        assert p.grad is None and p._backward_hooks is None


@pytest.mark.parametrize("compile", [False, {"backend": "eager"}])
@pytest.mark.parametrize("strategy", ["identity", "ekfac"])
def test_model_is_untouched(strategy, compile):
    torch.manual_seed(0)
    model = SmallCNN(padding=1).double()
    model.eval()
    model.conv1.train()  # a mixed training flag must survive as it is
    model.conv2.bias.requires_grad_(False)  # and so must requires_grad
    data, task = image_data(n=6), ClassificationTask()
    before = _snapshot(model)
    factors = fi.fit_factors(model, task, data, strategy=strategy, batch_size=4, compile=compile, **QUIET)
    fi.pairwise_scores(model, task, factors, data, data, batch_size=4, compile=compile, **QUIET)
    fi.self_scores(model, task, factors, data, use_measurement=True, compile=compile, **QUIET)
    _assert_untouched(model, before)


def test_frozen_parameters_are_still_analysed():
    model = float64(mlp())
    for p in model.parameters():
        p.requires_grad_(False)
    data, task = classification_data(), ClassificationTask()
    factors = fi.fit_factors(model, task, data, strategy="identity", **QUIET)
    assert fi.self_scores(model, task, factors, data, **QUIET).abs().sum() > 0


def test_unknown_tracked_module_names_the_closest_match():
    model = float64(SmallCNN())
    with pytest.raises(InfluenceError, match=r"'conv_1'.*not a module.*Did you mean 'conv1'"):
        fi.fit_factors(model, ClassificationTask(modules=["conv_1"]), image_data(), **QUIET)


def test_unsupported_tracked_module_type():
    with pytest.raises(InfluenceError, match="Tanh.*supported layers are"):
        fi.fit_factors(float64(mlp()), ClassificationTask(modules=["1"]), classification_data(), **QUIET)


def test_shuffling_loader_is_refused():
    loader = DataLoader(classification_data(), batch_size=4, shuffle=True)
    with pytest.raises(InfluenceError, match="shuffle=False"):
        fi.fit_factors(float64(mlp()), ClassificationTask(), loader, **QUIET)


def test_ordered_loader_is_accepted_and_equals_the_dataset():
    model, data, task = float64(mlp()), classification_data(), ClassificationTask()
    factors = fi.fit_factors(model, task, data, strategy="identity", **QUIET)
    from_dataset = fi.self_scores(model, task, factors, data, batch_size=5, **QUIET)
    from_loader = fi.self_scores(model, task, factors, DataLoader(data, batch_size=5), **QUIET)
    torch.testing.assert_close(from_loader, from_dataset)
    with pytest.raises(InfluenceError, match="batch_size=5, but batch_size=3"):
        fi.self_scores(model, task, factors, DataLoader(data, batch_size=5), batch_size=3, **QUIET)


def test_loss_that_is_not_a_scalar():
    task = fi.task_from_functions(lambda batch, model, sample: F.cross_entropy(model(batch[0]), batch[1],
                                                                               reduction="none"))
    with pytest.raises(InfluenceError, match=r"shape \(24,\).*must be a scalar.*reduction='sum'"):
        fi.fit_factors(float64(mlp()), task, classification_data(), batch_size=24, **QUIET)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_names_the_batch(bad):
    data = classification_data(n=12)
    data.tensors[0][9, 0] = bad
    # the loss sees the raw input too, so a bad input makes the loss itself non-finite
    task = fi.task_from_functions(
        lambda batch, model, sample: F.cross_entropy(model(batch[0]), batch[1], reduction="sum") + batch[0][:, 0].sum())
    with pytest.raises(InfluenceError, match="is (nan|inf|-inf) on batch 2"):
        fi.fit_factors(float64(mlp()), task, data, strategy="diagonal", batch_size=4, **QUIET)


def test_errors_raised_inside_a_step_say_which_batch():
    data = classification_data(n=12)
    data.tensors[0][9, 0] = math.nan  # sampling labels from NaN probabilities fails inside the task
    with pytest.raises(RuntimeError) as info:
        fi.fit_factors(float64(mlp()), ClassificationTask(), data, batch_size=4, use_empirical_fisher=False, **QUIET)
    assert any("batch 2" in note for note in getattr(info.value, "__notes__", []))


def test_batchnorm_in_training_mode():
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    with pytest.raises(InfluenceError, match="BatchNorm.*model.eval"):
        fi.fit_factors(model, ClassificationTask(), classification_data(), **QUIET)
    fi.fit_factors(model.eval(), ClassificationTask(), classification_data(), strategy="identity", **QUIET)


def test_batch_dimension_not_first():
    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):  # [B, 6] -> [2, B, 6]: the tracked layer sees the batch in dim 1
            return self.fc(torch.stack([x, -x])).sum(0)

    with pytest.raises(InfluenceError, match="batch dimension first"):
        fi.fit_factors(SequenceFirst().double(), ClassificationTask(), classification_data(), **QUIET)


def test_in_place_change_of_a_recorded_input():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = self.fc1(x)
            out = self.fc2(h)
            h.mul_(2)  # changes fc2's input after fc2 read it
            return out

    with pytest.raises(InfluenceError, match="modified in place"):
        fi.fit_factors(InPlace().double(), ClassificationTask(), classification_data(), **QUIET)


def test_tracked_weight_used_by_another_function():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 5, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.embed(ids))

    data = TensorDataset(torch.randint(0, 5, (8,)), torch.randint(0, 5, (8,)))
    with pytest.raises(InfluenceError, match=r"head: \['embedding'\].*Leave these layers out"):
        fi.fit_factors(Tied(), ClassificationTask(), data, **QUIET)


def test_factors_from_another_model_are_refused():
    data, task = classification_data(), ClassificationTask()
    factors = fi.fit_factors(float64(mlp(hidden=5)), task, data, strategy="diagonal", **QUIET)
    with pytest.raises(InfluenceError, match="fitted on layers"):
        fi.self_scores(float64(mlp(hidden=4)), task, factors, data, **QUIET)


def test_bad_strategy_and_damping():
    model, data, task = float64(mlp()), classification_data(), ClassificationTask()
    with pytest.raises(InfluenceError, match="Unknown strategy 'ekafc'"):
        fi.fit_factors(model, task, data, strategy="ekafc", **QUIET)
    factors = fi.fit_factors(model, task, data, strategy="diagonal", **QUIET)
    with pytest.raises(InfluenceError, match="damping must be"):
        fi.self_scores(model, task, factors, data, damping=-1.0, **QUIET)


def test_empty_data():
    model, task = float64(mlp()), ClassificationTask()
    empty = TensorDataset(torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    with pytest.raises(InfluenceError, match="empty"):
        fi.fit_factors(model, task, empty, **QUIET)


def test_computation_follows_the_model_dtype():
    model, task = mlp().float().eval(), ClassificationTask()
    data = classification_data(dtype=torch.float32)
    factors = fi.fit_factors(model, task, data, strategy="ekfac", **QUIET)
    wide = fi.fit_factors(model, task, data, strategy="ekfac", precision=Precision(eigenvector_dtype=torch.float64),
                          **QUIET)
    # the eigendecomposition runs in float64 either way; the default keeps its eigenvectors in the dtype they are
    # read in (float32 here), i.e. the float64 ones rounded once
    assert factors["0"]["activation_eigenvectors"].dtype == torch.float32
    assert wide["0"]["activation_eigenvectors"].dtype == torch.float64
    assert torch.equal(factors["0"]["activation_eigenvectors"], wide["0"]["activation_eigenvectors"].float())
    assert fi.pairwise_scores(model, task, factors, data, data, **QUIET).dtype == torch.float32


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac"])
def test_a_layer_no_gradient_reaches_gives_finite_scores_with_heuristic_damping(strategy):
    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.head, self.dead = nn.Linear(6, 3), nn.Linear(6, 3)

        def forward(self, x):
            return self.head(x) + 0.0 * self.dead(x)

    model, data, task = Dead().double(), classification_data(), ClassificationTask()
    factors = fi.fit_factors(model, task, data, strategy=strategy, **QUIET)
    scores = fi.pairwise_scores(model, task, factors, data, data, per_module=True, **QUIET)
    assert torch.isfinite(scores["head"]).all() and scores["head"].abs().sum() > 0
    assert torch.equal(scores["dead"], torch.zeros_like(scores["dead"]))


def test_attention_mask_that_fits_no_layer():
    class Tokens(fi.Task):
        def compute_train_loss(self, batch, model, sample=False):
            (x,) = batch
            return model(x).square().sum()

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_attention_mask(self, batch):
            return torch.ones(batch[0].shape[0], 3)  # 3 tokens, but the sequences have 5

    data = TensorDataset(torch.randn(4, 5, 2, dtype=torch.float64))
    with pytest.raises(InfluenceError, match="5 tokens per example but the attention mask has shape"):
        fi.fit_factors(nn.Linear(2, 1).double(), Tokens(), data, **QUIET)


def test_attention_mask_excludes_tokens_from_the_statistics():
    """Masked tokens count neither in A and S nor in the token count: A equals A on the kept tokens alone."""

    class Masked(fi.Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, keep = batch
            return (model(x).squeeze(-1).square() * keep).sum()

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_attention_mask(self, batch):
            return batch[1]

    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    keep = (torch.rand(6, 4) > 0.4).double()
    keep[:, 0] = 1
    model = nn.Linear(3, 1).double()
    factors = fi.fit_factors(model, Masked(), TensorDataset(x, keep), strategy="kfac", use_empirical_fisher=True,
                             **QUIET)
    kept = torch.cat([x[keep.bool()], torch.ones(int(keep.sum()), 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(factors[""]["activation_covariance"][0], kept.T @ kept / keep.sum())
    assert float(factors[""]["num_tokens"]) == float(keep.sum())


def test_a_data_dependent_number_of_layer_calls_is_refused():
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            for _ in range(1 + int(x[0, 0] > 0)):  # how often the block runs depends on the data
                x = torch.tanh(self.block(x))
            return self.head(x)

    data = classification_data(n=8)
    data.tensors[0][0, 0], data.tensors[0][4, 0] = -1.0, 1.0  # batch 0 calls the block once, batch 1 twice
    with pytest.raises(InfluenceError, match="depends on the data"):
        fi.fit_factors(Loop().double().eval(), ClassificationTask(), data, strategy="diagonal", batch_size=4,
                       use_empirical_fisher=True, **QUIET)


def test_attention_mask_per_layer_dict_masks_only_the_named_layers():
    from models import LMTask, TinyTransformerLM, sequence_data

    class Masked(LMTask):
        """Batches (ids, keep); the mask is ``which(keep)``: a tensor, a per-layer dict, or None."""

        def __init__(self, which):
            self.which = which

        def compute_train_loss(self, batch, model, sample=False):
            return super().compute_train_loss(batch[:1], model, sample)

        def get_attention_mask(self, batch):
            return self.which(batch[1])

    torch.manual_seed(0)
    model, ids = TinyTransformerLM().double().eval(), sequence_data().tensors[0]
    keep = torch.ones_like(ids)
    keep[::2, 4:] = 0
    data = TensorDataset(ids, keep)

    def fit(which):
        return fi.fit_factors(model, Masked(which), data, strategy="kfac", use_empirical_fisher=True, batch_size=5,
                              **QUIET)

    everywhere, nowhere, only_up = fit(lambda k: k), fit(lambda k: None), fit(lambda k: {"up": k})
    for name in ("activation_covariance", "gradient_covariance", "num_tokens"):
        torch.testing.assert_close(only_up["up"][name], everywhere["up"][name])
        torch.testing.assert_close(only_up["q"][name], nowhere["q"][name])
    assert float(everywhere["up"]["num_tokens"]) == float(keep.sum()) < float(nowhere["up"]["num_tokens"])
