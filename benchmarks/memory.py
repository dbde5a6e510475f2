"""Side-by-side peak memory: fninfluence (eager and compiled) against Kronfluence 1.0.1 and a training step.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.memory --size small
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.memory --size long --workloads transformer gpt2
    python -m benchmarks.memory --size large --workloads gpt2 --device cuda

What is measured: for each phase, the peak of tensor bytes allocated during the phase's call, above what
was allocated before it (``fninfluence.memory.measure_peak``: on CPU the running sum of torch.profiler's
memory events, every allocation and free in order; on CUDA ``torch.cuda.max_memory_allocated`` minus
``memory_allocated`` before the call). What a call returns (factors, scores) is allocated during it and
counted; what exists before it (the model, fninfluence's factors while scoring) is not.

- fninfluence, fninfluence-compiled (``compile=True``): ``fit`` = ``fit_factors(strategy="ekfac")``, the true
  Fisher (``use_empirical_fisher=False``, passed explicitly to both libraries, whatever their defaults);
  ``pairwise`` = ``pairwise_scores`` of the workload's queries against the training slice; ``self`` =
  ``self_scores``; ``batch_size`` = the workload's, ``progress=False``.
- kronfluence: ``fit`` = ``fit_covariance_matrices`` + ``perform_eigendecomposition`` + ``fit_lambda_matrices``
  under one measurement; ``pairwise`` = ``compute_pairwise_scores`` with all queries in one query batch;
  ``self`` = ``compute_self_scores``; EKFAC and the settings of ``benchmarks.run``, written to a temporary
  directory. Kronfluence's scoring calls read the factors from disk inside the call, so its scoring peaks
  include the factors, where fninfluence's factors exist before the call: the factor bytes of both are
  reported under each table.
- floor: one forward and backward pass (``loss.backward()``, every parameter requiring grad, gradients
  set to None before) of one batch, the peak of one training step without the optimizer, phase ``floor``.

Every (workload, size, system) runs in a fresh process, repeats interleaved with the order of the systems
rotated per repeat (as ``benchmarks.run``). Each phase is measured on the first ``--batches`` batches of the
training data (default 2), right after a warm-up of the same phase on a one-batch slice in the same process
(imports, first calls, compilation), with ``gc.collect()`` before each call. Secondary number: the RSS
high-water mark during the call above the RSS at its start (VmHWM reset through /proc/self/clear_refs),
which adds the allocator's slack and, on CPU, the profiler's own event buffers. Memory is deterministic up to
allocator noise: the tables report the maximum over ``--repeats`` (default 1).

Output: ``{out}/memory-{size}-{device}.json`` (every run) and ``.md`` (one table per workload: MB are MiB).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from benchmarks.run import (WORKLOADS, _rss_bytes, _rss_peak_bytes, _save_json, _slice, all_sizes, failed_lines,
                            machine_description, measure_all, reset_rss_peak, workloads_for)

SYSTEMS = ("floor", "kronfluence", "fninfluence", "fninfluence-compiled")
PHASES = ("fit", "pairwise", "self")
MIB = 2 ** 20


# -- one process: one system's phases on one workload ----------------------------------------------------

class Recorder:
    """Measures calls: tensor peak above the start (``measure_peak``) and RSS high-water mark above the start."""

    def __init__(self, device):
        self.device = device
        self.results: Dict[str, Dict[str, float]] = {}

    def measure(self, name: str, fn: Callable[[], object]) -> object:
        from fninfluence.memory import measure_peak

        gc.collect()
        reset_rss_peak()
        rss_start = _rss_bytes()
        started = time.perf_counter()
        result, peak = measure_peak(fn, self.device)
        seconds = time.perf_counter() - started
        rss_peak = _rss_peak_bytes()
        self.results[name] = {"peak_bytes": int(peak), "rss_start_bytes": rss_start,
                              "rss_above_start_bytes": max(0, rss_peak - rss_start),
                              "profiled_seconds": seconds}
        return result


def _tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages among nested dicts of tensors."""
    import torch

    seen, total = set(), 0
    stack = [tensors]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def _floor(work, device, recorder: Recorder) -> None:
    from torch.utils.data import DataLoader

    model = work.model.to(device)
    model.requires_grad_(True)
    batch = next(iter(DataLoader(work.train, batch_size=work.batch_size)))

    def step():
        work.task.compute_train_loss([t.to(device) for t in batch], model, sample=False).backward()

    step()  # warm-up
    model.zero_grad(set_to_none=True)
    recorder.measure("floor", step)
    model.zero_grad(set_to_none=True)


