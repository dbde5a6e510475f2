"""A user's estimator is treated as the built-ins are: its passes have names of their own, and what the pipeline,
Precision and estimate_memory need comes from the passes' declarations (curvature/base.py), not from their names."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import fninfluence as fi
from fninfluence.curvature import Workspace, dense_parameter_layers, pass_order
from fninfluence.memory import estimate_memory, fit_phase_peak
from fninfluence.precision import Precision
from fninfluence.testing import check_estimator

QUIET = dict(progress=False)

# EKFAC with its passes renamed: the same functions and declarations under names the shell has never seen
RENAMED = fi.CurvatureEstimator(
    "renamed_ekfac",
    (fi.ekfac.passes[0]._replace(name="moments"), fi.ekfac.passes[1]._replace(name="scales")),
    fi.ekfac.precondition, fi.ekfac.self_score, fi.ekfac.memory)
PHASES = {"moments": "covariance", "scales": "lambda"}


def _mlp(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(20, 6, generator=g, dtype=dtype), torch.randint(0, 3, (20,), generator=g))
    return model, data, fi.classification_task()


def _assert_same_factors(actual, expected):
    assert actual.tensors.keys() == expected.tensors.keys()
    for layer, tensors in expected.tensors.items():
        assert actual.tensors[layer].keys() == tensors.keys()
        for name, value in tensors.items():
            assert actual.tensors[layer][name].dtype == value.dtype, (layer, name)
            assert torch.equal(actual.tensors[layer][name], value), (layer, name)


def test_a_user_estimator_with_passes_of_its_own_names_passes_the_suite():
    results = check_estimator(RENAMED, exact_for_one_example=True)
    assert {r.check for r in results if r.check == "meta sizes"} and all(r.passed for r in results)


@pytest.mark.parametrize("precision", [None, Precision(covariance_dtype=torch.float64,
                                                       per_sample_gradient_dtype=torch.float32)],
                         ids=["default", "covariance-float64-gradients-float32"])
def test_renamed_passes_fit_ekfacs_factors_bit_for_bit(precision):
    """The "moments" pass reads raw statistics in the covariance dtype because it says so, whatever its name."""
    model, data, task = _mlp()
    options = dict(batch_size=6, precision=precision, **QUIET)
    renamed = fi.fit_factors(model, task, data, strategy=RENAMED, **options)
    _assert_same_factors(renamed, fi.fit_factors(model, task, data, strategy="ekfac", **options))
    assert tuple(renamed.pass_names) == ("moments", "scales")


def test_the_pass_compute_dtype_follows_the_declaration():
    precision = Precision(covariance_dtype=torch.float64, per_sample_gradient_dtype=torch.float32)
    moments, scales = RENAMED.passes
    assert precision.fit_dtypes(moments, torch.float32) == (torch.float64, torch.float64)
    assert precision.fit_dtypes(scales, torch.float32) == (torch.float64, torch.float32)
    # a pass that declares nothing follows the built-ins' names, as before the declarations existed
    functions = fi.ekfac.passes[0][1:4]
    assert precision.fit_dtypes(fi.FitPass("covariance", *functions), torch.float32) == (torch.float64, torch.float64)
    assert precision.fit_dtypes(fi.FitPass("moments", *functions), torch.float32) == (torch.float64, torch.float32)
    declared = fi.FitPass("moments", *functions, raw_statistics=True)
    assert precision.fit_dtypes(declared, torch.float32) == (torch.float64, torch.float64)


def test_factor_dtypes_come_from_the_declaration_and_default_to_the_names_convention():
    precision = Precision(covariance_dtype=torch.float64, lambda_dtype=torch.bfloat16)
    moments, scales = RENAMED.passes
    assert precision.factor_dtype("activation_covariance", torch.float32, moments) == torch.float64
    # eigenvectors are kept in the dtype they are read in (the compute dtypes, float32 here), or as asked
    assert precision.factor_dtype("activation_eigenvectors", torch.float32, moments) == torch.float32
    wide = Precision(eigenvector_dtype=torch.float64, per_sample_gradient_dtype=torch.float32)
    assert wide.factor_dtype("gradient_eigenvectors", torch.float32, moments) == torch.float64
    assert Precision(precondition_dtype=torch.float64).factor_dtype("activation_eigenvectors", torch.float32,
                                                                    moments) == torch.float64
    assert precision.factor_dtype("lambda", torch.float32, scales) == torch.bfloat16
    declared = fi.FitPass("scales", *scales[1:4], factor_dtypes={"scale": "lambda_dtype"})
    assert precision.factor_dtype("scale", torch.float32, declared) == torch.bfloat16
    assert precision.factor_dtype("lambda", torch.float32, declared) is None  # not declared: kept as computed
    undeclared = fi.FitPass("scales", *scales[1:4])  # written before the declarations existed: the convention
    assert precision.factor_dtype("lambda", torch.float32, undeclared) == torch.bfloat16
    assert precision.factor_dtype("gradient_covariance", torch.float32, undeclared) == torch.float64
    wrong = fi.FitPass("scales", *scales[1:4], factor_dtypes={"lambda": "score_dtype"})
    with pytest.raises(fi.InfluenceError, match="covariance_dtype"):
        precision.factor_dtype("lambda", torch.float32, wrong)


def test_estimate_memory_sizes_the_renamed_estimator_as_ekfac():
    model, data, task = _mlp(torch.float32)
    settings = dict(batch_size=8, num_queries=4, num_train=len(data), activation_bytes=(10_000, 500))
    renamed = estimate_memory(model, task, data[:4], strategy=RENAMED, **settings)
    ekfac = estimate_memory(model, task, data[:4], strategy="ekfac", **settings)
    assert list(renamed.phases) == ["discovery", "moments", "scales", "query gradients", "pairwise", "self"]
    for phase, estimate in renamed.phases.items():
        assert estimate.breakdown == ekfac.phases[PHASES.get(phase, phase)].breakdown, phase
    assert renamed.resident == ekfac.resident and renamed.peak == ekfac.peak
    assert fit_phase_peak(renamed) == fit_phase_peak(ekfac)
    assert renamed.phases["moments"].peak > 0 and renamed.phases["scales"].peak > 0


def _load_example(name):
    path = Path(__file__).resolve().parent.parent / "docs" / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_estimate_memory_sizes_an_estimator_without_hints_from_its_meta_run():
    """The documented dense-Fisher estimator declares nothing: its state and factors are read off the meta device."""
    estimator = _load_example("custom_estimator").dense_layer_fisher
    model, data, task = _mlp(torch.float32)
    estimate = estimate_memory(model, task, data[:4], strategy=estimator, batch_size=8, activation_bytes=(0, 0))
    factors = fi.fit_factors(model, task, data, strategy=estimator, batch_size=8, **QUIET)
    fitted = sum(t.numel() * t.element_size() for layer in factors.tensors.values() for t in layer.values())
    assert estimate.resident["factors"] == fitted == (6 * 7 + 7) ** 2 * 8 + (8 * 3) ** 2 * 8
    accumulators = ((6 * 7 + 7) ** 2 + (8 * 3) ** 2 + 2) * 8  # float64 [out*in, out*in] sums and the counts
    assert estimate.phases["fisher"].breakdown["accumulators"] == accumulators
    # the default hint: update makes a new state, one layer at a time (its part is added in place as it comes)
    hint = estimator.passes[0].memory(Workspace((1, 1, 1), 1, 8, torch.float32, {}, state_bytes=accumulators))
    assert hint.new_state == accumulators and estimate.phases["fisher"].peak >= accumulators + fitted


def test_the_dense_parameter_layer_refusal_reads_the_declaration():
    specs = {"norm": SimpleNamespace(op="parameters", in_features=5000),
             "small": SimpleNamespace(op="parameters", in_features=10),
             "linear": SimpleNamespace(op="linear", in_features=5000)}
    assert dense_parameter_layers({name: RENAMED for name in specs}, specs) == {"norm": 5000}
    assert dense_parameter_layers({name: fi.diagonal for name in specs}, specs) == {}
    undeclared = lambda name, **declared: fi.CurvatureEstimator(  # noqa: E731
        "mine", (fi.FitPass(name, *fi.ekfac.passes[0][1:4], **declared),), fi.ekfac.precondition, fi.ekfac.self_score)
    assert dense_parameter_layers({name: undeclared("covariance") for name in specs}, specs) == {"norm": 5000}
    assert dense_parameter_layers({name: undeclared("moments") for name in specs}, specs) == {}
    assert dense_parameter_layers({name: undeclared("moments", dense_input_block=True) for name in specs},
                                  specs) == {"norm": 5000}


def test_passes_of_one_name_must_agree_on_what_they_read():
    gradients = fi.CurvatureEstimator("other", (fi.ekfac.passes[1]._replace(name="moments"),),
                                      fi.ekfac.precondition, fi.ekfac.self_score)
    assert pass_order({"a": RENAMED, "b": RENAMED}) == ["moments", "scales"]
    with pytest.raises(fi.InfluenceError, match="raw_statistics"):
        pass_order({"a": RENAMED, "b": gradients})


def test_estimate_memory_names_what_the_meta_device_needs():
    scales = RENAMED.passes[1]
    valued = scales._replace(finalize=lambda state, factors: {"lambda": state["lambda_sum"] / float(state["examples"])})
    estimator = RENAMED._replace(passes=(RENAMED.passes[0], valued))
    model, data, task = _mlp(torch.float32)
    with pytest.raises(fi.InfluenceError, match="meta device"):
        estimate_memory(model, task, data[:4], strategy=estimator, activation_bytes=(0, 0))
