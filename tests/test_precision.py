"""Precision: float32 results stay close to float64 ones, and asked-for dtypes are what is returned and stored."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import fninfluence as fi
from fninfluence.curvature.kfac import second_moment
from fninfluence.precision import Precision
from fninfluence.core.scores import pairwise_layer_scores
from models import ClassificationTask, mlp

WIDE = Precision(covariance_dtype=torch.float64, lambda_dtype=torch.float64, per_sample_gradient_dtype=torch.float64,
                 precondition_dtype=torch.float64, score_dtype=torch.float64)


def shifted_problem():
    """An MLP whose inputs have a large common mean (20 against a spread of 1): A's small eigenvalues sit
    ~1e-3 below its largest, where a plain float32 sum of a a^T loses them."""
    torch.manual_seed(0)
    model = mlp(d_in=8, hidden=16, classes=3).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g) + 20.0, torch.randint(0, 3, (64,), generator=g)
    return model, ClassificationTask(), TensorDataset(x, y), TensorDataset(x[:6], y[:6])


def pairwise(model, task, train, queries, strategy, damping, precision):
    factors = fi.fit_factors(model, task, train, strategy=strategy, use_empirical_fisher=True, batch_size=16,
                             progress=False, precision=precision)
    return fi.pairwise_scores(model, task, factors, queries, train, damping=damping, batch_size=16, progress=False,
                              precision=precision)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_float32_scores_stay_close_to_float64_with_tiny_damping(strategy):
    # float32 sums of a a^T made these 6.3e-3 (EKFAC) and 1.4e-3 (KFAC) from float64; Kronfluence 1.0.1 is
    # at the same level. Centred per-batch products and float64 sums across batches give ~1.2e-5.
    model, task, train, queries = shifted_problem()
    exact = pairwise(model, task, train, queries, strategy, 1e-8, WIDE)
    narrow = pairwise(model, task, train, queries, strategy, 1e-8, Precision())
    assert narrow.dtype == torch.float32 and exact.dtype == torch.float64
    assert float((narrow.double() - exact).norm() / exact.norm()) < 1e-4


def test_factors_sum_across_batches_in_float64_and_are_returned_in_the_asked_dtype():
    model, task, train, _ = shifted_problem()
    factors = fi.fit_factors(model, task, train, strategy="ekfac", use_empirical_fisher=True, batch_size=16,
                             progress=False)
    wide = fi.fit_factors(model, task, train, strategy="ekfac", use_empirical_fisher=True, batch_size=16,
                          progress=False, precision=WIDE)
    for layer in ("0", "2"):
        for name in ("activation_covariance", "gradient_covariance", "lambda"):
            assert factors[layer][name].dtype == torch.float32
            exact = wide[layer][name]
            assert float((factors[layer][name].double() - exact).norm() / exact.norm()) < 1e-6
        # eigendecomposed in float64, kept in the float32 they are read in: the float64 eigenvectors rounded once
        assert factors[layer]["activation_eigenvectors"].dtype == torch.float32
        assert wide[layer]["activation_eigenvectors"].dtype == torch.float64


def test_centred_second_moment_equals_the_float64_sum():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(500, 2, 7, generator=g, dtype=torch.float64) + 30.0)
    exact = torch.einsum("ngi,ngj->gij", x, x)
    narrow = x.float()
    exact_of_narrow = torch.einsum("ngi,ngj->gij", narrow.double(), narrow.double())
    centred = second_moment(narrow, torch.float64)
    plain = torch.einsum("ngi,ngj->gij", narrow, narrow).double()
    assert centred.dtype == torch.float64
    # the spread about the mean (eigenvalues ~500) is what a float32 product of raw entries (~4.5e5) blurs
    spread = lambda m: torch.linalg.eigvalsh(m)[:, :-1]
    error = lambda m: float((spread(m) - spread(exact_of_narrow)).abs().max() / spread(exact_of_narrow).abs().max())
    assert error(centred) < 1e-5 < error(plain)
    assert torch.allclose(second_moment(x, torch.float64), exact, rtol=0, atol=0)


def test_pairwise_contraction_is_as_accurate_as_the_einsum_without_a_groups_axis():
    # summing over the size-1 groups axis took torch.einsum's less accurate float32 path: 2.8x the error
    torch.manual_seed(0)
    q, n, t, o, i = 8, 16, 32, 256, 65
    query = torch.randn(q, 1, o, i, dtype=torch.float64) * torch.logspace(0, 4, i, dtype=torch.float64)
    stats = {"g": torch.randn(n, t, 1, o, dtype=torch.float64), "a": torch.randn(n, t, 1, i, dtype=torch.float64) + 1}
    exact = pairwise_layer_scores(query, stats)
    assert torch.allclose(exact, torch.einsum("qoi,nto,nti->qn", query[:, 0], stats["g"][:, :, 0], stats["a"][:, :, 0]),
                          rtol=1e-12, atol=0)
    narrow = {k: v.float() for k, v in stats.items()}
    error = lambda s: float((s.double() - exact).norm() / exact.norm())
    reference = error(torch.einsum("noi,qoi->qn", torch.einsum("nto,nti->noi", narrow["g"][:, :, 0], narrow["a"][:, :, 0]),
                                   query[:, 0].float()))
    assert error(pairwise_layer_scores(query.float(), narrow)) <= 1.25 * reference < 1e-5


# -- stored dtypes ---------------------------------------------------------------------------------

NARROW = [torch.float16, torch.bfloat16]
STORED = ("activation_covariance", "gradient_covariance", "lambda")


def stored_arrays(path):
    """``{relative path: zarr array}`` of every array under a store."""
    import zarr

    found = {}

    def walk(group, prefix):
        for name, array in group.arrays():
            found[prefix + name] = array
        for name, sub in group.groups():
            walk(sub, f"{prefix}{name}/")

    walk(zarr.open_group(str(path), mode="r"), "")
    return found


def assert_stored_as(array, dtype):
    assert array.dtype.itemsize == dtype.itemsize  # two bytes per element on disk
    if dtype == torch.bfloat16:  # zarr v3 has no bfloat16: raw bits, and the dtype named beside them
        assert str(array.dtype) == "uint16" and array.attrs["fninfluence_dtype"] == "bfloat16"


def small_problem():
    torch.manual_seed(0)
    model = mlp(d_in=6, hidden=5, classes=3).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    return model, ClassificationTask(), TensorDataset(x, y), TensorDataset(x[:4], y[:4])


@pytest.mark.parametrize("dtype", NARROW, ids=str)
def test_native_factors_and_scores_are_held_stored_and_loaded_in_the_asked_dtype(dtype, tmp_path):
    model, task, train, queries = small_problem()
    fit = dict(strategy="ekfac", use_empirical_fisher=True, batch_size=8, progress=False)
    reference = fi.fit_factors(model, task, train, **fit)
    asked = Precision(covariance_dtype=dtype, lambda_dtype=dtype, score_dtype=dtype)
    factors = fi.fit_factors(model, task, train, store=tmp_path / "f", precision=asked, **fit)
    loaded = fi.Factors.load(tmp_path / "f")
    arrays = stored_arrays(tmp_path / "f")
    for layer in reference.layers:
        for name in STORED:
            assert factors[layer][name].dtype == loaded[layer][name].dtype == dtype
            assert torch.equal(factors[layer][name], reference[layer][name].to(dtype))
            assert torch.equal(loaded[layer][name], factors[layer][name])
    for name in STORED:
        paths = [p for p in arrays if p.startswith("layers/") and p.endswith("/" + name)]
        assert len(paths) == 2
        for path in paths:
            assert_stored_as(arrays[path], dtype)

    score = dict(damping=1e-3, batch_size=8, progress=False)  # the same (narrow) factors, float32 scores
    expected = fi.pairwise_scores(model, task, factors, queries, train, **score)
    in_memory = fi.pairwise_scores(model, task, factors, queries, train, precision=asked, **score)
    stored = fi.pairwise_scores(model, task, factors, queries, train, precision=asked, store=tmp_path / "s", **score)
    assert expected.dtype == torch.float32 and in_memory.dtype == stored.dtype == dtype
    assert torch.equal(in_memory, expected.to(dtype)) and torch.equal(stored, expected.to(dtype))
    from fninfluence.store.scores_store import read_scores

    assert torch.equal(read_scores(tmp_path / "s")["all_modules"], expected.to(dtype))
    assert_stored_as(stored_arrays(tmp_path / "s")["all_modules"], dtype)
    self_expected = fi.self_scores(model, task, factors, train, **score)
    self_asked = fi.self_scores(model, task, factors, train, precision=asked, **score)
    assert torch.equal(self_asked, self_expected.to(dtype))


@pytest.mark.parametrize("dtype", NARROW, ids=str)
def test_compat_arguments_ask_for_the_stored_and_loaded_dtypes(dtype, tmp_path):
    from fninfluence.compat import kronfluence as compat

    model, task, train, queries = small_problem()
    analyzer = compat.Analyzer("a", compat.prepare_model(model, task), task, cpu=True, disable_tqdm=True,
                               output_dir=str(tmp_path))
    call = dict(per_device_query_batch_size=4, per_device_train_batch_size=8)
    results = {}
    for name, wanted in (("wide", torch.float32), ("narrow", dtype)):
        analyzer.fit_all_factors(name, train, per_device_batch_size=8, factor_args=compat.FactorArguments(
            strategy="ekfac", use_empirical_fisher=True, activation_covariance_dtype=wanted,
            gradient_covariance_dtype=wanted, lambda_dtype=wanted))
        for scores, score_dtype in ((name, wanted), (name + "32", torch.float32)):
            analyzer.compute_pairwise_scores(scores, name, queries, train, score_args=compat.ScoreArguments(
                damping_factor=1e-3, score_dtype=score_dtype), **call)
        results[name] = (analyzer.load_all_factors(name), analyzer.load_covariance_matrices(name),
                         analyzer.load_pairwise_scores(name)["all_modules"])
    (wide_factors, wide_covariances, _), (factors, covariances, scores) = results["wide"], results["narrow"]
    # scores: a cast of the float32 scores from the same (narrow) factors
    assert scores.dtype == dtype
    assert torch.equal(scores, analyzer.load_pairwise_scores("narrow32")["all_modules"].to(dtype))
    # raw sums (Kronfluence's convention) of factors that are casts of the float32 means
    for module, value in factors["lambda_matrix"].items():
        assert value.dtype == dtype
        assert torch.allclose(value.double(), wide_factors["lambda_matrix"][module].double(), rtol=1e-2, atol=1e-3)
    for name in ("activation_covariance", "gradient_covariance"):
        for module, value in covariances[name].items():
            assert value.dtype == dtype
            assert torch.allclose(value.double(), wide_covariances[name][module].double(), rtol=1e-2, atol=1e-3)
    arrays = stored_arrays(analyzer.factors_output_dir("narrow"))
    for name in STORED:
        for path in [p for p in arrays if p.startswith("layers/") and p.endswith("/" + name)]:
            assert_stored_as(arrays[path], dtype)
    score_arrays = stored_arrays(analyzer.scores_output_dir("narrow"))
    assert_stored_as(score_arrays["all_modules"], dtype)


def test_zarr_round_trip_of_bfloat16_keeps_values_shapes_and_nan_fill(tmp_path):
    from fninfluence.store.zarr_io import ArraySpec, open_store, read_array, write_array

    arrays = {"scalar": ArraySpec((), (), "bfloat16"), "matrix": ArraySpec((3, 4), (3, 4), "bfloat16", float("nan")),
              "half": ArraySpec((5,), (5,), "float16")}
    group = open_store(tmp_path / "s", {"kind": "test"}, arrays, overwrite=False, identity_keys=())
    assert torch.isnan(read_array(group, "matrix")).all() and read_array(group, "matrix").dtype == torch.bfloat16
    values = {"scalar": torch.tensor(3.140625), "matrix": torch.randn(3, 4, dtype=torch.float64),
              "half": torch.randn(5)}
    for name, value in values.items():
        write_array(group, name, value)
    for name, value in values.items():
        back = read_array(group, name)
        want = torch.float16 if name == "half" else torch.bfloat16
        assert back.dtype == want and back.shape == value.shape
        assert torch.equal(back, value.to(want))