def _fninfluence(work, device, recorder: Recorder, train, warm, compiled: bool) -> None:
    import fninfluence

    model = work.model.to(device)
    options = dict(batch_size=work.batch_size, compile=compiled, progress=False)

    def fit(data):
        # the labels Kronfluence's fit uses (FactorArguments().use_empirical_fisher is False): sampled, the true Fisher
        return fninfluence.fit_factors(model, work.task, data, strategy="ekfac", use_empirical_fisher=False,
                                       **options)

    fit(warm)
    factors = recorder.measure("fit", lambda: fit(train))
    recorder.results["fit"]["factors_bytes"] = _tensor_bytes(factors.tensors)
    # estimate_memory's prediction of each call's peak, from one example batch
    predictions = {} if compiled else _predicted(work, model, train)
    fninfluence.pairwise_scores(model, work.task, factors, work.queries, warm, **options)
    recorder.measure("pairwise", lambda: fninfluence.pairwise_scores(model, work.task, factors, work.queries,
                                                                     train, **options))
    fninfluence.self_scores(model, work.task, factors, warm, **options)
    recorder.measure("self", lambda: fninfluence.self_scores(model, work.task, factors, train, **options))
    for phase, predicted in predictions.items():
        recorder.results[phase]["predicted_bytes"] = predicted


def _predicted(work, model, train) -> Dict[str, int]:
    """``fninfluence.estimate_memory``'s peaks of the fit, pairwise and self calls for these settings, after a
    warm-up (as they are measured here: the exactness check already ran)."""
    import fninfluence
    from fninfluence.memory import fit_phase_peak, pairwise_call_peak, self_call_peak
    from torch.utils.data import DataLoader

    example = next(iter(DataLoader(train, batch_size=min(4, work.batch_size))))
    example = [t.to(next(model.parameters()).device) for t in example]
    estimate = fninfluence.estimate_memory(model, work.task, example, strategy="ekfac", batch_size=work.batch_size,
                                           num_queries=len(work.queries), num_train=len(train))
    return {"fit": fit_phase_peak(estimate, checked=True), "pairwise": pairwise_call_peak(estimate, checked=True),
            "self": self_call_peak(estimate, checked=True)}


def _kronfluence(work, device, recorder: Recorder, train, warm, directory: str) -> None:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    model = prepare_model(work.kronfluence_model.to(device), work.kronfluence_task)
    analyzer = Analyzer("bench", model=model, task=work.kronfluence_task, cpu=device.type == "cpu",
                        disable_tqdm=True, output_dir=directory, log_level=logging.WARNING)
    factor_args, score_args = FactorArguments(strategy="ekfac", use_empirical_fisher=False), ScoreArguments()
    batch, queries = work.batch_size, len(work.queries)

    def fit(data, name):
        analyzer.fit_covariance_matrices(name, data, per_device_batch_size=batch, factor_args=factor_args,
                                         overwrite_output_dir=True)
        analyzer.perform_eigendecomposition(name, factor_args=factor_args, overwrite_output_dir=True)
        analyzer.fit_lambda_matrices(name, data, per_device_batch_size=batch, factor_args=factor_args,
                                     overwrite_output_dir=True)

    def pairwise(data, name):
        # all queries in one batch: one pass over the training set, Kronfluence's fastest setting
        return analyzer.compute_pairwise_scores(name, "f", work.queries, data, per_device_query_batch_size=queries,
                                                per_device_train_batch_size=batch, score_args=score_args,
                                                overwrite_output_dir=True)

    def self_(data, name):
        return analyzer.compute_self_scores(name, "f", data, per_device_train_batch_size=batch,
                                            score_args=score_args, overwrite_output_dir=True)

    fit(warm, "warmf")
    recorder.measure("fit", lambda: fit(train, "f"))
    recorder.results["fit"]["factors_bytes"] = sum(
        f.stat().st_size for f in Path(directory).rglob("*.safetensors") if "factors_f" == f.parent.name)
    pairwise(warm, "warmp")
    recorder.measure("pairwise", lambda: pairwise(train, "p"))
    self_(warm, "warms")
    recorder.measure("self", lambda: self_(train, "s"))


def measure_one(workload: str, size: str, system: str, device_name: str, batches: int = 2
                ) -> Dict[str, Dict[str, float]]:
    """One system's phases on ``workload``/``size``: ``{phase: {"peak_bytes", "rss_above_start_bytes", ...}}``."""
    import torch

    from benchmarks.workloads import build

    device = torch.device(device_name)
    work = build(workload, size)
    train = _slice(work.train, batches * work.batch_size)
    warm = _slice(work.train, work.batch_size)
    recorder = Recorder(device)
    if system == "floor":
        _floor(work, device, recorder)
    elif system == "kronfluence":
        with tempfile.TemporaryDirectory() as directory:
            _kronfluence(work, device, recorder, train, warm, directory)
    else:
        _fninfluence(work, device, recorder, train, warm, compiled=system == "fninfluence-compiled")
    return recorder.results


# -- the driver ------------------------------------------------------------------------------------------

