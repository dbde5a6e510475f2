"""Side-by-side benchmark: fninfluence (eager and compiled) against Kronfluence 1.0.1 and the one-epoch floor.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.run --size small --repeats 3
    python -m benchmarks.run --size medium --workloads mlp cnn --repeats 3 --device cuda
    python -m benchmarks.run --size large --workloads gpt2 --repeats 1 --batches 4   # a 4-batch slice only

Every measurement runs in a fresh subprocess (so peak memory is that run's own), and the runs are
interleaved: repeat r runs every workload's systems in an order rotated by r, so slow drift of a shared
machine spreads over all systems instead of penalising one. Each subprocess first runs all its phases on a
two-batch slice of the data (warm-up: imports, first-call planning and, for the compiled system,
compilation), then times each phase on the full data (or, with ``--batches N``, on its first N batches
only, after a warm-up on at most N batches). Phases: covariance, eigendecomposition, lambda (EKFAC),
pairwise scores (queries against the training set), self scores. The floor is one forward and backward
pass over the training set (``loss.backward()`` per batch).

Peak memory per phase: RSS high-water mark on CPU (reset at the phase's start through /proc/self/clear_refs),
``torch.cuda.max_memory_allocated`` on CUDA; both are stored with the phase's starting value (RSS, or memory
allocated), and the table shows the peak above the start, which leaves out the ~700 MB of the Python process
with torch, transformers and Kronfluence imported (``benchmarks.memory`` measures the peak of tensor
allocations per call, the number to compare between libraries). Results: medians, min and max over
repeats, and the ratios Kronfluence / fninfluence and fninfluence / floor, written as JSON and as a
Markdown table (file stem ``{size}-{device}``, ``-{N}batches`` appended with ``--batches``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

SYSTEMS = ("floor", "kronfluence", "fninfluence", "fninfluence-compiled")
PHASES = ("covariance", "eigendecomposition", "lambda", "pairwise", "self")
WORKLOADS = ("mlp", "cnn", "transformer", "gpt2")


# -- one measurement (runs in its own process) ----------------------------------------------------------

def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_peak_bytes() -> int:
    """The process's RSS high-water mark (VmHWM)."""
    return _status_bytes("VmHWM")


def _rss_bytes() -> int:
    """The process's current RSS (VmRSS)."""
    return _status_bytes("VmRSS")


def reset_rss_peak() -> None:
    """Resets VmHWM to the current RSS (Linux; a no-op where /proc/self/clear_refs is not writable)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


class Meter:
    """Wall time and peak memory of a block: RSS high-water mark on CPU, max allocated on CUDA, each with its
    value at the block's start (``start_bytes``), so that ``peak_bytes - start_bytes`` is the block's own."""

    def __init__(self, device):
        self.device = device
        self.results: Dict[str, Dict[str, float]] = {}

    def _sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _reset_peak(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_rss_peak()

    def _current(self) -> int:
        import torch

        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return _rss_bytes()

    def _peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return _rss_peak_bytes()

    @contextmanager
    def phase(self, name: str):
        self._sync()
        self._reset_peak()
        start_bytes = self._current()
        started = time.perf_counter()
        yield
        self._sync()
        self.results[name] = {"seconds": time.perf_counter() - started, "peak_bytes": self._peak(),
                              "start_bytes": start_bytes}


class PassTimes(logging.Handler):
    """Collects fninfluence's per-pass timing records (``extra={"phase", "seconds", "finalize_seconds"}``)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.passes: Dict[str, Dict[str, float]] = {}

    def emit(self, record):
        if hasattr(record, "phase") and hasattr(record, "finalize_seconds"):
            self.passes[record.phase] = {"seconds": record.seconds, "finalize_seconds": record.finalize_seconds}


def _slice(dataset, count):
    from torch.utils.data import Subset

    return Subset(dataset, range(min(count, len(dataset))))


def _measure_floor(work, device, meter, train, warm):
    """One forward and backward pass over the training set, ``loss.backward()`` per batch."""
    from torch.utils.data import DataLoader

    model = work.model.to(device)

    def epoch(data):
        for batch in DataLoader(data, batch_size=work.batch_size):
            batch = [t.to(device) for t in batch]
            model.zero_grad(set_to_none=True)
            work.task.compute_train_loss(batch, model, sample=False).backward()

    epoch(warm)
    with meter.phase("floor"):
        epoch(train)
    model.zero_grad(set_to_none=True)


