"""Guardrails for common modelling mistakes, and errors from below said in fninfluence's words.

* a training loss or measurement that is a mean over the batch is refused (a loss that is no sum at all warned);
* factors used with another model's weights are refused, unless rebound with ``Factors.for_model``;
* messages that ask for something name the keyword to pass it with;
* torch's own vmap errors (per-example vmap, parameter layers) become InfluenceErrors naming the module and a way out;
* Ctrl-C during a stored run says what the store kept and that the same call resumes.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

import fninfluence as fi
from fninfluence.errors import InfluenceError, InfluenceWarning, Interrupted

sys.path.insert(0, str(Path(__file__).parent))
from models import ClassificationTask, classification_data, mlp  # noqa: E402


def _model(seed=0):
    torch.manual_seed(seed)
    return mlp().double().eval()


def _loss(reduction):
    def train_loss(batch, model, sample):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction=reduction)
    return train_loss


# -- a mean-reduced loss or measurement ---------------------------------------------------------------

@pytest.mark.parametrize("empirical", [True, False])
def test_a_mean_reduced_training_loss_is_refused_with_the_fix(empirical):
    task = fi.task_from_functions(_loss("mean"))
    with pytest.raises(InfluenceError, match=r"(?s)training loss.*mean over the batch's examples.*reduction='sum'"):
        fi.fit_factors(_model(), task, classification_data(n=12), strategy="diagonal", batch_size=4,
                       use_empirical_fisher=empirical, progress=False)


def test_a_summed_loss_passes_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        factors = fi.fit_factors(_model(), fi.task_from_functions(_loss("sum")), classification_data(n=12),
                                 strategy="diagonal", batch_size=5, progress=False)
    assert factors.complete


def test_a_mean_reduced_measurement_is_refused_when_scoring():
    model, data = _model(), classification_data(n=12)
    task = fi.task_from_functions(_loss("sum"), lambda batch, model: F.cross_entropy(model(batch[0]), batch[1]))
    factors = fi.fit_factors(model, task, data, strategy="diagonal", progress=False)
    with pytest.raises(InfluenceError, match=r"(?s)measurement.*mean over the batch's examples.*\.sum\(\)"):
        fi.pairwise_scores(model, task, factors, data, data, batch_size=4, progress=False)


class TokenTagger(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(9, 4), nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


class TokenMean(fi.Task):
    """Cross-entropy averaged over the unpadded tokens of the batch: a mean over tokens."""

    def compute_train_loss(self, batch, model, sample=False):
        ids, mask, labels = batch
        losses = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), reduction="none")
        return (losses * mask.flatten()).sum() / mask.sum()

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def get_attention_mask(self, batch):
        return batch[1]


def test_a_mean_over_the_tokens_of_the_batch_is_refused():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(6, 5, dtype=torch.float64)
    mask[0, 2:], mask[1, 4:], mask[2, 1:] = 0, 0, 0  # 7 and 15 tokens in the halves: no mean over examples
    data = TensorDataset(torch.randint(0, 9, (6, 5), generator=g), mask, torch.randint(0, 3, (6, 5), generator=g))
    with pytest.raises(InfluenceError, match="mean over the batch's tokens"):
        fi.fit_factors(TokenTagger().double().eval(), TokenMean(), data, strategy="diagonal", batch_size=6,
                       use_empirical_fisher=True, progress=False)


def test_a_loss_that_couples_the_examples_is_warned_about_once():
    def coupled(batch, model, sample):  # a batch-level normalisation: each example's loss depends on the others
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits - logits.mean(0), y, reduction="sum")

    model, task, data = _model(), fi.task_from_functions(coupled), classification_data(n=12)
    with pytest.warns(InfluenceWarning, match="not a sum over the batch's examples"):
        fi.fit_factors(model, task, data, strategy="diagonal", batch_size=6, use_empirical_fisher=True,
                       progress=False)
    with warnings.catch_warnings():  # checked once per model, task and objective
        warnings.simplefilter("error")
        fi.fit_factors(model, task, data, strategy="diagonal", batch_size=6, use_empirical_fisher=True,
                       progress=False)


class Texts(Dataset):
    """Examples with a string field: such a batch is not split, so it is not checked."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return {"x": x, "y": y, "text": f"example {i}"}


