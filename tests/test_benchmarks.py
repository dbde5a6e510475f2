"""The benchmark harness runs (its numbers are in docs/benchmarks.md, not asserted here): one fninfluence
measurement and the floor on the small MLP, then the summary and table the runner writes."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run import PHASES, markdown, measure_one, summarise  # noqa: E402


def test_one_measurement_reports_every_phase_and_the_runner_tabulates_it():
    fninfluence = measure_one("mlp", "small", "fninfluence", "cpu")
    floor = measure_one("mlp", "small", "floor", "cpu")
    assert set(PHASES) <= set(fninfluence) and "fit" in fninfluence and "floor" in floor
    assert all(fninfluence[p]["seconds"] > 0 for p in PHASES)
    assert fninfluence["pairwise"]["peak_bytes"] > 0
    summary = summarise({"mlp": {"fninfluence": [fninfluence, fninfluence], "floor": [floor]}})
    assert summary["mlp"]["fninfluence"]["pairwise"]["seconds"]["n"] == 2
    table = markdown(summary, "test machine", "python -m benchmarks.run")
    assert "| mlp | pairwise |" in table and "fninfluence pairwise / floor" in table


def test_compare_runs_tabulates_the_ratio_of_each_run():
    from benchmarks.compare_runs import table

    def run(k, fn, compiled):
        return {"mlp": {system: {"fit": {"seconds": {"median": seconds}}}
                        for system, seconds in (("kronfluence", k), ("fninfluence", fn),
                                                ("fninfluence-compiled", compiled))}}

    rows = table(run(1.0, 0.5, 0.25), run(1.2, 0.3, 0.4)).splitlines()
    assert rows[2] == "| mlp | fit | 2.00× | 4.00× | 4.00× | 3.00× | 0.500 → 0.300 | 0.250 → 0.400 |"
    assert len(rows) == 3  # phases a run lacks are left out
