"""How far float32 pairwise scores are from float64 ones, for fninfluence and for Kronfluence 1.0.1.

    python -m benchmarks.precision_fp32                       # every workload, strategy and damping
    python -m benchmarks.precision_fp32 --workloads cnn --strategies ekfac --dampings 1e-8

For each workload (the small MLP, CNN and transformer of :mod:`benchmarks.workloads`, and that CNN trained on
images with pixels in [0, 1], ``cnn-pixels-trained``, where A has a large common mean), strategy (EKFAC,
KFAC) and damping (1e-8, Kronfluence's default, and the heuristic ``None`` = 0.1 x mean Lambda), each
library runs twice on the same float32 weights and data with the empirical Fisher: once with every dtype
argument at the library's (float32) default, once with every dtype argument float64 (``--reference model``
also puts the model in float64, which adds the forward pass's own float32 error to both). The error is

    || S_32 - S_64 ||_F / || S_64 ||_F

over the ``[Q, N]`` pairwise scores, with ``S_64`` that library's own float64 result (the two float64
results agree to ~1e-10, printed as ``parity``). fninfluence should be at least as accurate as Kronfluence.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
from functools import partial
from typing import Dict, Optional

import torch

import fninfluence
from benchmarks.workloads import SIZES, build
from fninfluence.precision import Precision


def _dataset_as(data, dtype: torch.dtype):
    tensors = [t.to(dtype) if t.is_floating_point() else t for t in data.tensors]
    return torch.utils.data.TensorDataset(*tensors)


def _subset(data, n: int):
    return torch.utils.data.TensorDataset(*(t[:n] for t in data.tensors))


def fninfluence_scores(workload, strategy: str, damping: Optional[float], dtype: torch.dtype,
                       train, queries, model_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    model_dtype = model_dtype or dtype
    model = copy.deepcopy(workload.model).to(model_dtype)
    train, queries = _dataset_as(train, model_dtype), _dataset_as(queries, model_dtype)
    precision = None if dtype == model_dtype else Precision(
        covariance_dtype=dtype, lambda_dtype=dtype, per_sample_gradient_dtype=dtype, precondition_dtype=dtype,
        score_dtype=dtype)
    factors = fninfluence.fit_factors(model, workload.task, train, strategy=strategy, use_empirical_fisher=True,
                                      batch_size=workload.batch_size, progress=False, precision=precision)
    return fninfluence.pairwise_scores(model, workload.task, factors, queries, train, damping=damping,
                                       batch_size=workload.batch_size, progress=False, precision=precision)


def kronfluence_scores(workload, strategy: str, damping: Optional[float], dtype: torch.dtype,
                       train, queries, model_dtype: Optional[torch.dtype] = None, api: str = "kronfluence"
                       ) -> torch.Tensor:
    """Through Kronfluence 1.0.1 itself, or (``api="compat"``) through fninfluence's Kronfluence-shaped API."""
    if api == "compat":
        from fninfluence.compat.kronfluence import Analyzer, FactorArguments, ScoreArguments, prepare_model
    else:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments

    model_dtype = model_dtype or dtype
    model = prepare_model(copy.deepcopy(workload.kronfluence_model).to(model_dtype), workload.kronfluence_task)
    train, queries = _dataset_as(train, model_dtype), _dataset_as(queries, model_dtype)
    with tempfile.TemporaryDirectory() as folder:
        quiet = {"log_level": logging.WARNING} if api == "kronfluence" else {}
        analyzer = Analyzer("precision", model=model, task=workload.kronfluence_task, cpu=True, disable_tqdm=True,
                            output_dir=folder, **quiet)
        wide = {} if dtype == torch.float32 else dict(
            activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype, per_sample_gradient_dtype=dtype,
            lambda_dtype=dtype)
        factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=True, **wide)
        score_wide = {} if dtype == torch.float32 else dict(per_sample_gradient_dtype=dtype, precondition_dtype=dtype,
                                                            score_dtype=dtype)
        score_args = ScoreArguments(damping_factor=damping, **score_wide)
        analyzer.fit_all_factors("f", train, per_device_batch_size=workload.batch_size, factor_args=factor_args,
                                 overwrite_output_dir=True)
        analyzer.compute_pairwise_scores("p", "f", queries, train, per_device_query_batch_size=workload.batch_size,
                                         per_device_train_batch_size=workload.batch_size, score_args=score_args,
                                         overwrite_output_dir=True)
        return analyzer.load_pairwise_scores("p")["all_modules"]


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.double() - exact.double()).norm() / exact.double().norm())


