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
