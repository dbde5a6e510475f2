"""`fninfluence inspect` and `fninfluence top` on stores that are partial, self-influence, several or unfinished."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import fninfluence as fi
from fninfluence.cli import main
from fninfluence.store.scores_store import read_scores
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


# -- odd, truncated and crafted stores: a clear error, never a traceback or a huge allocation -------------

def _edit(path, change):
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def _header(store):
    return lambda change: _edit(store / "zarr.json", lambda r: change(r["attributes"]["fninfluence"]))


@pytest.fixture
def odd_folder(stores, tmp_path):
    """A good self-influence store beside a truncated and an odd copy of it."""
    import shutil

    root, _, _ = stores
    folder = tmp_path / "scan"
    shutil.copytree(root / "self", folder / "a_good")
    shutil.copytree(root / "self", folder / "b_truncated")
    text = (folder / "b_truncated" / "zarr.json").read_text()
    (folder / "b_truncated" / "zarr.json").write_text(text[: len(text) // 2])
    shutil.copytree(root / "self", folder / "c_odd")
    _header(folder / "c_odd")(lambda h: h.update(partitions=5, layers="0"))
    return folder


def test_inspect_reports_each_bad_store_and_goes_on(odd_folder, capsys):
    assert main(["inspect", str(odd_folder)]) == 1
    captured = capsys.readouterr()
    assert "a_good: self store (complete" in captured.out
    assert "c_odd: unreadable store\n  " in captured.out and "odd or truncated" in captured.out
    assert "b_truncated: unfinished store" in captured.out  # no readable attributes: described as never finished
    assert "1 of 3 stores could not be read" in captured.err and "c_odd" in captured.err
    assert main(["inspect", str(odd_folder), "--json"]) == 1
    infos = {Path(i["path"]).name: i for i in json.loads(capsys.readouterr().out)}
    assert infos["a_good"]["kind"] == "self" and infos["c_odd"]["kind"] == "unreadable"


def test_top_skips_a_bad_store_beside_the_scores_store(odd_folder, stores, capsys):
    _, _, self_influence = stores
    assert main(["top", str(odd_folder), "-k", "2"]) == 0
    captured = capsys.readouterr()
    assert [int(n) for n in re.findall(r"train #(\d+)", captured.out)][:2] == self_influence.topk(2).indices.tolist()
    assert "skipped an unreadable store" in captured.err and "c_odd" in captured.err
    for name in ("b_truncated", "c_odd"):
        assert main(["top", str(odd_folder / name)]) == 1
        assert "holds 0 of them" in capsys.readouterr().err


def test_crafted_shapes_are_refused_before_allocating(stores, tmp_path, capsys):
    import shutil

    root, _, _ = stores
    store = tmp_path / "crafted"
    shutil.copytree(root / "analysis" / "pairwise", store)
    big = 10 ** 7  # 10^14 float64 scores: 727 TiB

    def grow(record):
        record["shape"] = [big, big]
        record["chunk_grid"]["configuration"]["chunk_shape"] = [big, big // 2]

    _edit(store / "all_modules" / "zarr.json", grow)
    assert main(["top", str(store)]) == 1
    assert "has shape [10000000, 10000000]" in capsys.readouterr().err  # the header disagrees
    _header(store)(lambda h: h.update(shape=[big, big], partitions={**h["partitions"], "partition_size": big // 2},
                                      train_data={**h["train_data"], "size": big},
                                      query_data={**h["query_data"], "size": big}))
    assert main(["top", str(store)]) == 1
    assert re.search(r"would allocate \d+\.\d GiB, more than this machine's", capsys.readouterr().err)
    with pytest.raises(fi.InfluenceError, match="would allocate"):
        read_scores(store, allow_partial=True)


@pytest.mark.parametrize("size, message", [(10 ** 6, "gives"), (2 ** 40, "not a sane size")])
def test_crafted_layer_sizes_are_refused_before_allocating(size, message, tmp_path):
    torch.manual_seed(0)
    model = mlp(d_in=4, hidden=3, classes=2).double().eval()
    factors = fi.fit_factors(model, fi.classification_task(), classification_data(N, d_in=4, classes=2),
                             strategy="kfac", use_empirical_fisher=True, progress=False)
    factors.save(tmp_path / "f")

    def grow(header):
        header["layers"][0]["in_features"] = size

    _header(tmp_path / "f")(grow)
    with pytest.raises(fi.InfluenceError, match=f"marker was written for other metadata|{message}"):
        fi.Factors.load(tmp_path / "f")  # the markers certify the old metadata
    from fninfluence.store import factors_store, zarr_io

    header = json.loads((tmp_path / "f" / "zarr.json").read_text())["attributes"]["fninfluence"]
    identity = zarr_io.identity_digest(header, factors_store.IDENTITY)
    for marker in (tmp_path / "f" / "_done").glob("*.json"):  # forged to match: the shapes are still checked
        _edit(marker, lambda record: record.update(identity=identity))
    with pytest.raises(fi.InfluenceError, match=message):
        fi.Factors.load(tmp_path / "f")


def test_inspect_counts_a_forged_marker_as_missing(stores, tmp_path, capsys):
    import shutil

    root, _, _ = stores
    shutil.copytree(root / "analysis" / "pairwise", tmp_path / "p")
    (tmp_path / "p" / "_done" / "pairwise-data0-modules0.json").write_text("{}")
    assert main(["inspect", str(tmp_path / "p")]) == 0
    assert "1/2 cells done; missing: pairwise-data0-modules0" in capsys.readouterr().out