def test_batches_that_do_not_split_safely_and_single_examples_are_not_checked():
    def mean_of_dict(batch, model, sample):
        return F.cross_entropy(model(batch["x"]), batch["y"])

    task = fi.task_from_functions(mean_of_dict)
    fi.fit_factors(_model(), task, Texts(classification_data(n=6)), strategy="diagonal", batch_size=3,
                   use_empirical_fisher=True, progress=False)
    fi.fit_factors(_model(), fi.task_from_functions(_loss("mean")), classification_data(n=3), strategy="diagonal",
                   batch_size=1, use_empirical_fisher=True, progress=False)


def test_the_check_costs_one_forward_pass_over_the_first_batch():
    calls = []

    def counted(batch, model, sample):
        calls.append(batch[0].shape[0])
        return _loss("sum")(batch, model, sample)

    fi.fit_factors(_model(), fi.task_from_functions(counted), classification_data(n=8), strategy="identity",
                   batch_size=8, use_empirical_fisher=True, progress=False)
    # discovery (8), the exactness check (8, 8), the halves (4, 4); identity fits without a pass over the data
    assert sorted(calls) == [4, 4, 8, 8, 8]


# -- factors of another model --------------------------------------------------------------------------

def test_factors_of_another_model_of_the_same_shape_are_refused():
    data, task = classification_data(n=12), ClassificationTask()
    factors = fi.fit_factors(_model(0), task, data, strategy="ekfac", progress=False)
    other = _model(1)
    with pytest.raises(InfluenceError, match=r"(?s)fitted on other weights.*0\.weight.*factors\.for_model\(model\)"):
        fi.pairwise_scores(other, task, factors, data, data, progress=False)
    with pytest.raises(InfluenceError, match="fitted on other weights"):
        fi.self_scores(other, task, factors, data, progress=False)
    with pytest.raises(InfluenceError, match="fitted on other weights"):
        fi.query_gradients(other, task, factors, data, progress=False)
    rebound = factors.for_model(other)
    assert torch.isfinite(fi.pairwise_scores(other, task, rebound, data, data, progress=False)).all()
    fi.pairwise_scores(_model(0), task, factors, data, data, progress=False)  # the same weights, another object


def test_a_changed_weight_is_noticed_and_the_same_weights_in_float64_are_not():
    data, task = classification_data(n=12), ClassificationTask()
    model = _model(0)
    factors = fi.fit_factors(model, task, data, strategy="diagonal", progress=False)
    with torch.no_grad():
        model[2].weight[0, 0] += 1e-6
    with pytest.raises(InfluenceError, match=r"\['2\.weight'\] differ"):
        fi.self_scores(model, task, factors, data, progress=False)
    torch.manual_seed(0)
    single = mlp().eval()
    factors = fi.fit_factors(single, task, classification_data(n=12, dtype=torch.float32), strategy="diagonal",
                             progress=False)
    fi.self_scores(single.double(), task, factors.to(dtype=torch.float64), data, progress=False)


def test_the_fingerprint_survives_save_and_load_and_fit_stores_and_old_stores_check_nothing(tmp_path):
    data, task = classification_data(n=12), ClassificationTask()
    factors = fi.fit_factors(_model(0), task, data, strategy="ekfac", progress=False)
    assert factors.weights_fingerprint is not None
    factors.save(tmp_path / "saved")
    loaded = fi.Factors.load(tmp_path / "saved")
    assert loaded.weights_fingerprint == factors.weights_fingerprint
    stored = fi.fit_factors(_model(0), task, data, strategy="ekfac", progress=False, store=tmp_path / "fit")
    assert stored.weights_fingerprint == factors.weights_fingerprint
    assert fi.Factors.load(tmp_path / "fit").weights_fingerprint == factors.weights_fingerprint
    with pytest.raises(InfluenceError, match="fitted on other weights"):
        fi.self_scores(_model(1), task, fi.Factors.load(tmp_path / "fit"), data, progress=False)
    meta = tmp_path / "saved" / "zarr.json"  # a store written before the fingerprint was kept
    record = json.loads(meta.read_text())
    del record["attributes"]["fninfluence"]["weights"]
    meta.write_text(json.dumps(record))
    old = fi.Factors.load(tmp_path / "saved")
    assert old.weights_fingerprint is None
    fi.self_scores(_model(1), task, old, data, progress=False)


