"""`fninfluence inspect` and `fninfluence top` on stores that are partial, self-influence, several or unfinished."""

from __future__ import annotations

import json
import re

import pytest
import torch

import fninfluence as fi
from fninfluence.cli import main
from models import classification_data, mlp

N, Q = 20, 4


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Half-done factors (cell 1 of 2 missing), half-done pairwise scores, and complete self scores."""
    root = tmp_path_factory.mktemp("stores")
    torch.manual_seed(0)
    model = mlp(d_in=4, hidden=3, classes=2).double().eval()
    task = fi.classification_task()
    train, queries = classification_data(N, d_in=4, classes=2), classification_data(Q, d_in=4, classes=2, seed=1)
    kwargs = dict(batch_size=8, progress=False)
    partial = fi.fit_factors(model, task, train, strategy="kfac", store=root / "analysis" / "partial_factors",
                             data_partitions=2, target_data_partitions=[0], use_empirical_fisher=True, **kwargs)
    assert partial is None
    factors = fi.fit_factors(model, task, train, strategy="ekfac", use_empirical_fisher=True, **kwargs)
    full = fi.pairwise_scores(model, task, factors, queries, train, **kwargs)
    assert fi.pairwise_scores(model, task, factors, queries, train, store=root / "analysis" / "pairwise",
                              data_partitions=2, target_data_partitions=[1], **kwargs) is None
    self_influence = fi.self_scores(model, task, factors, train, store=root / "self", **kwargs)
    return root, full, self_influence


def test_inspect_reports_missing_cells_of_partial_factors_and_scores(stores, capsys):
    root, _, _ = stores
    assert main(["inspect", str(root / "analysis")]) == 0
    text = capsys.readouterr().out
    assert "partial_factors: factors store (INCOMPLETE" in text
    assert "strategy: kfac" in text and "use_empirical_fisher=true" in text
    assert ("pass covariance: not aggregated; 20 examples in 2 data x 1 module partitions, 1/2 cells done; "
            "missing: covariance-data1-modules0") in text
    assert "pairwise: pairwise store (INCOMPLETE" in text
    assert "scores: shape [4, 20] (queries x training examples)" in text
    assert "partitions: 2 data (size 10) x 1 module; 1/2 cells done; missing: pairwise-data0-modules0" in text


def test_inspect_json_is_machine_readable(stores, capsys):
    root, _, _ = stores
    assert main(["inspect", str(root / "self"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "self" and info["complete"] is True and info["shape"] == [N]
    assert info["cells_done"] == ["self-data0-modules0"] and info["cells_missing"] == []
    assert info["layers"] == ["0", "2"]


def test_top_ranks_only_the_computed_part_of_an_incomplete_store(stores, capsys):
    root, full, _ = stores
    assert main(["top", str(root / "analysis" / "pairwise"), "--query", "2", "-k", "3"]) == 0
    text = capsys.readouterr().out
    assert "10 of 20 training examples not computed yet" in text
    written = full[2, 10:]  # only data partition 1 (examples 10..19) was computed
    expected = (10 + written.topk(3).indices).tolist() + (10 + (-written).topk(3).indices).tolist()
    listed = [(int(n), float(s)) for n, s in re.findall(r"train #(\d+)\s+score (\S+)", text)]
    assert [n for n, _ in listed] == expected
    for n, score in listed:
        assert score == pytest.approx(float(full[2, n]), rel=1e-4)


def test_top_of_a_self_influence_store_lists_the_highest_and_lowest(stores, capsys):
    root, _, self_influence = stores
    assert main(["top", str(root / "self"), "-k", "2"]) == 0
    text = capsys.readouterr().out
    listed = [int(n) for n in re.findall(r"train #(\d+)", text)]
    assert listed == self_influence.topk(2).indices.tolist() + (-self_influence).topk(2).indices.tolist()
    assert main(["top", str(root / "self"), "--query", "1"]) == 1
    assert "self-influence scores" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["top", "{root}", "-k", "2"], "holds 2 of them"),                      # two scores stores below root
    (["top", "{root}/analysis/partial_factors"], "(factors)"),              # not a scores store
    (["top", "{root}/analysis/pairwise", "--query", "4"], "--query must be between 0 and 3"),
    (["inspect", "{root}/nowhere"], "does not exist"),
])
def test_cli_errors_name_the_problem(stores, capsys, argv, message):
    root, _, _ = stores
    assert main([a.format(root=root) for a in argv]) == 1
    assert message in capsys.readouterr().err


def test_inspect_an_empty_folder_or_an_unfinished_store(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 1
    assert "is not an fninfluence store and holds none" in capsys.readouterr().err
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / ".fninfluence-create.lock").write_text("{}")
    assert main(["inspect", str(tmp_path)]) == 0
    assert "killed: unfinished store\n  its layout was never completed" in capsys.readouterr().out
