"""Per-phase summaries on the `fninfluence` logger, and progress bars that `progress=False` silences."""

from __future__ import annotations

import logging
import re

import torch

import fninfluence as fi
from fninfluence.progress import peak_memory, phase_summary
from models import classification_data, mlp

SUMMARY = re.compile(r"^(.+): (\d+) examples in \d+\.\d\d s \(\d+ examples/s\), peak memory (\d+) MiB \(CPU RSS\)$")


def _run_all(progress: bool):
    torch.manual_seed(0)
    model = mlp(d_in=4, hidden=3, classes=2).double().eval()
    task = fi.classification_task()
    train, queries = classification_data(20, d_in=4, classes=2), classification_data(3, d_in=4, classes=2, seed=1)
    factors = fi.fit_factors(model, task, train, strategy="ekfac", batch_size=8, progress=progress)
    fi.pairwise_scores(model, task, factors, queries, train, batch_size=8, progress=progress)
    fi.self_scores(model, task, factors, train, batch_size=8, progress=progress)


def test_every_pass_over_data_logs_one_summary_line(caplog):
    with caplog.at_level(logging.INFO, logger="fninfluence"):
        _run_all(progress=False)
    lines = [record.getMessage() for record in caplog.records if record.name == "fninfluence"]
    parsed = [SUMMARY.match(line) for line in lines]
    assert all(parsed), lines
    # each pass counts its own examples (the lambda pass does not add the covariance pass's)
    assert [(m.group(1), int(m.group(2))) for m in parsed] == [
        ("ekfac covariance pass", 20), ("ekfac lambda pass", 20), ("query gradients", 3), ("pairwise scores", 20),
        ("self scores", 20)]
    assert all(int(m.group(3)) > 50 for m in parsed)  # a Python process with torch loaded holds > 50 MiB


def test_summaries_are_silent_unless_logging_asks_for_them(caplog):
    with caplog.at_level(logging.WARNING, logger="fninfluence"):
        _run_all(progress=False)
    assert not [r for r in caplog.records if r.name == "fninfluence"]


def test_progress_false_prints_nothing_and_true_draws_bars(capfd):
    _run_all(progress=False)
    quiet = capfd.readouterr()
    assert quiet.out == "" and quiet.err == ""
    _run_all(progress=True)
    err = capfd.readouterr().err
    for label in ("ekfac covariance", "ekfac lambda", "query gradients", "pairwise scores", "self scores"):
        assert label in err
    assert "0/3 [" in err  # 20 examples in batches of 8: each bar starts with its total (later refreshes are timed)


def test_peak_memory_and_summary_format():
    before, what = peak_memory()
    assert what == "CPU RSS" and before > 50
    block = torch.ones(64 * 1024 * 1024 // 8, dtype=torch.float64)  # 64 MiB, touched
    after, _ = peak_memory(torch.device("cpu"))
    assert after >= before and after > 64
    del block
    assert phase_summary("fit", 10, 0.0).startswith("fit: 10 examples in 0.00 s, peak memory ")
    assert "(5 examples/s)" in phase_summary("fit", 10, 2.0)
