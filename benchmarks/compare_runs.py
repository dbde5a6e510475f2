"""Two runs of ``benchmarks.run`` side by side: the Kronfluence / fninfluence ratios of each, per phase.

    python -m benchmarks.compare_runs before/small-cpu.json after/small-cpu.json

For a change to the library measured as two back-to-back runs of the same benchmark (e.g. the old tree and
the new one): absolute times drift on shared machines, the ratio to Kronfluence run in the same process
rotation drifts less. Prints a Markdown table of median ratios and median seconds.
"""

from __future__ import annotations

import argparse
import json

PHASES = ("covariance", "lambda", "pairwise", "self", "fit")


def _median(summary, workload: str, system: str, phase: str) -> float:
    return summary[workload][system][phase]["seconds"]["median"]


def table(before, after) -> str:
    lines = ["| workload | phase | K/fn before | K/fn after | K/compiled before | K/compiled after "
             "| fn s before → after | compiled s before → after |", "|---|---|---|---|---|---|---|---|"]
    for workload in before:
        for phase in PHASES:
            try:
                k = [_median(run, workload, "kronfluence", phase) for run in (before, after)]
                fn = [_median(run, workload, "fninfluence", phase) for run in (before, after)]
                compiled = [_median(run, workload, "fninfluence-compiled", phase) for run in (before, after)]
            except KeyError:
                continue
            lines.append(f"| {workload} | {phase} | {k[0] / fn[0]:.2f}× | {k[1] / fn[1]:.2f}× | "
                         f"{k[0] / compiled[0]:.2f}× | {k[1] / compiled[1]:.2f}× | {fn[0]:.3f} → {fn[1]:.3f} | "
                         f"{compiled[0]:.3f} → {compiled[1]:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    options = parser.parse_args()
    with open(options.before) as f, open(options.after) as g:
        print(table(json.load(f)["summary"], json.load(g)["summary"]))


if __name__ == "__main__":
    main()