# -- messages name the keyword ---------------------------------------------------------------------------

def test_loading_a_custom_strategy_without_its_estimator_names_the_keyword(tmp_path):
    mine = fi.diagonal._replace(name="mine")
    data, task = classification_data(n=12), ClassificationTask()
    fi.fit_factors(_model(), task, data, strategy=mine, progress=False).save(tmp_path / "f")
    with pytest.raises(InfluenceError, match=r"custom strategy 'mine'.*estimator=.*Factors\.load\("):
        fi.Factors.load(tmp_path / "f")
    assert fi.Factors.load(tmp_path / "f", estimator=mine).strategy == "mine"
    with pytest.raises(InfluenceError, match=r"Unknown strategy 'ekafc'.*strategy=my_estimator"):
        fi.fit_factors(_model(), task, data, strategy="ekafc", progress=False)


# -- torch's vmap errors ----------------------------------------------------------------------------------

class Branchy(nn.Module):
    """Reads a tensor's value in Python: fine on a batch, impossible under vmap."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.norm, self.head = nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.fc(x)
        if bool((h > 0).all()):
            h = 2 * h
        return self.head(self.norm(h))


@pytest.mark.parametrize("how", ["per_example_vmap", "parameter_layer"])
def test_vmap_failures_name_the_module_and_a_way_out(how):
    per_example = how == "per_example_vmap"
    task = ClassificationTask(None if per_example else ["fc", "norm", "head"])
    model, data = Branchy().double().eval(), classification_data(n=6)
    with pytest.raises(InfluenceError) as raised:
        fi.fit_factors(model, task, data, strategy="diagonal", per_example_vmap=per_example,
                       use_empirical_fisher=True, progress=False)
    message = str(raised.value)
    assert "module '' (Branchy)" not in message and "(Branchy)" in message
    assert "reads a tensor's value in Python" in message
    assert ("Drop per_example_vmap=True" in message) == per_example
    assert ("Leave ['norm'] out of Task.tracked_modules()" in message) != per_example
    assert isinstance(raised.value.__cause__, RuntimeError) and "vmap" in str(raised.value.__cause__)
    fi.fit_factors(model, ClassificationTask(["fc", "head"]), data, strategy="diagonal", use_empirical_fisher=True,
                   progress=False)  # the way out: no vmap


def _bert():
    transformers = pytest.importorskip("transformers")  # a test dependency: pip install ".[test]"
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                     vocab_size=40, max_position_embeddings=16, num_labels=3,
                                     attn_implementation="eager")
    return transformers.BertForSequenceClassification(config).double().eval()


class Bert(fi.Task):
    def __init__(self, modules=None, four_d=False):
        self.modules, self.four_d = modules, four_d

    def compute_train_loss(self, batch, model, sample=False):
        ids, mask, labels = batch
        if self.four_d:  # used as it is: no data-dependent check of the mask in transformers
            mask = (1.0 - mask[:, None, None, :].to(torch.float64)) * torch.finfo(torch.float64).min
        return F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def tracked_modules(self):
        return self.modules

    def get_attention_mask(self, batch):
        return batch[1]


def _sentences(n=6):
    g = torch.Generator().manual_seed(0)
    ids, mask = torch.randint(1, 40, (n, 8), generator=g), torch.ones(n, 8, dtype=torch.long)
    for i, length in enumerate([8, 5, 8, 3, 6, 8][:n]):
        ids[i, length:], mask[i, length:] = 0, 0
    return TensorDataset(ids, mask, torch.randint(0, 3, (n,), generator=g))


def test_a_tracked_bert_layernorm_with_an_attention_mask_is_explained_and_a_4d_mask_works():
    model, data = _bert(), _sentences()
    layers = ["bert.encoder.layer.0.output.LayerNorm", "classifier"]
    for task, options in ((Bert(layers), {}), (Bert(), {"per_example_vmap": True})):
        factors = fi.fit_factors(model, task, data, strategy="identity", progress=False, **options)
        with pytest.raises(InfluenceError, match=r"(?s)module 'bert' \(BertModel\).*masking_utils.*4-D float mask"):
            fi.pairwise_scores(model, task, factors, data, data, progress=False, **options)
    plain = Bert()
    expected = fi.pairwise_scores(model, plain, fi.fit_factors(model, plain, data, strategy="ekfac",
                                                               use_empirical_fisher=True, progress=False),
                                  data, data, progress=False)
    for task, options in ((Bert(layers, four_d=True), {}), (Bert(four_d=True), {"per_example_vmap": True})):
        factors = fi.fit_factors(model, task, data, strategy="ekfac", use_empirical_fisher=True, progress=False,
                                 **options)
        scores = fi.pairwise_scores(model, task, factors, data, data, progress=False, **options)
        assert torch.isfinite(scores).all()
        if not task.modules:
            torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-9)


# -- Ctrl-C during a stored run ----------------------------------------------------------------------------

class InterruptAt(Dataset):
    """Raises KeyboardInterrupt when example ``at`` is read (a user pressing Ctrl-C mid-pass)."""

    def __init__(self, data, at):
        self.data, self.at = data, at

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if self.at is not None and i == self.at:
            raise KeyboardInterrupt
        return self.data[i]


@pytest.mark.parametrize("kind", ["factors", "pairwise"])
def test_ctrl_c_in_a_stored_run_says_what_is_kept_and_the_rerun_resumes(kind, tmp_path):
    model, data, task = _model(), classification_data(n=18), ClassificationTask()
    store = tmp_path / kind

    def run(train, where=store):
        if kind == "factors":
            return fi.fit_factors(model, task, train, strategy="ekfac", use_empirical_fisher=True, batch_size=3,
                                  store=where, data_partitions=3, progress=False)
        factors = fi.fit_factors(model, task, data, strategy="ekfac", use_empirical_fisher=True, progress=False)
        return fi.pairwise_scores(model, task, factors, Subset(data, range(4)), train, batch_size=3, store=where,
                                  data_partitions=3, progress=False)

    with pytest.raises(KeyboardInterrupt) as raised:
        run(InterruptAt(data, at=13))  # in the third data partition of the first pass
    assert isinstance(raised.value, Interrupted) and raised.value.__suppress_context__
    total = 6 if kind == "factors" else 3
    assert f"keeps 2 of {total} cells" in str(raised.value) and str(store) in str(raised.value)
    assert "Run the same call again to resume" in str(raised.value)
    resumed = run(InterruptAt(data, at=None))
    expected = run(data, tmp_path / "uninterrupted")
    if kind == "factors":
        for layer in expected.tensors:
            for name, value in expected[layer].items():
                assert torch.equal(resumed[layer][name], value)
    else:
        assert torch.equal(resumed, expected)


def test_ctrl_c_without_a_store_is_left_alone():
    with pytest.raises(KeyboardInterrupt) as raised:
        fi.fit_factors(_model(), ClassificationTask(), InterruptAt(classification_data(n=6), at=4), batch_size=2,
                       strategy="diagonal", use_empirical_fisher=True, progress=False)
    assert not isinstance(raised.value, Interrupted)


def test_a_graph_break_under_compile_is_explained_with_the_way_out():
    model, data = Branchy().double().eval(), classification_data(n=6)
    expected = r"(?s)torch\.compile cannot compile.*tensor's value.*compile=False"
    with pytest.raises(InfluenceError, match=expected) as raised:
        fi.fit_factors(model, ClassificationTask(["fc", "head"]), data, strategy="diagonal", use_empirical_fisher=True,
                       progress=False, compile=True)
    assert type(raised.value.__cause__).__module__.startswith("torch._dynamo")
