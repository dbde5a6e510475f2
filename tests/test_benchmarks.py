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


def test_a_failed_system_is_reported_and_what_was_measured_before_it_is_saved(monkeypatch):
    import benchmarks.run as runner

    def fake_run(workload, size, system, device, threads, module, extra):
        if system == "kronfluence":
            raise RuntimeError("killed: out of memory\nthe rest of the error")
        return {"fit": {"seconds": 1.0}}

    saved = []
    monkeypatch.setattr(runner, "_run_subprocess", fake_run)
    raw, failures = runner.measure_all(["mlp", "cnn"], ["floor", "kronfluence", "fninfluence"], 1, "small", "cpu", 2,
                                       "benchmarks.run", [], lambda raw, failures: saved.append(
                                           (sum(len(runs) for systems in raw.values() for runs in systems.values()),
                                            len(failures))))
    assert [len(raw[w]["fninfluence"]) for w in ("mlp", "cnn")] == [1, 1] and raw["mlp"]["kronfluence"] == []
    assert len(failures) == 2 and failures[0].startswith("mlp/small kronfluence")
    assert saved == [(1, 0), (1, 1), (2, 1), (3, 1), (3, 2), (4, 2)]  # after every system, failed ones included
    table = runner.markdown(runner.summarise(raw), "test machine", "cmd") + runner.failed_lines(failures)
    assert "- mlp/small kronfluence (repeat 1): killed: out of memory" in table and "the rest" not in table
