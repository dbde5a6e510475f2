"""The prepared GPU run: the medium and large workloads on CUDA, fninfluence (eager and compiled) and Kronfluence
1.0.1 side by side, time and ``torch.cuda.max_memory_allocated`` per phase.

    pip install ".[test]" && python -m benchmarks.gpu --out "$OUT"

Runs, in order, each under its own time limit so that a slow one leaves time for the rest:

1. ``benchmarks.run --size medium --device cuda`` (time per phase; on CUDA its peak is max_memory_allocated);
2. ``benchmarks.memory --size medium --device cuda`` (peak memory per phase, fresh processes);
3. ``benchmarks.run --workloads gpt2 --size large --device cuda --batches N`` (the GPT-2-small-sized model);
4. ``benchmarks.memory --workloads gpt2 --size large --device cuda``.

Results go to ``--out`` as the JSON and Markdown files of each benchmark; ``gpu.log`` records what ran and how long.
The GPU's name is in each table's machine line. Nothing here runs without a CUDA device.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def _steps(out: str, repeats: int, batches: int):
    run, memory = [sys.executable, "-m", "benchmarks.run"], [sys.executable, "-m", "benchmarks.memory"]
    cuda = ["--device", "cuda", "--out", out]
    return [
        ("medium timings", run + ["--size", "medium", "--repeats", str(repeats)] + cuda),
        ("medium memory", memory + ["--size", "medium"] + cuda),
        ("large timings", run + ["--workloads", "gpt2", "--size", "large", "--repeats", "1", "--batches", str(batches)]
         + cuda),
        ("large memory", memory + ["--workloads", "gpt2", "--size", "large"] + cuda),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batches", type=int, default=8, help="batches of the large workload to time")
    parser.add_argument("--limit", type=float, default=600.0, help="seconds allowed per step")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks.gpu needs a CUDA device; none is available.", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    with open(out / "gpu.log", "a") as log:
        for name, command in _steps(str(out), args.repeats, args.batches):
            started = time.perf_counter()
            try:
                code = subprocess.run(command, timeout=args.limit).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
            failures += code != 0
            log.write(f"{name}: {' '.join(command[1:])}: exit {code} in {time.perf_counter() - started:.0f} s\n")
            log.flush()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
