"""The peak memory of an EKFAC fit: the lambda pass does not hold A and S (the covariances) beside the model's forward
and backward pass; they are set aside while it runs and returned unchanged (issue 13)."""

from __future__ import annotations

import gc

import pytest
import torch

import fninfluence as fi
import fninfluence.run.fit as fit_module
from fninfluence.memory import measure_peak
from fninfluence.run.aside import Aside, set_aside
from models import LMTask, TinyTransformerLM, sequence_data

QUIET = dict(progress=False, use_empirical_fisher=False)
SET_ASIDE = ("activation_covariance", "gradient_covariance", "activation_eigenvalues", "gradient_eigenvalues",
             "num_tokens")  # what EKFAC's lambda pass does not read: all but the eigenvectors


def _token_heavy():
    """Many tokens per example against the layers' widths: the model's forward and backward pass, not the
    covariance pass's float64 sums, makes the fit's peak, as on a long-context language model."""
    torch.manual_seed(0)
    model = TinyTransformerLM(vocab=32, d=96, heads=2, seq=256).eval()
    return model, sequence_data(n=16, seq=256, vocab=32), LMTask()


def _keeping_everything(factors, fit_passes):
    """``set_aside`` as if no pass declared what it reads: every earlier factor stays on the device."""
    return factors, Aside({}, {})


def _fit(model, data, task):
    return fi.fit_factors(model, task, data, strategy="ekfac", batch_size=8, seed=3, **QUIET)


def _assert_identical(first, second):
    assert list(first.tensors) == list(second.tensors)
    for layer, tensors in first.tensors.items():
        other = second.tensors[layer]
        assert list(tensors) == list(other), layer  # the same factors, in the same order
        for name, value in tensors.items():
            assert value.dtype == other[name].dtype and value.shape == other[name].shape, (layer, name)
            assert value.stride() == other[name].stride(), (layer, name)
            assert torch.equal(value.reshape(-1).view(torch.uint8), other[name].reshape(-1).view(torch.uint8)), \
                (layer, name)  # bit for bit


def test_a_token_heavy_ekfac_fit_peaks_lower_by_the_covariances_and_returns_the_same_factors(monkeypatch):
    model, data, task = _token_heavy()
    _fit(model, data, task)  # warm-up: discovery's exactness check, first calls
    gc.collect()
    factors, peak = measure_peak(lambda: _fit(model, data, task))
    with monkeypatch.context() as patched:
        patched.setattr(fit_module, "set_aside", _keeping_everything)
        gc.collect()
        before, peak_before = measure_peak(lambda: _fit(model, data, task))
    _assert_identical(factors, before)
    for tensors in factors.tensors.values():  # the documented content is all returned
        assert {"activation_covariance", "gradient_covariance", "activation_eigenvectors", "gradient_eigenvectors",
                "lambda"} <= set(tensors) or "activation_diagonal" in tensors
    aside = sum(t.numel() * t.element_size() for tensors in factors.tensors.values()
                for name, t in tensors.items() if name in SET_ASIDE)
    # from the layer shapes: A [in, in] and S [out, out] of every layer, in the model's float32
    shapes = sum((spec.shape[2] ** 2 + spec.shape[1] ** 2) * 4 for spec in factors.layers.values())
    covariances = sum(factors.tensors[name]["activation_covariance"].numel() * 4
                      + factors.tensors[name]["gradient_covariance"].numel() * 4 for name in factors.layers)
    assert covariances == shapes
    # the lambda pass makes the fit's peak, and no longer holds what it does not read
    assert peak_before - peak >= 0.99 * aside >= covariances, (peak_before, peak, aside)