def _measure_fninfluence(work, device, meter, compiled: bool, train, warm):
    import fninfluence

    model = work.model.to(device)
    options = dict(batch_size=work.batch_size, compile=compiled, progress=False)
    fit_options = dict(strategy="ekfac", use_empirical_fisher=False)  # Kronfluence's default FactorArguments
    warm_factors = fninfluence.fit_factors(model, work.task, warm, **fit_options, **options)
    fninfluence.pairwise_scores(model, work.task, warm_factors, work.queries, warm, **options)
    fninfluence.self_scores(model, work.task, warm_factors, warm, **options)

    logger = logging.getLogger("fninfluence")
    handler = PassTimes()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    with meter.phase("fit"):
        factors = fninfluence.fit_factors(model, work.task, train, **fit_options, **options)
    logger.removeHandler(handler)
    passes = handler.passes
    meter.results["covariance"] = {"seconds": passes["covariance"]["seconds"]}
    meter.results["eigendecomposition"] = {"seconds": passes["covariance"]["finalize_seconds"]}
    meter.results["lambda"] = {"seconds": passes["lambda"]["seconds"] + passes["lambda"]["finalize_seconds"]}
    with meter.phase("pairwise"):
        fninfluence.pairwise_scores(model, work.task, factors, work.queries, train, **options)
    with meter.phase("self"):
        fninfluence.self_scores(model, work.task, factors, train, **options)


def _measure_kronfluence(work, device, meter, directory, train, warm):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    model = prepare_model(work.kronfluence_model.to(device), work.kronfluence_task)
    analyzer = Analyzer("bench", model=model, task=work.kronfluence_task, cpu=device.type == "cpu",
                        disable_tqdm=True, output_dir=directory, log_level=logging.WARNING)
    factor_args = FactorArguments(strategy="ekfac")
    score_args = ScoreArguments()
    batch, queries = work.batch_size, len(work.queries)

    def run(train, prefix, measure):
        def phase(name, fn):
            if measure:
                with meter.phase(name):
                    fn()
            else:
                fn()

        phase("covariance", lambda: analyzer.fit_covariance_matrices(
            prefix + "f", train, per_device_batch_size=batch, factor_args=factor_args, overwrite_output_dir=True))
        phase("eigendecomposition", lambda: analyzer.perform_eigendecomposition(
            prefix + "f", factor_args=factor_args, overwrite_output_dir=True))
        phase("lambda", lambda: analyzer.fit_lambda_matrices(
            prefix + "f", train, per_device_batch_size=batch, factor_args=factor_args, overwrite_output_dir=True))
        # all queries in one batch: one pass over the training set, Kronfluence's fastest setting
        phase("pairwise", lambda: analyzer.compute_pairwise_scores(
            prefix + "p", prefix + "f", work.queries, train, per_device_query_batch_size=queries,
            per_device_train_batch_size=batch, score_args=score_args, overwrite_output_dir=True))
        phase("self", lambda: analyzer.compute_self_scores(
            prefix + "s", prefix + "f", train, per_device_train_batch_size=batch, score_args=score_args,
            overwrite_output_dir=True))

    run(warm, "warm", measure=False)
    run(train, "", measure=True)
    fit = sum(meter.results[p]["seconds"] for p in ("covariance", "eigendecomposition", "lambda"))
    # the fit's peak above the covariance phase's start: the three calls run back to back
    meter.results["fit"] = {"seconds": fit,
                            "peak_bytes": max(meter.results[p]["peak_bytes"]
                                              for p in ("covariance", "eigendecomposition", "lambda")),
                            "start_bytes": meter.results["covariance"]["start_bytes"]}


def measure_one(workload: str, size: str, system: str, device_name: str,
                batches: Optional[int] = None) -> Dict[str, Dict[str, float]]:
    """One system's phases on one workload; ``batches`` times the first that many training batches only."""
    import torch

    from benchmarks.workloads import build

    device = torch.device(device_name)
    work = build(workload, size)
    train = work.train if batches is None else _slice(work.train, batches * work.batch_size)
    warm = _slice(work.train, min(2, batches or 2) * work.batch_size)  # the warm-up slice: two batches at most
    meter = Meter(device)
    if system == "floor":
        _measure_floor(work, device, meter, train, warm)
    elif system == "kronfluence":
        with tempfile.TemporaryDirectory() as directory:
            _measure_kronfluence(work, device, meter, directory, train, warm)
    else:
        _measure_fninfluence(work, device, meter, compiled=system == "fninfluence-compiled", train=train, warm=warm)
    return meter.results


