"""fninfluence.plot: the figures show the right examples, in order, with their scores; bad input is refused."""

from __future__ import annotations

import io
import sys

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from fninfluence.errors import InfluenceError  # noqa: E402
from fninfluence.plot import as_displayable, influential_examples, layer_contributions, score_distribution  # noqa: E402
from fninfluence.ranking import top_indices  # noqa: E402


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def test_grid_shows_each_query_with_its_proponents_then_opponents_in_order():
    scores = torch.tensor([[0.5, -2.0, 3.0, float("nan"), -0.1, 1.0],
                           [-1.0, 4.0, 0.0, 2.0, -3.0, 0.2]])
    figure = influential_examples(torch.rand(2, 1, 5, 5), torch.rand(6, 1, 5, 5), scores, k=2,
                                  train_labels=[f"c{i}" for i in range(6)])
    query_panel, proponent_panel, opponent_panel = figure.subfigs
    titles = [[ax.get_title() for ax in panel.axes] for panel in (proponent_panel, opponent_panel)]
    assert titles[0] == ["#2 c2\n+3", "#5 c5\n+1", "#1 c1\n+4", "#3 c3\n+2"]  # row-major: query 0, then query 1
    assert titles[1] == ["#1 c1\n-2", "#4 c4\n-0.1", "#4 c4\n-3", "#0 c0\n-1"]  # NaN (#3 of query 0) never shown
    assert [ax.get_title() for ax in query_panel.axes] == ["query 0", "query 1"]
    assert "proponents" in proponent_panel._suptitle.get_text()
    assert _png(figure)[:4] == b"\x89PNG"


def test_images_of_every_layout_become_unit_range_pictures():
    grey = torch.arange(2 * 12, dtype=torch.float32).reshape(2, 12) * 3 - 7
    shown = as_displayable(grey, image_shape=(3, 4))
    assert shown.shape == (2, 3, 4)
    assert torch.allclose(shown.amin(dim=(1, 2)), torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(shown.amax(dim=(1, 2)), torch.ones(2, dtype=torch.float64))
    colour = torch.rand(3, 3, 7, 5, dtype=torch.float64)
    assert as_displayable(colour).shape == (3, 7, 5, 3)  # channels first -> last
    expected = (colour[1, :, 2, 4] - colour[1].min()) / (colour[1].max() - colour[1].min())
    torch.testing.assert_close(as_displayable(colour)[1, 2, 4], expected)
    assert as_displayable(torch.zeros(2, 4, 4)).eq(0).all()  # constant images do not divide by zero
    with pytest.raises(InfluenceError, match="image_shape"):
        as_displayable(torch.rand(2, 64))


def test_grid_refuses_images_that_do_not_match_the_scores():
    with pytest.raises(InfluenceError, match="6 training images"):
        influential_examples(torch.rand(2, 4, 4), torch.rand(6, 4, 4), torch.rand(2, 5), k=1)
    with pytest.raises(InfluenceError, match="k must be between 1 and"):
        influential_examples(torch.rand(1, 4, 4), torch.rand(3, 4, 4), torch.rand(1, 3), k=4)


def test_top_indices_skip_missing_scores():
    scores = torch.tensor([[1.0, float("nan"), -1.0, 5.0]])
    proponents, opponents = top_indices(scores, 3)
    assert proponents.tolist() == [[3, 0, 2]] and opponents.tolist() == [[2, 0, 3]]
    with pytest.raises(InfluenceError, match="between 1 and the number of scored training examples \\(3"):
        top_indices(scores, 4)


def test_score_distribution_counts_every_finite_score_once():
    torch.manual_seed(0)
    scores = torch.randn(2, 500) * torch.logspace(0, 4, 500)  # heavy-tailed, both signs
    scores[1, :7] = float("nan")
    figure = score_distribution(scores, bins=40)
    axis = figure.axes[0]
    counts = [int(round(sum(patch.get_path().vertices[1:-1:2, 1]))) for patch in axis.patches]
    assert counts == [500, 493]  # the step outline's bar heights sum to the finite scores of each query
    assert axis.get_xscale() == "symlog" and [t.get_text() for t in axis.get_legend().get_texts()] == ["query 0", "query 1"]
    with pytest.raises(InfluenceError, match="queries must be indices"):
        score_distribution(scores, queries=[2])


def test_layer_contributions_are_shares_of_the_absolute_score_mass():
    per_layer = {"conv": torch.tensor([[1.0, -3.0]]), "head": torch.tensor([[4.0, 0.0]]), "": torch.zeros(1, 2)}
    figure = layer_contributions(per_layer)
    axis = figure.axes[0]
    widths = [bar.get_width() for bar in axis.patches]
    assert widths == pytest.approx([0.5, 0.5, 0.0])
    labels = [t.get_text() for t in axis.get_yticklabels()]
    assert labels == ["conv", "head", "(root)"] and axis.get_yticks().tolist() == [2, 1, 0]  # first layer on top
    assert "mean -1" in axis.texts[0].get_text() and "50.0%" in axis.texts[1].get_text()
    with pytest.raises(InfluenceError, match="same shape"):
        layer_contributions({"a": torch.zeros(2), "b": torch.zeros(3)})


def test_missing_matplotlib_is_an_import_error_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r'pip install "fninfluence\[plot\]"'):
        layer_contributions({"a": torch.ones(2)})