def test_the_lambda_pass_does_not_hold_the_covariances():
    """While the lambda pass updates its sums, no live tensor holds A or S (found by their values afterwards)."""
    model, data, task = _token_heavy()
    covariance, lambda_pass = fi.ekfac.passes
    alive, read = [], set()

    def update(state, stats, factors):
        if not alive:  # the first layer's first batch: every tensor in Python's reach, by value
            gc.collect()
            alive.extend(o.detach().clone() for o in gc.get_objects()
                         if issubclass(type(o), torch.Tensor) and o.dim() == 3 and o.dtype == torch.float32
                         and o.shape[-1] == o.shape[-2] and o.device.type != "meta")
        read.update(factors)
        return lambda_pass.update(state, stats, factors)

    spied = fi.CurvatureEstimator("ekfac", (covariance, lambda_pass._replace(update=update)), fi.ekfac.precondition,
                                  fi.ekfac.self_score, fi.ekfac.memory)
    factors = fi.fit_factors(model, task, data, strategy=spied, batch_size=8, seed=3, **QUIET)
    assert alive  # the spy ran
    assert read == {"activation_eigenvectors", "gradient_eigenvectors"}  # what the pass declares it reads
    for layer, tensors in factors.tensors.items():
        for name in ("activation_covariance", "gradient_covariance"):
            held = [t for t in alive if t.shape == tensors[name].shape and torch.equal(t, tensors[name])]
            assert not held, f"{layer} {name} was alive during the lambda pass"
    assert any(torch.equal(t, tensors["gradient_eigenvectors"]) for t in alive
               for tensors in factors.tensors.values() if t.shape == tensors["gradient_eigenvectors"].shape)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_set_aside_factors_come_back_bit_for_bit_in_their_places(device):
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    factors = {"a": {"cov": torch.randn(5, 5, generator=g).to(device), "vec": torch.randn(5, 5, generator=g).to(device),
                     "old": torch.randn(3, generator=g).to(device)},
               "b": {"cov": torch.randn(2, 2, dtype=torch.float64, generator=g).to(device)}}
    copies = {layer: {k: v.clone() for k, v in t.items()} for layer, t in factors.items()}
    reads = lambda key: key == "vec"  # noqa: E731
    passes = {"a": fi.ekfac.passes[1]._replace(reads_factors=("vec",)), "b": fi.ekfac.passes[1]._replace(
        reads_factors=("vec",))}
    assert all(p.reads_factor("vec") and not p.reads_factor("cov") for p in passes.values())
    kept, aside = set_aside(factors, passes)
    assert {layer: sorted(t) for layer, t in kept.items()} == {"a": ["vec"], "b": []}
    del factors
    outputs = {"a": {**kept["a"], "lambda": torch.ones(2, device=device), "old": torch.zeros(1, device=device)},
               "b": {"lambda": torch.ones(1, device=device)}}
    restored = aside.restore(outputs)
    aside.close()
    # each layer's earlier factors in their order (a pass's output of the same name replaces it), then the new ones
    assert list(restored["a"]) == ["cov", "vec", "old", "lambda"] and list(restored["b"]) == ["cov", "lambda"]
    assert torch.equal(restored["a"]["old"], torch.zeros(1, device=device))
    for layer, tensors in copies.items():
        for name, value in tensors.items():
            if name != "old" and reads(name) is False:
                back = restored[layer][name]
                assert back.device == value.device and back.dtype == value.dtype and torch.equal(back, value)


def test_factors_stay_in_memory_when_no_temporary_file_can_be_written(monkeypatch):
    import fninfluence.run.aside as aside_module

    factors = {"a": {"cov": torch.randn(4, 4), "vec": torch.randn(4, 4)}}
    passes = {"a": fi.ekfac.passes[1]._replace(reads_factors=("vec",))}
    kept, on_disk = set_aside(dict(factors), passes)
    assert on_disk.file is not None  # on the CPU they go to a temporary file
    on_disk.close()

    def unwritable():
        raise OSError("read-only file system")

    monkeypatch.setattr(aside_module.tempfile, "TemporaryFile", unwritable)
    kept, aside = set_aside(factors, passes)
    restored = aside.restore(kept)
    assert list(restored["a"]) == ["cov", "vec"] and restored["a"]["cov"] is factors["a"]["cov"]

    def full_disk(value, file):  # torch.save's zip writer reports a failed write as a RuntimeError
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.undo()
    monkeypatch.setattr(aside_module.torch, "save", full_disk)
    kept, aside = set_aside(factors, passes)
    assert aside.file is None
    restored = aside.restore(kept)
    assert list(restored["a"]) == ["cov", "vec"] and restored["a"]["cov"] is factors["a"]["cov"]


def test_second_moments_of_narrow_inputs_hold_no_wide_copy_of_them():
    """KFAC/EKFAC's covariance of float32 inputs in float64: the column sums are taken a block of rows at a time,
    so the float64 temporaries stay far below a float64 copy of the inputs (a conv layer's patches are the
    largest tensor of a covariance pass), and the result equals the whole-tensor conversion's."""
    from fninfluence.core.algebra import WIDE_SUM_ROWS, second_moment, wide_sum

    x = torch.randn(6 * WIDE_SUM_ROWS + 5, 1, 64, generator=torch.Generator().manual_seed(0)) + 3.0
    wide_copy = x.numel() * 8
    result, peak = measure_peak(lambda: second_moment(x, torch.float64))
    assert peak < 0.8 * wide_copy, (peak, wide_copy)  # the centred float32 copy (half of it) and small sums
    torch.testing.assert_close(wide_sum(x, torch.float64), x.double().sum(0), rtol=1e-15, atol=0)
    small = x[:WIDE_SUM_ROWS]
    assert torch.equal(wide_sum(small, torch.float64), small.double().sum(0))  # one block: exactly as before
    torch.testing.assert_close(result, torch.einsum("ngi,ngj->gij", x.double(), x.double()), rtol=1e-6, atol=0)
