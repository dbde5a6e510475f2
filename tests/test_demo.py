"""The README's main job through the command line: `fninfluence demo` trains, fits EKFAC factors, ranks
training images for each query, and leaves its factors, scores and PNG where `inspect` and `top` can read them."""

from __future__ import annotations

import contextlib
import io
import re
import sys

import pytest
import torch

from fninfluence.cli import main
from fninfluence.demo import DemoArgumentError, _save_figure
from fninfluence.ranking import top_indices
from fninfluence.store.factors_store import load_factors
from fninfluence.store.scores_store import read_scores

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One demo run (a few seconds) shared by every test here: (output folder, stdout, stderr, exit code)."""
    out = tmp_path_factory.mktemp("demo") / "results"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["demo", "--out", str(out), "--queries", "3", "--top-k", "5", "--no-progress"])
    return out, stdout.getvalue(), stderr.getvalue(), code


def _printed_rankings(text: str):
    """{(query, "proponents" | "opponents"): [(train index, label, score), ...]} from the demo's printout."""
    rankings, query, kind = {}, None, None
    for line in text.splitlines():
        if match := re.match(r"Query (\d+):", line):
            query = int(match.group(1))
        elif match := re.match(r"\s+top \d+ (proponents|opponents):", line):
            kind = match.group(1)
            rankings[(query, kind)] = []
        elif match := re.match(r"\s+train #(\d+)\s+label (\d+)\s+score (\S+)", line):
            rankings[(query, kind)].append((int(match.group(1)), int(match.group(2)), float(match.group(3))))
    return rankings


def test_demo_ranks_same_class_training_images_as_proponents(demo):
    out, stdout, _, code = demo
    assert code == 0
    assert float(re.search(r"test accuracy ([\d.]+)%", stdout).group(1)) > 85
    rankings = _printed_rankings(stdout)
    assert sorted(rankings) == [(q, kind) for q in range(3) for kind in ("opponents", "proponents")]
    query_labels = [int(m) for m in re.findall(r"Query \d+: test image #\d+, label (\d+)", stdout)]
    same_class = sum(label == query_labels[q] for q in range(3) for _, label, _ in rankings[(q, "proponents")])
    assert same_class >= 10  # the strongest proponents of a digit are mostly digits of the same class


def test_demo_store_holds_the_printed_scores_and_their_layers(demo):
    out, stdout, _, _ = demo
    stored = read_scores(out / "scores")
    assert stored["all_modules"].shape == (3, 1500) and torch.isfinite(stored["all_modules"]).all()
    layers = [name for name in stored if name != "all_modules"]
    assert layers == ["0", "2"]  # the MLP's two Linear layers, per module
    torch.testing.assert_close(stored["0"] + stored["2"], stored["all_modules"])
    proponents, opponents = top_indices(stored["all_modules"], 5)
    rankings = _printed_rankings(stdout)
    for q in range(3):
        assert [n for n, _, _ in rankings[(q, "proponents")]] == proponents[q].tolist()
        assert [n for n, _, _ in rankings[(q, "opponents")]] == opponents[q].tolist()
        for n, _, score in rankings[(q, "proponents")] + rankings[(q, "opponents")]:
            assert score == pytest.approx(float(stored["all_modules"][q, n]), rel=6e-3)  # printed with 3 digits
    factors = load_factors(out / "factors")
    assert factors.complete and factors.strategy == "ekfac" and factors.num_examples == 1500


def test_demo_writes_a_png_and_logs_one_summary_per_phase(demo):
    out, stdout, stderr, _ = demo
    png = (out / "influence.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 2 * height > 600  # one row per query, query + 5 proponents + 5 opponents across
    assert f"fninfluence inspect {out}" in stdout
    phases = re.findall(r"fninfluence: (.+?): (\d+) examples in [\d.]+ s .*peak memory \d+ MiB", stderr)
    assert phases == [("ekfac covariance pass", "1500"), ("ekfac lambda pass", "1500"), ("query gradients", "3"),
                      ("pairwise scores [pairwise-data0-modules0]", "1500")]
    assert "it/s" not in stderr and "batch/s" not in stderr  # --no-progress: no bars


def test_cli_inspect_and_top_read_the_demo_output(demo, capsys):
    out, _, _, _ = demo
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{out / 'factors'}: factors store (complete" in text
    assert "pass covariance: aggregated; 1500 examples in 1 data x 1 module partitions, 1/1 cells done" in text
    assert "activation_eigenvectors [1, 65, 65]" in text and "lambda [1, 10, 33]" in text
    assert f"{out / 'scores'}: pairwise store (complete" in text
    assert "shape [3, 1500] (queries x training examples)" in text
    assert main(["top", str(out), "--query", "1", "-k", "4"]) == 0  # the folder holds one scores store
    text = capsys.readouterr().out
    scores = read_scores(out / "scores")["all_modules"][1].double()
    listed = [int(n) for n in re.findall(r"train #(\d+)", text)]
    assert listed == scores.topk(4).indices.tolist() + (-scores).topk(4).indices.tolist()


def test_demo_refuses_to_overwrite_a_folder_that_is_not_its_store(tmp_path, capsys):
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "thesis.tex").write_text("precious")
    assert main(["demo", "--out", str(tmp_path), "--no-progress", "--quiet"]) == 1
    assert "is not an fninfluence store" in capsys.readouterr().err
    assert (tmp_path / "scores" / "thesis.tex").read_text() == "precious"


def test_demo_without_matplotlib_skips_the_png_and_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # `import matplotlib.figure` now fails
    result = {"scores": torch.randn(1, 4), "top_k": 1, "strategy": "ekfac", "query_predictions": torch.tensor([3])}
    path = _save_figure(result, torch.rand(1, 64), torch.rand(4, 64), torch.arange(4), torch.tensor([3]),
                        tmp_path / "influence.png")
    assert path is None and not (tmp_path / "influence.png").exists()
    assert 'pip install "fninfluence[plot]"' in capsys.readouterr().out


def test_demo_rejects_out_of_range_arguments():
    from fninfluence.demo import run_demo

    with pytest.raises(DemoArgumentError, match="num_queries must be between 1 and 297"):
        run_demo(num_queries=298, progress=False, out="unused")
