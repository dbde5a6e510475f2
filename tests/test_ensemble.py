"""Checkpoint ensembles (fninfluence.ensemble): identities with the pipeline, combine rules, the store's checkpoint
axis (resume, manifest), errors."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from torch.utils.data import Subset

import fninfluence as fi
from fninfluence import InfluenceError
from fninfluence.ensemble import ensemble_pairwise_scores, ensemble_self_scores, read_ensemble_scores
from models import ClassificationTask, classification_data, float64, mlp

KW = dict(batch_size=8, progress=False)


class CountingTask(ClassificationTask):
    """Counts the training-loss evaluations, to tell a recomputation from a read of the store."""

    calls = 0

    def compute_train_loss(self, batch, model, sample=False):
        CountingTask.calls += 1
        return super().compute_train_loss(batch, model, sample)


def _checkpoints(k=3):
    models = []
    for seed in range(k):
        models.append(float64(mlp(), seed=seed))
    return models


def _data():
    data = classification_data(n=20)
    return Subset(data, range(5)), data


def _plain(model, task, queries, data):
    factors = fi.fit_factors(model, task, data, **KW)
    return fi.pairwise_scores(model, task, factors, queries, data, **KW)


def test_one_checkpoint_is_the_pipeline_exactly():
    (model,), task = _checkpoints(1), ClassificationTask()
    queries, data = _data()
    expected = _plain(model, task, queries, data)
    got = ensemble_pairwise_scores([model], task, queries, data, **KW)
    assert torch.equal(got, expected)
    assert torch.equal(ensemble_pairwise_scores([model], task, queries, data, combine=None, **KW), expected[None])


def test_mean_sum_and_stack_of_k_checkpoints_match_separate_calls():
    models, task = _checkpoints(3), ClassificationTask()
    queries, data = _data()
    separate = torch.stack([_plain(m, task, queries, data) for m in models])
    stack = ensemble_pairwise_scores(models, task, queries, data, combine=None, **KW)
    assert stack.shape == (3, 5, 20) and torch.equal(stack, separate)
    mean = ensemble_pairwise_scores(models, task, queries, data, **KW)
    torch.testing.assert_close(mean, separate.mean(0), rtol=1e-13, atol=0)
    total = ensemble_pairwise_scores(models, task, queries, data, combine="sum", **KW)
    torch.testing.assert_close(total, 3 * mean, rtol=1e-13, atol=1e-15)


def test_state_dicts_with_a_template_equal_models():
    models, task = _checkpoints(2), ClassificationTask()
    queries, data = _data()
    template = float64(mlp(), seed=7)
    states = [copy.deepcopy(m.state_dict()) for m in models]
    from_states = ensemble_pairwise_scores(states, task, queries, data, model=template, combine=None, **KW)
    assert torch.equal(from_states, ensemble_pairwise_scores(models, task, queries, data, combine=None, **KW))
    assert torch.equal(template.state_dict()["0.weight"], float64(mlp(), seed=7).state_dict()["0.weight"])


def test_self_scores_version():
    models, task = _checkpoints(2), ClassificationTask()
    _, data = _data()
    separate = []
    for m in models:
        factors = fi.fit_factors(m, task, data, **KW)
        separate.append(fi.self_scores(m, task, factors, data, **KW))
    separate = torch.stack(separate)
    assert torch.equal(ensemble_self_scores(models, task, data, combine=None, **KW), separate)
    torch.testing.assert_close(ensemble_self_scores(models, task, data, **KW), separate.mean(0), rtol=1e-13, atol=0)


def test_store_equals_memory_resumes_and_reads_back(tmp_path):
    models, task = _checkpoints(2), CountingTask()
    queries, data = _data()
    memory = ensemble_pairwise_scores(models, task, queries, data, **KW)
    stored = ensemble_pairwise_scores(models, task, queries, data, store=tmp_path / "e", **KW)
    torch.testing.assert_close(stored, memory, rtol=0, atol=0)
    manifest = json.loads((tmp_path / "e" / "ensemble.json").read_text())
    assert manifest["checkpoints"] == 2 and manifest["combine"] == "mean" and len(manifest["models_sha256"]) == 2
    for k in range(2):
        assert (tmp_path / "e" / f"checkpoint-{k}" / "factors" / "_done" / "complete.json").exists()
        assert (tmp_path / "e" / f"checkpoint-{k}" / "scores" / "_done" / "complete.json").exists()
    CountingTask.calls = 0
    again = ensemble_pairwise_scores(models, task, queries, data, store=tmp_path / "e", **KW)
    assert CountingTask.calls == 0, "a complete ensemble store is read back, not recomputed"
    assert torch.equal(again, stored)
    # resume: remove checkpoint 1's scores (as if killed while scoring it); only that is recomputed
    shutil.rmtree(tmp_path / "e" / "checkpoint-1" / "scores")
    CountingTask.calls = 0
    resumed = ensemble_pairwise_scores(models, task, queries, data, store=tmp_path / "e", **KW)
    assert torch.equal(resumed, stored) and 0 < CountingTask.calls
    read = read_ensemble_scores(tmp_path / "e")
    assert read.combine == "mean" and read.per_checkpoint.shape == (2, 5, 20)
    torch.testing.assert_close(read.combined, stored, rtol=0, atol=0)
    torch.testing.assert_close(read_ensemble_scores(tmp_path / "e", combine="sum").combined,
                               read.per_checkpoint.sum(0), rtol=0, atol=0)


def test_store_of_other_checkpoints_is_refused(tmp_path):
    models, task = _checkpoints(3), ClassificationTask()
    queries, data = _data()
    ensemble_pairwise_scores(models[:2], task, queries, data, store=tmp_path, **KW)
    with pytest.raises(InfluenceError, match="another number of checkpoints.*overwrite=True"):
        ensemble_pairwise_scores(models, task, queries, data, store=tmp_path, **KW)
    with pytest.raises(InfluenceError, match=r"other checkpoints.*checkpoints 1 differ.*overwrite=True"):
        ensemble_pairwise_scores([models[0], models[2]], task, queries, data, store=tmp_path, **KW)
    with pytest.raises(InfluenceError, match="scores of another kind"):
        ensemble_self_scores(models[:2], task, data, store=tmp_path, **KW)
    got = ensemble_pairwise_scores([models[2]], task, queries, data, store=tmp_path, overwrite=True, **KW)
    assert torch.equal(got, _plain(models[2], task, queries, data))
    assert not (tmp_path / "checkpoint-1").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").write_text("x")
    with pytest.raises(InfluenceError, match="not a checkpoint-ensemble store"):
        ensemble_pairwise_scores(models[:1], task, queries, data, store=tmp_path / "other", **KW)


def test_errors():
    models, task = _checkpoints(1), ClassificationTask()
    queries, data = _data()
    with pytest.raises(InfluenceError, match="empty"):
        ensemble_pairwise_scores([], task, queries, data)
    with pytest.raises(InfluenceError, match="sequence"):
        ensemble_pairwise_scores(models[0], task, queries, data)
    with pytest.raises(InfluenceError, match="not a combine rule"):
        ensemble_pairwise_scores(models, task, queries, data, combine="max")
    wider = mlp(hidden=7).double()
    with pytest.raises(InfluenceError, match="another architecture.*0.weight"):
        ensemble_pairwise_scores([models[0], wider], task, queries, data, **KW)
    with pytest.raises(InfluenceError, match="model="):
        ensemble_pairwise_scores([models[0].state_dict()], task, queries, data, **KW)
    with pytest.raises(InfluenceError, match="does not fit model="):
        ensemble_pairwise_scores([wider.state_dict()], task, queries, data, model=models[0], **KW)
    with pytest.raises(InfluenceError, match="factors_kwargs may not set 'store'"):
        ensemble_pairwise_scores(models, task, queries, data, factors_kwargs=dict(store="x"), **KW)
