"""The Kronfluence-compatible layer (fninfluence.compat.kronfluence) against Kronfluence 1.0.1 itself.

Parity runs both libraries through their Analyzer with the same arguments (float64, empirical Fisher) and
compares scores and loaded factors; the other tests check the API surface, a script written from
Kronfluence's documentation, argument checks on rerun, name validation and the staged / partitioned paths.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import re

import pytest
import torch
from torch.utils.data import Subset

from fninfluence.compat import kronfluence as compat
from fninfluence.errors import InfluenceError
from models import ClassificationTask, LMTask, TinyTransformerLM, classification_data, float64, mlp, sequence_data

kf_analyzer = pytest.importorskip("kronfluence.analyzer")
import kronfluence.arguments as kf_arguments  # noqa: E402
import kronfluence.task as kf_task  # noqa: E402
import kronfluence.utils.dataset as kf_dataset  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(autouse=True, scope="module")
def _kronfluence_without_gc():
    """Kronfluence calls gc.collect() (and torch.compiler.reset()) around every stage to free memory, which
    takes most of its time on these tiny models; skipping it changes no number."""
    import kronfluence.computer.computer as kf_computer
    import kronfluence.factor.eigen as kf_eigen

    with pytest.MonkeyPatch.context() as patch:
        for module in (kf_computer, kf_eigen):
            patch.setattr(module, "release_memory", lambda: None)
        yield

W = torch.float64
WIDE_FACTORS = dict(use_empirical_fisher=True, activation_covariance_dtype=W, gradient_covariance_dtype=W,
                    eigendecomposition_dtype=W, per_sample_gradient_dtype=W, lambda_dtype=W)
WIDE_SCORES = dict(per_sample_gradient_dtype=W, precondition_dtype=W, score_dtype=W, query_gradient_svd_dtype=W)
TOLERANCE = 1e-7
MEASURED = {}  # name -> max relative error, printed at the end of the module (pytest -s)


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    scale = theirs.abs().max()
    return float((ours.to(theirs.dtype) - theirs).abs().max() / scale) if scale > 0 else float(ours.abs().max())


def flat(d: dict) -> dict:
    """``{factor: {module: tensor}}`` -> ``{"factor/module": tensor}``; score dicts stay as they are."""
    return {f"{k}/{m}": t for k, v in d.items() for m, t in v.items()} if any(isinstance(v, dict) for v in d.values()) \
        else d


def assert_close_dicts(name: str, ours: dict, theirs: dict, tolerance: float = TOLERANCE) -> None:
    ours, theirs = flat(ours), flat(theirs)
    assert sorted(ours) == sorted(theirs), (list(ours), list(theirs))  # Kronfluence's loaded keys are sorted
    worst = max(relative_error(ours[k], theirs[k]) for k in theirs)
    MEASURED[name] = max(worst, MEASURED.get(name, 0.0))
    assert worst <= tolerance, f"{name}: relative error {worst:.3g}"


class Adapter(kf_task.Task):
    """One of the test tasks (tests/models.py) as a Kronfluence Task."""

    def __init__(self, task):
        self.task = task

    def compute_train_loss(self, batch, model, sample=False):
        return self.task.compute_train_loss(batch, model, sample=sample)

    def compute_measurement(self, batch, model):
        return self.task.compute_measurement(batch, model)

    def get_influence_tracked_modules(self):
        return self.task.get_influence_tracked_modules()

    def get_attention_mask(self, batch):
        return self.task.get_attention_mask(batch)


class Both:
    """The same model, task and data behind a real Kronfluence Analyzer and a compat Analyzer."""

    def __init__(self, model, task, train, root, batch_size=8):
        self.train, self.batch_size = train, batch_size
        self.queries = Subset(train, range(5))
        kron_task = Adapter(task)
        self.theirs = kf_analyzer.Analyzer(
            "kron", kf_analyzer.prepare_model(copy.deepcopy(model), kron_task), kron_task, cpu=True,
            disable_tqdm=True, output_dir=str(root / "kronfluence"), log_level=logging.ERROR)
        self.ours = compat.Analyzer("ours", compat.prepare_model(copy.deepcopy(model), task), task, cpu=True,
                                    disable_tqdm=True, output_dir=str(root / "compat"))

    def fit(self, name, strategy, ours_only=None, **factor_fields):
        kwargs = dict(per_device_batch_size=self.batch_size)
        self.theirs.fit_all_factors(name, self.train, factor_args=kf_arguments.FactorArguments(
            strategy=strategy, **WIDE_FACTORS, **factor_fields), **kwargs)
        ours_fields = dict(factor_fields, **(ours_only or {}))
        self.ours.fit_all_factors(name, self.train, factor_args=compat.FactorArguments(
            strategy=strategy, **WIDE_FACTORS, **ours_fields), **kwargs)

    def pairwise(self, scores_name, factors_name, ours_only=None, call=None, **score_fields):
        call = dict(dict(per_device_query_batch_size=5, per_device_train_batch_size=8), **(call or {}))
        self.theirs.compute_pairwise_scores(scores_name, factors_name, self.queries, self.train,
                                            score_args=kf_arguments.ScoreArguments(**WIDE_SCORES, **score_fields),
                                            **call)
        ours = self.ours.compute_pairwise_scores(scores_name, factors_name, self.queries, self.train,
                                                 score_args=compat.ScoreArguments(**WIDE_SCORES, **score_fields,
                                                                                  **(ours_only or {})), **call)
        assert_same_dict(ours, self.ours.load_pairwise_scores(scores_name))
        return ours, self.theirs.load_pairwise_scores(scores_name)

    def self_scores(self, scores_name, factors_name, ours_only=None, call=None, **score_fields):
        call = dict(dict(per_device_train_batch_size=8), **(call or {}))
        self.theirs.compute_self_scores(scores_name, factors_name, self.train,
                                        score_args=kf_arguments.ScoreArguments(**WIDE_SCORES, **score_fields), **call)
        ours = self.ours.compute_self_scores(scores_name, factors_name, self.train,
                                             score_args=compat.ScoreArguments(**WIDE_SCORES, **score_fields,
                                                                              **(ours_only or {})), **call)
        assert_same_dict(ours, self.ours.load_self_scores(scores_name))
        return ours, self.theirs.load_self_scores(scores_name)


def assert_same_dict(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key])


WORKLOADS = {
    "mlp": lambda: (float64(mlp()), ClassificationTask(), classification_data()),
    "transformer": lambda: (float64(TinyTransformerLM()), LMTask(), sequence_data()),
}
STRATEGIES = ["identity", "diagonal", "kfac", "ekfac"]
DAMPING = {"identity": None, "diagonal": None, "kfac": None, "ekfac": 1e-3}


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """One lazily filled ``Both`` per workload, with factors for every strategy fitted once."""
    cache = {}

    def get(workload):
        if workload not in cache:
            model, task, train = WORKLOADS[workload]()
            cache[workload] = pair = Both(model, task, train, tmp_path_factory.mktemp(workload))
            for strategy in STRATEGIES:
                pair.fit(strategy, strategy)
        return cache[workload]

    yield get
    if MEASURED:
        print("\nmax relative error vs Kronfluence 1.0.1:")
        for name, value in sorted(MEASURED.items()):
            print(f"  {name:55s} {value:.2e}")


# -- (1) parity --------------------------------------------------------------------------------------

@pytest.mark.parity
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_scores_match_kronfluence(both, workload, strategy):
    pair = both(workload)
    ours, theirs = pair.pairwise(f"p-{strategy}", strategy, damping_factor=DAMPING[strategy])
    assert ours["all_modules"].shape == (5, len(pair.train)) and ours["all_modules"].dtype == W
    assert_close_dicts(f"{workload} {strategy} pairwise", ours, theirs)
    ours, theirs = pair.self_scores(f"s-{strategy}", strategy, damping_factor=DAMPING[strategy])
    assert_close_dicts(f"{workload} {strategy} self", ours, theirs)


PAIRWISE_OPTIONS = {
    "compute_per_module_scores": dict(compute_per_module_scores=True),
    "aggregate_query_gradients": dict(aggregate_query_gradients=True),
    "aggregate_train_gradients": dict(aggregate_train_gradients=True),
    "both_aggregations": dict(aggregate_query_gradients=True, aggregate_train_gradients=True),
    "low_rank_full_svd": dict(query_gradient_low_rank=2, use_full_svd=True),
    "query_gradient_accumulation_steps": dict(query_gradient_accumulation_steps=2),
    "damping_heuristic": dict(damping_factor=None),
}
CALLS = {"query_gradient_accumulation_steps": dict(per_device_query_batch_size=2)}


@pytest.mark.parity
@pytest.mark.parametrize("option", sorted(PAIRWISE_OPTIONS))
def test_pairwise_options_match_kronfluence(both, option):
    fields = dict(dict(damping_factor=1e-3), **PAIRWISE_OPTIONS[option])
    ours, theirs = both("mlp").pairwise(f"p-{option}", "ekfac", call=CALLS.get(option), **fields)
    expected_shape = (1 if fields.get("aggregate_query_gradients") else 5,
                      1 if fields.get("aggregate_train_gradients") else 24)
    assert all(v.shape == expected_shape for v in ours.values())
    if option == "compute_per_module_scores":
        assert list(ours) == ["0", "2"]
    assert_close_dicts(f"mlp ekfac pairwise {option}", ours, theirs)


@pytest.mark.parity
def test_indices_match_kronfluence(both):
    pair = both("mlp")
    call = dict(query_indices=[4, 1, 3], train_indices=[0, 3, 5, 8, 11, 20, 2])
    ours, theirs = pair.pairwise("p-indices", "ekfac", call=call, damping_factor=1e-3)
    assert ours["all_modules"].shape == (3, 7)
    assert_close_dicts("mlp ekfac pairwise query/train_indices", ours, theirs)
    ours, theirs = pair.self_scores("s-indices", "ekfac", call=dict(train_indices=[0, 3, 5, 8]), damping_factor=1e-3)
    assert ours["all_modules"].shape == (4,)
    assert_close_dicts("mlp ekfac self train_indices", ours, theirs)


@pytest.mark.parity
@pytest.mark.parametrize("option", ["use_measurement_for_self_influence", "compute_per_module_scores"])
def test_self_options_match_kronfluence(both, option):
    ours, theirs = both("mlp").self_scores(f"s-{option}", "ekfac", damping_factor=1e-3, **{option: True})
    assert_close_dicts(f"mlp ekfac self {option}", ours, theirs)


@pytest.mark.parity
def test_max_examples_match_kronfluence(both):
    pair = both("mlp")
    pair.fit("maxed", "ekfac", covariance_max_examples=10, lambda_max_examples=15)
    assert int(pair.ours.load_covariance_matrices("maxed")["num_activation_covariance_processed"]["0"]) == 10
    assert int(pair.ours.load_lambda_matrices("maxed")["num_lambda_processed"]["0"]) == 15
    ours, theirs = pair.pairwise("p-maxed", "maxed", damping_factor=1e-3)
    assert_close_dicts("mlp ekfac pairwise covariance/lambda_max_examples", ours, theirs)


@pytest.mark.parity
def test_partitions_match_unpartitioned_kronfluence(both):
    """Ours with data x module partitions for both passes and the scores; Kronfluence without."""
    pair = both("mlp")
    partitions = dict(covariance_data_partitions=3, covariance_module_partitions=2, lambda_data_partitions=5,
                      lambda_module_partitions=2)
    pair.fit("parted", "ekfac", ours_only=partitions)
    for load in ("load_covariance_matrices", "load_lambda_matrices"):
        assert_close_dicts(f"mlp ekfac {load} with partitions", getattr(pair.ours, load)("parted"),
                           getattr(pair.theirs, load)("ekfac"), 1e-12)
    score_partitions = dict(data_partitions=3, module_partitions=2)
    ours, theirs = pair.pairwise("p-parted", "parted", ours_only=score_partitions, damping_factor=1e-3)
    assert_close_dicts("mlp ekfac pairwise with partitions", ours, theirs)
    ours, theirs = pair.self_scores("s-parted", "parted", ours_only=score_partitions, damping_factor=1e-3)
    assert_close_dicts("mlp ekfac self with partitions", ours, theirs)


@pytest.mark.parity
def test_per_token_scores_match_kronfluence(both):
    pair = both("transformer")
    ours, theirs = pair.pairwise("p-tokens", "ekfac", damping_factor=1e-3, compute_per_token_scores=True)
    assert ours["all_modules"].shape == (5, 10, 6)
    assert_close_dicts("transformer ekfac pairwise per-token", ours, theirs)
    ours, theirs = pair.pairwise("p-tokens-modules", "ekfac", damping_factor=1e-3, compute_per_token_scores=True,
                                 compute_per_module_scores=True)
    assert_close_dicts("transformer ekfac pairwise per-token per-module", ours, theirs)


# -- (5) loaded factors ----------------------------------------------------------------------------

@pytest.mark.parity
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_loaded_factors_match_kronfluence(both, strategy):
    pair = both("mlp")
    for load in ("load_covariance_matrices", "load_lambda_matrices"):
        ours, theirs = getattr(pair.ours, load)(strategy), getattr(pair.theirs, load)(strategy)
        assert (ours is None) == (theirs is None), load
        if theirs is not None:
            for name in theirs:
                assert list(ours[name]) == list(theirs[name])
                assert all(ours[name][m].shape == theirs[name][m].shape for m in theirs[name])
                assert all(ours[name][m].dtype == theirs[name][m].dtype for m in theirs[name])
            assert_close_dicts(f"mlp {strategy} {load}", ours, theirs, 1e-12)
    ours, theirs = pair.ours.load_eigendecomposition(strategy), pair.theirs.load_eigendecomposition(strategy)
    assert (ours is None) == (theirs is None)
    if theirs is not None:
        assert list(ours) == list(theirs)
        for side in ("activation", "gradient"):
            for m in theirs[f"{side}_eigenvalues"]:
                values, vectors = ours[f"{side}_eigenvalues"][m], ours[f"{side}_eigenvectors"][m]
                # eigenvectors are defined up to sign (and rotation within repeated eigenvalues): compare Q diag(l) Q^T
                rebuilt = vectors @ torch.diag(values) @ vectors.T
                expected = theirs[f"{side}_eigenvectors"][m] @ torch.diag(theirs[f"{side}_eigenvalues"][m]) \
                    @ theirs[f"{side}_eigenvectors"][m].T
                assert_close_dicts(f"mlp {strategy} load_eigendecomposition eigenvalues",
                                   {m: values}, {m: theirs[f"{side}_eigenvalues"][m]}, 1e-12)
                assert_close_dicts(f"mlp {strategy} load_eigendecomposition Q diag(l) Q^T", {m: rebuilt},
                                   {m: expected}, 1e-12)
    assert list(pair.ours.load_all_factors(strategy)) == list(pair.theirs.load_all_factors(strategy))
    args = pair.ours.load_factor_args(strategy)
    assert args.activation_covariance_dtype == torch.float64  # a dtype, where Kronfluence returns a string
    assert args.to_dict() == pair.theirs.load_factor_args(strategy).to_dict()


# -- API surface -------------------------------------------------------------------------------------

def _public_methods(cls):
    return {name for name, _ in inspect.getmembers(cls, callable) if not name.startswith("_")}


def test_analyzer_has_every_public_method_with_kronfluences_signature():
    theirs = _public_methods(kf_analyzer.Analyzer)
    assert theirs <= _public_methods(compat.Analyzer)
    for name in sorted(theirs | {"__init__"}):
        ours_params = inspect.signature(getattr(compat.Analyzer, name)).parameters
        their_params = inspect.signature(getattr(kf_analyzer.Analyzer, name)).parameters
        assert list(ours_params) == list(their_params), name
        assert [p.default for p in ours_params.values()] == [p.default for p in their_params.values()], name
    assert list(inspect.signature(compat.prepare_model).parameters) == ["model", "task"]
    assert isinstance(inspect.getattr_static(compat.Analyzer, "load_file"), staticmethod)
    assert isinstance(inspect.getattr_static(compat.Analyzer, "get_module_summary"), staticmethod)


@pytest.mark.parametrize("name", ["FactorArguments", "ScoreArguments"])
def test_arguments_have_kronfluences_fields_defaults_and_dicts(name):
    ours_cls, their_cls = getattr(compat, name), getattr(kf_arguments, name)
    assert [(f.name, f.default) for f in dataclasses.fields(ours_cls)] == \
        [(f.name, f.default) for f in dataclasses.fields(their_cls)]
    assert ours_cls().to_dict() == their_cls().to_dict()
    assert ours_cls().to_str_dict() == their_cls().to_str_dict()


def test_dataloader_kwargs_have_kronfluences_fields():
    assert [(f.name, f.default) for f in dataclasses.fields(compat.DataLoaderKwargs)] == \
        [(f.name, f.default) for f in dataclasses.fields(kf_dataset.DataLoaderKwargs)]


@pytest.mark.parametrize("cls, bad", [
    ("FactorArguments", dict(covariance_max_examples=0)), ("FactorArguments", dict(lambda_max_examples=-1)),
    ("FactorArguments", dict(covariance_data_partitions=0)), ("FactorArguments", dict(lambda_module_partitions=0)),
    ("ScoreArguments", dict(damping_factor=-1.0)), ("ScoreArguments", dict(data_partitions=0)),
    ("ScoreArguments", dict(module_partitions=0)), ("ScoreArguments", dict(query_gradient_accumulation_steps=0)),
    ("ScoreArguments", dict(query_gradient_low_rank=0)),
])
def test_arguments_validate_like_kronfluence(cls, bad):
    with pytest.raises(ValueError):
        getattr(kf_arguments, cls)(**bad)
    with pytest.raises(ValueError, match=next(iter(bad))):
        getattr(compat, cls)(**bad)


def test_arguments_map_to_native_keywords():
    factor_args = compat.FactorArguments(
        strategy="kfac", use_empirical_fisher=True, amp_dtype=torch.bfloat16, covariance_max_examples=7,
        lambda_max_examples=None, covariance_data_partitions=2, lambda_module_partitions=3,
        activation_covariance_dtype=torch.float32, gradient_covariance_dtype=torch.float64,
        per_sample_gradient_dtype="torch.float16", lambda_dtype=torch.bfloat16)
    keywords = compat._fit_keywords(factor_args)
    assert keywords["strategy"] == "kfac" and keywords["use_empirical_fisher"] is True
    # Kronfluence's default (the true Fisher) is passed on explicitly, whatever fit_factors' own default is
    assert compat._fit_keywords(compat.FactorArguments())["use_empirical_fisher"] is False
    assert keywords["max_examples"] == {"covariance": 7, "lambda": None}
    assert keywords["data_partitions"] == {"covariance": 2, "lambda": 1}
    assert keywords["module_partitions"] == {"covariance": 1, "lambda": 3}
    assert keywords["precision"] == compat.Precision(amp_dtype=torch.bfloat16, covariance_dtype=torch.float64,
                                                     lambda_dtype=torch.bfloat16,
                                                     per_sample_gradient_dtype=torch.float16)
    score_args = compat.ScoreArguments(amp_dtype=torch.float16, query_gradient_svd_dtype=torch.float64,
                                       per_sample_gradient_dtype=torch.bfloat16, precondition_dtype=torch.float64,
                                       score_dtype=torch.float16)
    assert compat._score_precision(score_args) == compat.Precision(
        amp_dtype=torch.float16, per_sample_gradient_dtype=torch.bfloat16, precondition_dtype=torch.float64,
        score_dtype=torch.float16, svd_dtype=torch.float64)


def test_prepare_model_returns_the_same_model_in_eval_mode_untouched():
    model = float64(mlp()).train()
    flags = [p.requires_grad for p in model.parameters()]
    modules = dict(model.named_modules())
    assert compat.prepare_model(model, ClassificationTask()) is model
    assert not model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert dict(model.named_modules()) == modules
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def test_prepare_model_and_analyzer_reject_bad_tasks(tmp_path):
    model = float64(mlp())
    with pytest.raises(compat.IllegalTaskConfigurationError, match="'3'"):
        compat.prepare_model(model, ClassificationTask(["0", "3"]))
    with pytest.raises(compat.IllegalTaskConfigurationError, match="Tanh"):
        compat.prepare_model(model, ClassificationTask(["1"]))

    assert compat.Task.enable_post_process_per_sample_gradient is False


# -- (2) a script written from Kronfluence's documentation --------------------------------------------

DOCUMENTED_SCRIPT = '''
from typing import Any, Dict, List, Optional, Union
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from kronfluence.task import Task
from kronfluence.analyzer import prepare_model
from kronfluence.analyzer import Analyzer
from kronfluence.utils.dataset import DataLoaderKwargs
from kronfluence.arguments import FactorArguments
from kronfluence.arguments import ScoreArguments


def construct_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def prepare_train_dataset():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    return TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(40, 1, generator=g, dtype=torch.float64))


def prepare_query_dataset():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    return TensorDataset(x, x.sum(1, keepdim=True))


# Get the model with the trained parameters.
model = construct_model()
# Get the training dataset.
train_dataset = prepare_train_dataset()
# Get the query dataset (e.g., validation/test dataset).
query_dataset = prepare_query_dataset()


class YourTask(Task):
    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        inputs, targets = batch
        outputs = model(inputs)
        if sample:
            with torch.no_grad():
                targets = outputs.detach() + torch.randn_like(outputs)
        return F.mse_loss(outputs, targets, reduction="sum")

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        inputs, targets = batch
        return F.mse_loss(model(inputs), targets, reduction="sum")

    def tracked_modules(self) -> Optional[List[str]]:
        return None  # Compute influence scores on all available modules.

    def get_attention_mask(self, batch: Any) -> Optional[Union[Dict[str, torch.Tensor], torch.Tensor]]:
        return None  # No attention mask is used.


task = YourTask()
model = prepare_model(model=model, task=task)

analyzer = Analyzer(analysis_name="model_with_seed0", model=model, task=task)

# [Optional] Set up the parameters for the DataLoader.
dataloader_kwargs = DataLoaderKwargs(num_workers=4, pin_memory=True)

# Compute all factors.
analyzer.fit_all_factors(factors_name="initial_factor", dataset=train_dataset)

factor_args = FactorArguments(
    strategy="ekfac",  # Choose from "identity", "diagonal", "kfac", or "ekfac".
    use_empirical_fisher=True,
)

# Fitting covariance matrices.
analyzer.fit_covariance_matrices(factors_name="ekfac", dataset=train_dataset, factor_args=factor_args)
# Loading covariance matrices.
covariance_matrices = analyzer.load_covariance_matrices(factors_name="ekfac")

# Performing Eigendecomposition.
analyzer.perform_eigendecomposition(factors_name="ekfac", factor_args=factor_args)
# Loading Eigendecomposition results.
eigen_factors = analyzer.load_eigendecomposition(factors_name="ekfac")

# Fitting Lambda matrices.
analyzer.fit_lambda_matrices(factors_name="ekfac", dataset=train_dataset, factor_args=factor_args)
# Loading Lambda matrices.
lambda_matrices = analyzer.load_lambda_matrices(factors_name="ekfac")

score_args = ScoreArguments(damping_factor=None, score_dtype=torch.float64, precondition_dtype=torch.float64,
                            per_sample_gradient_dtype=torch.float64)

# Computing pairwise influence scores.
analyzer.compute_pairwise_scores(scores_name="pairwise", factors_name="ekfac", query_dataset=query_dataset,
                                 train_dataset=train_dataset, per_device_query_batch_size=4, score_args=score_args)
# Loading pairwise influence scores.
scores = analyzer.load_pairwise_scores(scores_name="pairwise")

# Computing self-influence scores.
analyzer.compute_self_scores(scores_name="self", factors_name="ekfac", train_dataset=train_dataset,
                             score_args=score_args)
# Loading self-influence scores.
self_scores = analyzer.load_self_scores(scores_name="self")
'''


def _run_script(source: str) -> dict:
    namespace: dict = {"__name__": "documented_script"}
    exec(compile(source, "documented_script", "exec"), namespace)
    return namespace


def test_documented_script_runs_unchanged_but_for_its_imports(tmp_path, monkeypatch):
    ours_source = re.sub(r"^from kronfluence\.[\w.]+ import", "from fninfluence.compat.kronfluence import",
                         DOCUMENTED_SCRIPT, flags=re.MULTILINE)
    assert ours_source.count("fninfluence.compat.kronfluence") == 6 and "import kronfluence" not in ours_source
    assert [line for line in ours_source.splitlines() if "import" not in line] == \
        [line for line in DOCUMENTED_SCRIPT.splitlines() if "import" not in line]
    (tmp_path / "kronfluence").mkdir()
    monkeypatch.chdir(tmp_path / "kronfluence")
    theirs = _run_script(DOCUMENTED_SCRIPT)
    (tmp_path / "ours").mkdir()
    monkeypatch.chdir(tmp_path / "ours")
    ours = _run_script(ours_source)
    assert (tmp_path / "ours" / "influence_results" / "model_with_seed0" / "scores_pairwise").is_dir()
    assert ours["scores"]["all_modules"].shape == (6, 40) and ours["self_scores"]["all_modules"].shape == (40,)
    for name in ("scores", "self_scores", "covariance_matrices", "lambda_matrices"):
        # float32 covariances and Lambda (the documented defaults) in both; scores in float64
        assert_close_dicts(f"documented script {name}", ours[name], theirs[name], 1e-4)
    assert ours["analyzer"].load_factor_args("ekfac").strategy == "ekfac"


# -- (3) reruns, (4) names -------------------------------------------------------------------------

@pytest.fixture
def analyzer(tmp_path):
    task = ClassificationTask()
    return compat.Analyzer("rerun", compat.prepare_model(float64(mlp()), task), task, cpu=True, disable_tqdm=True,
                           output_dir=str(tmp_path))


def test_rerun_with_other_arguments_is_an_error_and_overwrite_recomputes(analyzer):
    train = classification_data()
    queries = Subset(train, range(3))
    args = compat.FactorArguments(strategy="ekfac", **WIDE_FACTORS)
    analyzer.fit_all_factors("f", train, per_device_batch_size=8, factor_args=args)
    analyzer.fit_all_factors("f", train, per_device_batch_size=5, factor_args=args)  # same arguments: fine
    with pytest.raises(ValueError, match=r"lambda_dtype: 'torch.float64' \(saved\) vs 'torch.float32' \(now\)"):
        analyzer.fit_all_factors("f", train, factor_args=dataclasses.replace(args, lambda_dtype=torch.float32))
    with pytest.raises(ValueError, match="covariance_max_examples"):
        analyzer.fit_covariance_matrices("f", train, factor_args=dataclasses.replace(args, covariance_max_examples=5))

    first = analyzer.compute_pairwise_scores("s", "f", queries, train, per_device_query_batch_size=2,
                                             score_args=compat.ScoreArguments(damping_factor=1e-3, **WIDE_SCORES))
    again = analyzer.compute_pairwise_scores("s", "f", queries, train, per_device_query_batch_size=3,
                                             score_args=compat.ScoreArguments(damping_factor=1e-3, **WIDE_SCORES))
    assert torch.equal(first["all_modules"], again["all_modules"])
    other = compat.ScoreArguments(damping_factor=0.5, **WIDE_SCORES)
    with pytest.raises(ValueError, match=r"damping_factor: 0\.001 \(saved\) vs 0\.5 \(now\)"):
        analyzer.compute_pairwise_scores("s", "f", queries, train, per_device_query_batch_size=2, score_args=other)
    with pytest.raises(InfluenceError, match="train_data"):  # other data: the native store's fingerprint check
        analyzer.compute_pairwise_scores("s", "f", queries, Subset(train, range(20)), per_device_query_batch_size=2,
                                         score_args=compat.ScoreArguments(damping_factor=1e-3, **WIDE_SCORES))
    recomputed = analyzer.compute_pairwise_scores("s", "f", queries, train, per_device_query_batch_size=2,
                                                  score_args=other, overwrite_output_dir=True)
    assert not torch.allclose(recomputed["all_modules"], first["all_modules"])
    assert analyzer.load_score_args("s").damping_factor == 0.5
    assert torch.equal(analyzer.load_pairwise_scores("s")["all_modules"], recomputed["all_modules"])
    with pytest.raises(ValueError, match="pairwise scores, not self scores"):
        analyzer.compute_self_scores("s", "f", train, score_args=other)

    # refitting the factors with other arguments, then the scores that used them
    analyzer.fit_all_factors("f", train, factor_args=dataclasses.replace(args, covariance_max_examples=12),
                             overwrite_output_dir=True)
    assert int(analyzer.load_covariance_matrices("f")["num_activation_covariance_processed"]["0"]) == 12
    with pytest.raises(ValueError, match="covariance_max_examples"):
        analyzer.compute_pairwise_scores("s", "f", queries, train, per_device_query_batch_size=2, score_args=other)


@pytest.mark.parametrize("bad", ["../evil", "a/b", "/tmp/evil", "..", "", ".hidden", "x" * 200])
def test_names_that_could_escape_the_output_directory_are_rejected(tmp_path, bad):
    task = ClassificationTask()
    model = float64(mlp())
    root = tmp_path / "results"
    with pytest.raises(InfluenceError, match="not allowed"):
        compat.Analyzer(bad, model, task, cpu=True, output_dir=str(root))
    analyzer = compat.Analyzer("ok", model, task, cpu=True, disable_tqdm=True, output_dir=str(root))
    train = classification_data()
    for call in (lambda: analyzer.fit_all_factors(bad, train),
                 lambda: analyzer.fit_covariance_matrices(bad, train),
                 lambda: analyzer.perform_eigendecomposition(bad),
                 lambda: analyzer.load_all_factors(bad),
                 lambda: analyzer.compute_self_scores(bad, "f", train),
                 lambda: analyzer.load_pairwise_scores(bad),
                 lambda: analyzer.factors_output_dir(bad),
                 lambda: analyzer.scores_output_dir(bad)):
        with pytest.raises(InfluenceError, match="not allowed"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    assert [p.name for p in root.iterdir()] == ["ok"]


# -- staged fitting, targets, load_from_factors_name, loaders ----------------------------------------

def test_stages_targets_and_load_from_factors_name(analyzer):
    train = classification_data()
    queries = Subset(train, range(3))
    args = compat.FactorArguments(strategy="ekfac", **WIDE_FACTORS)
    score_args = compat.ScoreArguments(damping_factor=1e-3, **WIDE_SCORES)
    analyzer.fit_all_factors("all", train, per_device_batch_size=6, factor_args=args)
    expected = analyzer.compute_pairwise_scores("p-all", "all", queries, train, per_device_query_batch_size=3,
                                                score_args=score_args)["all_modules"]

    # the three stages, with targets: incomplete until every partition is done
    staged = dataclasses.replace(args, covariance_data_partitions=2, lambda_data_partitions=3)
    with pytest.raises(compat.FactorsNotFoundError, match="fit_covariance_matrices"):
        analyzer.perform_eigendecomposition("staged", factor_args=staged)
    analyzer.fit_covariance_matrices("staged", train, per_device_batch_size=6, factor_args=staged,
                                     target_data_partitions=0)
    assert analyzer.load_covariance_matrices("staged") is None
    with pytest.raises(compat.FactorsNotFoundError):
        analyzer.fit_lambda_matrices("staged", train, factor_args=staged)
    analyzer.fit_covariance_matrices("staged", train, per_device_batch_size=6, factor_args=staged,
                                     target_data_partitions=[1])
    analyzer.aggregate_covariance_matrices("staged")
    analyzer.perform_eigendecomposition("staged", factor_args=staged)
    assert analyzer.load_eigendecomposition("staged") is not None
    analyzer.fit_lambda_matrices("staged", train, per_device_batch_size=6, factor_args=staged,
                                 target_data_partitions=[0, 2])
    with pytest.raises(compat.FactorsNotFoundError):
        analyzer.load_all_factors("staged")
    with pytest.raises(ValueError, match="not partitioned"):
        analyzer.fit_lambda_matrices("staged", train, factor_args=args, target_data_partitions=[1],
                                     overwrite_output_dir=True)
    analyzer.fit_lambda_matrices("staged", train, per_device_batch_size=6, factor_args=staged)
    staged_scores = analyzer.compute_pairwise_scores("p-staged", "staged", queries, train,
                                                     per_device_query_batch_size=3, score_args=score_args)
    assert relative_error(staged_scores["all_modules"], expected) <= 1e-12

    # score targets
    parted = dataclasses.replace(score_args, data_partitions=2)
    assert analyzer.compute_self_scores("s-parted", "all", train, score_args=parted, target_data_partitions=[1]) is None
    assert analyzer.load_self_scores("s-parted") is None
    full = analyzer.compute_self_scores("s-parted", "all", train, score_args=parted)
    assert torch.equal(full["all_modules"], analyzer.load_self_scores("s-parted")["all_modules"])

    # Lambda on a copy of another factors' covariance
    analyzer.perform_eigendecomposition("copied", factor_args=args, load_from_factors_name="all")
    assert_close_dicts("load_from_factors_name covariance", analyzer.load_covariance_matrices("copied")["activation_covariance"],
                       analyzer.load_covariance_matrices("all")["activation_covariance"], 0.0)
    assert analyzer.load_lambda_matrices("copied") is None
    analyzer.fit_lambda_matrices("copied", train, per_device_batch_size=5, factor_args=args)
    copied = analyzer.compute_pairwise_scores("p-copied", "copied", queries, train, per_device_query_batch_size=3,
                                              score_args=score_args)["all_modules"]
    assert relative_error(copied, expected) <= 1e-12
    with pytest.raises(ValueError, match="lambda_max_examples"):
        analyzer.fit_lambda_matrices("other", train, factor_args=dataclasses.replace(args, lambda_max_examples=3),
                                     load_from_factors_name="all")
    # overwriting the Lambda pass only keeps the covariance pass
    analyzer.fit_lambda_matrices("copied", train, per_device_batch_size=7, factor_args=args, overwrite_output_dir=True)
    assert analyzer.load_lambda_matrices("copied") is not None
    assert analyzer.load_factor_args("copied") == args


def test_loaders_files_summary_and_dataloader_kwargs(analyzer, caplog):
    train = classification_data()
    analyzer.fit_all_factors("id", train, factor_args=compat.FactorArguments(strategy="identity"))
    assert analyzer.load_all_factors("id") == {}
    assert analyzer.load_covariance_matrices("id") is None and analyzer.load_lambda_matrices("id") is None
    with pytest.raises(FileNotFoundError):
        analyzer.load_all_factors("missing")
    with pytest.raises(compat.FactorsNotFoundError):
        analyzer.compute_self_scores("s", "missing", train)
    assert analyzer.load_factor_args("missing") is None and analyzer.load_pairwise_scores("missing") is None

    # batches built by a collate_fn from DataLoaderKwargs (dict batches)
    class DictTask(ClassificationTask):
        def compute_train_loss(self, batch, model, sample=False):
            return super().compute_train_loss((batch["x"], batch["y"]), model, sample)

        def compute_measurement(self, batch, model):
            return super().compute_measurement((batch["x"], batch["y"]), model)

    collate = lambda items: {"x": torch.stack([i[0] for i in items]), "y": torch.stack([i[1] for i in items])}
    dict_analyzer = compat.Analyzer("dicts", analyzer.model, DictTask(), cpu=True, disable_tqdm=True,
                                    output_dir=str(analyzer.output_dir.parent))
    dict_analyzer.set_dataloader_kwargs(compat.DataLoaderKwargs(collate_fn=collate))
    dict_analyzer.fit_all_factors("id", train, factor_args=compat.FactorArguments(strategy="identity"))
    with caplog.at_level(logging.WARNING, logger="fninfluence"):
        via_dicts = dict_analyzer.compute_self_scores(
            "s", "id", train, score_args=compat.ScoreArguments(query_gradient_low_rank=4, **WIDE_SCORES))
    assert "query_gradient_low_rank" in caplog.text
    plain = analyzer.compute_self_scores("s", "id", train, score_args=compat.ScoreArguments(**WIDE_SCORES))
    assert relative_error(via_dicts["all_modules"], plain["all_modules"]) <= 1e-12

    # a task written against Kronfluence's own Task class works too
    kron_style = Adapter(ClassificationTask())
    kron_analyzer = compat.Analyzer("kron-task", compat.prepare_model(analyzer.model, kron_style), kron_style, cpu=True,
                                    disable_tqdm=True, output_dir=str(analyzer.output_dir.parent))
    kron_analyzer.fit_all_factors("id", train, factor_args=compat.FactorArguments(strategy="identity"))
    assert torch.equal(kron_analyzer.compute_self_scores("s", "id", train, score_args=compat.ScoreArguments(
        **WIDE_SCORES))["all_modules"], plain["all_modules"])

    assert compat.Analyzer.get_module_summary(analyzer.model) == kf_analyzer.Analyzer.get_module_summary(analyzer.model)
    scores_dir = analyzer.scores_output_dir("s")
    assert torch.equal(compat.Analyzer.load_file(str(scores_dir))["all_modules"], plain["all_modules"])
    assert torch.equal(compat.Analyzer.load_file(scores_dir / "self_scores.safetensors")["all_modules"],
                       plain["all_modules"])
    assert torch.equal(compat.Analyzer.load_file(scores_dir / "all_modules")["all_modules"], plain["all_modules"])
    with pytest.raises(FileNotFoundError):
        compat.Analyzer.load_file(scores_dir / "nothing_here")
    analyzer.aggregate_self_scores("s")
    with pytest.raises(ValueError):
        analyzer.aggregate_pairwise_scores("never")

    # disable_model_save=False records the model and refuses another one under the same analysis
    compat.Analyzer("saved", analyzer.model, ClassificationTask(), cpu=True,
                    output_dir=str(analyzer.output_dir.parent), disable_model_save=False)
    other = float64(mlp())
    with torch.no_grad():
        other[0].weight.add_(1.0)
    with pytest.raises(ValueError, match="model differs"):
        compat.Analyzer("saved", other, ClassificationTask(), cpu=True, output_dir=str(analyzer.output_dir.parent),
                        disable_model_save=False)