def summarise(raw: Dict[str, Dict[str, List[Dict[str, Dict[str, float]]]]]) -> Dict:
    """The maximum over repeats of every byte count, per workload, system and phase."""
    keys = ("peak_bytes", "rss_above_start_bytes", "factors_bytes", "predicted_bytes")
    return {workload: {system: {phase: {key: max(run[phase][key] for run in runs)
                                        for key in keys if all(key in run[phase] for run in runs)}
                                for phase in (runs[0] if runs else ())}
                       for system, runs in systems.items() if runs}
            for workload, systems in raw.items()}


def _mb(value: Optional[float]) -> str:
    if value is None:
        return "–"
    mb = value / MIB
    return f"{mb:.2f}" if mb < 10 else f"{mb:.1f}" if mb < 100 else f"{mb:.0f}"


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def markdown(summary: Dict, machine: str, command: str, size: str, batches: int) -> str:
    from benchmarks.workloads import describe

    def get(table, system, phase, key):
        return table.get(system, {}).get(phase, {}).get(key)

    lines = [f"Machine: {machine}", "", f"Command: `{command}`", "",
             f"Peak tensor memory per call above what was allocated before it (MiB), {batches} training batches, "
             "max over repeats.", ""]
    for workload, table in summary.items():
        floor = get(table, "floor", "floor", "peak_bytes")
        lines += [f"### {workload} ({size}: {describe(workload, size)})", "",
                  "| phase | Kronfluence MB | fninfluence MB | compiled MB | fn/K | compiled/K | floor MB |",
                  "|---|---|---|---|---|---|---|"]
        for phase in PHASES:
            k, e, c = (get(table, s, phase, "peak_bytes") for s in ("kronfluence", "fninfluence",
                                                                     "fninfluence-compiled"))
            lines.append(f"| {phase} | {_mb(k)} | {_mb(e)} | {_mb(c)} | {_ratio(e, k)} | {_ratio(c, k)} | "
                         f"{_mb(floor)} |")
        predicted = [(phase, get(table, "fninfluence", phase, "predicted_bytes"),
                      get(table, "fninfluence", phase, "peak_bytes")) for phase in PHASES]
        if all(p is not None and m for _, p, m in predicted):
            lines += ["", "fninfluence.estimate_memory's prediction / measured (eager): " + ", ".join(
                f"{phase} {_mb(p)} / {_mb(m)} MB ({p / m:.2f})" for phase, p, m in predicted) + "."]
        factors = {s: get(table, s, "fit", "factors_bytes") for s in ("kronfluence", "fninfluence")}
        if any(v is not None for v in factors.values()):
            lines += ["", f"Factors: Kronfluence {_mb(factors['kronfluence'])} MB on disk (read back inside its "
                          f"scoring calls), fninfluence {_mb(factors['fninfluence'])} MB in memory (held before "
                          "its scoring calls, not counted in them)."]
        lines += ["", "RSS high-water mark above the RSS at the call's start (MiB; allocator slack and the "
                      "profiler's buffers included):", "",
                  "| phase | Kronfluence | fninfluence | compiled | floor |", "|---|---|---|---|---|"]
        rss_floor = get(table, "floor", "floor", "rss_above_start_bytes")
        for phase in PHASES:
            values = [get(table, s, phase, "rss_above_start_bytes")
                      for s in ("kronfluence", "fninfluence", "fninfluence-compiled")]
            lines.append(f"| {phase} | " + " | ".join(_mb(v) for v in values) + f" | {_mb(rss_floor)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=None,
                        help="default: every workload that has --size")
    parser.add_argument("--size", choices=all_sizes(), default="small",
                        help="long: transformer and gpt2 only; large: gpt2 only")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--repeats", type=int, default=1, help="the tables report the maximum over repeats")
    parser.add_argument("--batches", type=int, default=2, help="training batches per measured phase (default 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads per run (default 2)")
    parser.add_argument("--out", default="benchmarks/results", help="directory for the JSON and Markdown results")
    parser.add_argument("--one", nargs=3, metavar=("WORKLOAD", "SIZE", "SYSTEM"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batches < 1:
        parser.error("--batches must be at least 1")

    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(measure_one(*args.one, args.device, batches=args.batches)))
        return 0

    workloads = workloads_for(parser, args.workloads, args.size)
    command = "python -m benchmarks.memory " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = machine_description(args.device, args.threads)
    path = Path(args.out) / f"memory-{args.size}-{args.device.replace(':', '')}.json"
    header = dict(machine=machine, command=command, size=args.size, batches=args.batches)
    raw, failures = measure_all(workloads, args.systems, args.repeats, args.size, args.device, args.threads,
                                "benchmarks.memory", ["--batches", str(args.batches)],
                                lambda raw, failures: _save_json(path, **header, raw=raw, failures=failures))
    summary = summarise(raw)
    _save_json(path, **header, raw=raw, failures=failures, summary=summary)
    table = markdown(summary, machine, command, args.size, args.batches) + failed_lines(failures)
    path.with_suffix(".md").write_text(table)
    print(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