# -- the driver ------------------------------------------------------------------------------------------

def _run_subprocess(workload, size, system, device, threads, module: str = "benchmarks.run",
                    extra: Sequence[str] = ()) -> Dict[str, Dict[str, float]]:
    """Runs ``python -m module --one workload size system --device .. --threads .. *extra`` in a fresh process
    (threads pinned, ``OMP_WAIT_POLICY=PASSIVE``) and returns the JSON on its last line of output."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", module, "--one", workload, size, system, "--device", device,
               "--threads", str(threads), *extra]
    finished = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True)
    if finished.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{finished.stderr[-4000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def _save_json(path: Path, **content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=1))


def measure_all(workloads, systems, repeats: int, size: str, device: str, threads: int, module: str,
                extra: Sequence[str], save: Callable[[Dict, List[str]], None]):
    """Every (repeat, workload, system) in a fresh process, the systems' order rotated per repeat. After each one
    ``save(raw, failures)`` writes what is measured so far, so a run that stops (killed, out of memory) keeps it;
    a system whose process fails is reported in ``failures`` and the others go on."""
    raw: Dict[str, Dict[str, List]] = {w: {s: [] for s in systems} for w in workloads}
    failures: List[str] = []
    for repeat in range(repeats):
        for workload in workloads:
            shift = repeat % len(systems)
            for system in systems[shift:] + systems[:shift]:
                started = time.perf_counter()
                try:
                    raw[workload][system].append(_run_subprocess(workload, size, system, device, threads,
                                                                 module=module, extra=extra))
                    status = f"{time.perf_counter() - started:.1f}s"
                except RuntimeError as error:
                    failures.append(f"{workload}/{size} {system} (repeat {repeat + 1}): {error}")
                    status = f"FAILED after {time.perf_counter() - started:.1f}s (see the JSON's failures)"
                print(f"[{repeat + 1}/{repeats}] {workload}/{size} {system}: {status}", file=sys.stderr, flush=True)
                save(raw, failures)
    return raw, failures


def _summary(values: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise(raw: Dict[str, Dict[str, List[Dict[str, Dict[str, float]]]]]) -> Dict:
    """Medians and spreads per workload, system and phase; ratios of medians."""
    summary = {}
    for workload, systems in raw.items():
        table = {}
        for system, runs in systems.items():
            phases = sorted({p for run in runs for p in run})
            table[system] = {p: {"seconds": _summary([run[p]["seconds"] for run in runs]),
                                 **({"peak_bytes": _summary([run[p]["peak_bytes"] for run in runs])}
                                    if all("peak_bytes" in run[p] for run in runs) else {}),
                                 **({"start_bytes": _summary([run[p]["start_bytes"] for run in runs]),
                                     # VmRSS and VmHWM are updated lazily (per-thread counters): clamp at 0
                                     "above_start_bytes": _summary([max(0, run[p]["peak_bytes"]
                                                                           - run[p]["start_bytes"]) for run in runs])}
                                    if all("start_bytes" in run[p] for run in runs) else {})}
                             for p in phases}
        summary[workload] = table
    return summary


def _median(table, system, phase, key="seconds"):
    try:
        return table[system][phase][key]["median"]
    except KeyError:
        return None


def _megabytes(value: Optional[float]) -> str:
    """MiB, with more digits for small values (peaks above a phase's start can be under 1 MiB)."""
    if value is None:
        return "–"
    mb = value / 2**20
    return f"{mb:.2f}" if mb < 10 else f"{mb:.1f}" if mb < 100 else f"{mb:.0f}"


def markdown(summary: Dict, machine: str, command: str) -> str:
    lines = [f"Machine: {machine}", "", f"Command: `{command}`", ""]
    header = ("| workload | phase | Kronfluence s | fninfluence s | compiled s | Kronfluence / fninfluence | "
              "Kronfluence / compiled | peak MB above start K / fn / compiled |")
    for workload, table in summary.items():
        lines += [f"### {workload}", "", header, "|" + "---|" * 8]
        for phase in PHASES + ("fit",):
            k = _median(table, "kronfluence", phase)
            e = _median(table, "fninfluence", phase)
            c = _median(table, "fninfluence-compiled", phase)
            # the peak above the phase's start (older results without start_bytes: the absolute peak)
            peaks = [_median(table, s, phase, "above_start_bytes") if _median(table, s, phase, "above_start_bytes")
                     is not None else _median(table, s, phase, "peak_bytes")
                     for s in ("kronfluence", "fninfluence", "fninfluence-compiled")]
            spread = lambda s: table.get(s, {}).get(phase, {}).get("seconds")
            cell = lambda v, s: "–" if v is None else f"{v:.3f} [{spread(s)['min']:.3f}–{spread(s)['max']:.3f}]"
            ratio = lambda a, b: "–" if a is None or b is None or b == 0 else f"{a / b:.2f}×"
            lines.append(f"| {workload} | {phase} | {cell(k, 'kronfluence')} | {cell(e, 'fninfluence')} | "
                         f"{cell(c, 'fninfluence-compiled')} | {ratio(k, e)} | {ratio(k, c)} | "
                         + " / ".join(_megabytes(p) for p in peaks) + " |")
        floor = _median(table, "floor", "floor")
        if floor:
            for system in ("fninfluence", "fninfluence-compiled", "kronfluence"):
                pairwise = _median(table, system, "pairwise")
                if pairwise:
                    lines.append(f"\n{system} pairwise / floor ({floor:.3f} s): {pairwise / floor:.2f}×")
        lines.append("")
    return "\n".join(lines)


def machine_description(device: str, threads: int) -> str:
    import torch

    text = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {threads} threads, " \
           f"torch {torch.__version__}, Python {platform.python_version()}"
    if device.startswith("cuda"):
        text += f", {torch.cuda.get_device_name(0)}"
    return text


def all_sizes() -> Tuple[str, ...]:
    """Every size some workload has, in the order of ``benchmarks.workloads.SIZES``."""
    from benchmarks.workloads import SIZES

    return tuple(dict.fromkeys(size for sizes in SIZES.values() for size in sizes))


def workloads_for(parser: argparse.ArgumentParser, workloads: Optional[List[str]], size: str) -> List[str]:
    """The workloads to run at ``size``: those asked for (an error if one lacks the size), or all that have it."""
    from benchmarks.workloads import SIZES

    if workloads is None:
        return [w for w in WORKLOADS if size in SIZES[w]]
    missing = [w for w in workloads if size not in SIZES[w]]
    if missing:
        parser.error(f"--size {size} is not defined for {', '.join(missing)} "
                     f"(it is for {', '.join(w for w in WORKLOADS if size in SIZES[w])})")
    return workloads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=all_sizes(), default="small",
                        help="long: transformer and gpt2 only; large: gpt2 only")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=None,
                        help="default: every workload that has --size")
    parser.add_argument("--batches", type=int, default=None,
                        help="time the first N training batches only (default: all the training data)")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads per run (default 2)")
    parser.add_argument("--out", default="benchmarks/results", help="directory for the JSON and Markdown results")
    parser.add_argument("--one", nargs=3, metavar=("WORKLOAD", "SIZE", "SYSTEM"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(measure_one(*args.one, args.device, batches=args.batches)))
        return 0

    args.workloads = workloads_for(parser, args.workloads, args.size)
    if args.batches is not None and args.batches < 1:
        parser.error("--batches must be at least 1")
    extra = [] if args.batches is None else ["--batches", str(args.batches)]
    stem = f"{args.size}-{args.device.replace(':', '')}" + ("" if args.batches is None else f"-{args.batches}batches")
    out = Path(args.out)
    command = "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = machine_description(args.device, args.threads)
    save = lambda raw, failures: _save_json(out / f"{stem}.json", machine=machine, command=command,  # noqa: E731
                                            raw=raw, failures=failures)
    raw, failures = measure_all(args.workloads, args.systems, args.repeats, args.size, args.device, args.threads,
                                "benchmarks.run", extra, save)
    summary = summarise(raw)
    _save_json(out / f"{stem}.json", machine=machine, command=command, raw=raw, failures=failures, summary=summary)
    table = markdown(summary, machine, command) + failed_lines(failures)
    (out / f"{stem}.md").write_text(table)
    print(table)
    return 1 if failures else 0


def failed_lines(failures: List[str]) -> str:
    """The runs that failed, first line of each error, for the Markdown tables (the JSON has the whole error)."""
    if not failures:
        return ""
    return "\n\nFailed runs (their cells are empty):\n\n" + "\n".join(
        f"- {failure.splitlines()[0]}" for failure in failures) + "\n"


if __name__ == "__main__":
    sys.exit(main())