def _pixels_trained(steps: int = 300):
    """The small CNN trained (Adam, float64, ``steps`` full-batch steps) on images with pixels in [0, 1]:
    non-negative inputs and ReLU outputs give A a large common mean, and training spreads Lambda."""
    workload = build("cnn", "small")
    g = torch.Generator().manual_seed(1)
    n, q, size = SIZES["cnn"]["small"]["n"], SIZES["cnn"]["small"]["q"], SIZES["cnn"]["small"]["size"]
    images = lambda k: torch.utils.data.TensorDataset(torch.rand(k, 3, size, size, generator=g, dtype=torch.float64),
                                                      torch.randint(0, 10, (k,), generator=g))
    train, queries = images(n), images(q)
    model = copy.deepcopy(workload.model).double().train()
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(steps):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(train.tensors[0]), train.tensors[1]).backward()
        optimiser.step()
    model = model.float().eval()
    workload.model, workload.kronfluence_model = model, copy.deepcopy(model)
    workload.train, workload.queries = _dataset_as(train, torch.float32), _dataset_as(queries, torch.float32)
    return workload


def _workload(name: str):
    return _pixels_trained() if name == "cnn-pixels-trained" else build(name, "small")


def measure(name: str, strategy: str, damping: Optional[float], libraries, n: Optional[int],
            reference: str = "arguments") -> Dict[str, float]:
    workload = _workload(name)
    train = workload.train if n is None else _subset(workload.train, n)
    queries = workload.queries
    row: Dict[str, float] = {}
    model_dtype = torch.float32 if reference == "arguments" else None
    first = None
    for library in libraries:
        compute = {"fninfluence": fninfluence_scores, "kronfluence": kronfluence_scores,
                   "compat": partial(kronfluence_scores, api="compat")}[library]
        wide = compute(workload, strategy, damping, torch.float64, train, queries, model_dtype)
        narrow = compute(workload, strategy, damping, torch.float32, train, queries, model_dtype)
        row[library] = relative_error(narrow, wide)
        if first is None:
            first = wide
        else:
            row["parity"] = relative_error(wide, first)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["cnn", "mlp", "transformer", "cnn-pixels-trained"])
    parser.add_argument("--strategies", nargs="+", default=["ekfac", "kfac"])
    parser.add_argument("--dampings", nargs="+", default=["1e-8", "none"])
    parser.add_argument("--libraries", nargs="+", default=["fninfluence", "kronfluence"],
                        help="fninfluence (native API), kronfluence (1.0.1), compat (fninfluence.compat.kronfluence)")
    parser.add_argument("--n", type=int, default=None, help="training examples (default: the workload's)")
    parser.add_argument("--reference", choices=["arguments", "model"], default="arguments",
                        help="arguments: a float32 model, every dtype argument float64 (the library's own arithmetic); "
                             "model: the model itself in float64 too (adds the forward pass's float32 error)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    print(f"{'workload':12} {'strategy':8} {'damping':8} " + " ".join(f"{lib:>12}" for lib in args.libraries)
          + f" {'parity':>9}")
    for name in args.workloads:
        for strategy in args.strategies:
            for text in args.dampings:
                damping = None if text.lower() == "none" else float(text)
                row = measure(name, strategy, damping, args.libraries, args.n, args.reference)
                rows.append({"workload": name, "strategy": strategy, "damping": text, **row,
                             "size": SIZES[name.split("-")[0]]["small"]})
                print(f"{name:12} {strategy:8} {text:8} " + " ".join(f"{row[lib]:12.2e}" for lib in args.libraries)
                      + (f" {row['parity']:9.1e}" if "parity" in row else ""), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
