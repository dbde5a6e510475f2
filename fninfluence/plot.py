"""Figures of influence scores: the most influential training images, score distributions, per-layer shares.

matplotlib is an optional dependency: ``pip install "fninfluence[plot]"``. Every function returns a
``matplotlib.figure.Figure`` built without pyplot's global state (so it works headless and in threads);
save it with ``figure.savefig("influence.png")``.
"""

from __future__ import annotations

import math
from typing import List, Mapping, Optional, Sequence, Tuple

import torch

from .errors import InfluenceError
from .ranking import as_score_matrix as _as_scores, top_indices

Images = torch.Tensor


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "fninfluence.plot needs matplotlib, which is not installed. Install it with: "
            'pip install "fninfluence[plot]" (or pip install matplotlib)'
        ) from error
    return Figure(figsize=(width, height), layout="constrained")


def as_displayable(images: Images, image_shape: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
    """Images as ``[N, H, W]`` (grey) or ``[N, H, W, 3]`` (colour) floats in ``[0, 1]`` for ``imshow``.

    Accepts ``[N, H, W]``, ``[N, C, H, W]`` and ``[N, H, W, C]`` with ``C`` in {1, 3}, or flat ``[N, D]`` rows
    with ``image_shape`` (e.g. ``(8, 8)``). Each image is min-max scaled on its own, so normalised inputs
    (mean 0, unit variance) display as they look.
    """
    images = torch.as_tensor(images).detach().to("cpu", torch.float64)
    if image_shape is not None:
        images = images.reshape(images.shape[0], *image_shape)
    if images.dim() == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
        images = images.permute(0, 2, 3, 1)  # channels first -> channels last
    if images.dim() == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if not (images.dim() == 3 or (images.dim() == 4 and images.shape[-1] == 3)):
        raise InfluenceError(
            f"Cannot show images of shape {tuple(images.shape)}: pass [N, H, W], [N, C, H, W] or [N, H, W, C] with "
            "C = 1 or 3, or flat [N, D] rows with image_shape=(H, W)."
        )
    flat = images.reshape(images.shape[0], -1)
    low, high = flat.min(1).values, flat.max(1).values
    span = torch.where(high > low, high - low, torch.ones_like(high))
    shape = (-1,) + (1,) * (images.dim() - 1)
    return (images - low.reshape(shape)) / span.reshape(shape)


def influential_examples(
    query_images: Images,
    train_images: Images,
    scores: torch.Tensor,
    *,
    k: int = 5,
    image_shape: Optional[Tuple[int, ...]] = None,
    query_labels: Optional[Sequence[str]] = None,
    train_labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
):
    """A grid with one row per query: the query image, its ``k`` top proponents, then its ``k`` top opponents.

    ``scores`` is ``[Q, N]`` (``pairwise_scores``); each training image is captioned with its index, its
    label (``train_labels[n]``, if given) and its score. Proponents (positive scores: upweighting them lowers
    the query's measurement) are framed green, opponents red.
    """
    scores = _as_scores(scores)
    queries = as_displayable(query_images, image_shape)
    train = as_displayable(train_images, image_shape)
    if queries.shape[0] != scores.shape[0] or train.shape[0] != scores.shape[1]:
        raise InfluenceError(
            f"scores have shape {tuple(scores.shape)} but there are {queries.shape[0]} query images and "
            f"{train.shape[0]} training images: pass as query_images and train_images the images the scores were "
            "computed on, in the same order."
        )
    proponents, opponents = top_indices(scores, k)
    rows = scores.shape[0]
    figure = _figure(1.25 * (1 + 2 * k) + 0.6, 1.55 * rows + (0.8 if title else 0.5))
    panels = figure.subfigures(1, 3, width_ratios=[1.15, k, k], wspace=0.02)
    query_axes = panels[0].subplots(rows, 1, squeeze=False)[:, 0]
    panels[0].suptitle("query", fontsize=9, color="white")  # keeps the rows aligned with the other panels
    for q in range(rows):
        caption = f"query {q}" + (f"\n{query_labels[q]}" if query_labels is not None else "")
        _show(query_axes[q], queries[q], caption, "black")
    for panel, picked, colour, heading in (
            (panels[1], proponents, "tab:green", f"top {k} proponents (score > 0: they help)"),
            (panels[2], opponents, "tab:red", f"top {k} opponents (score < 0: they hurt)")):
        axes = panel.subplots(rows, k, squeeze=False)
        panel.suptitle(heading, fontsize=9, color=colour)
        for q in range(rows):
            for column, n in enumerate(picked[q].tolist()):
                label = f" {train_labels[n]}" if train_labels is not None else ""
                _show(axes[q][column], train[n], f"#{n}{label}\n{scores[q, n]:+.2g}", colour)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def _show(axis, image: torch.Tensor, caption: str, colour: str) -> None:
    axis.imshow(image.numpy(), cmap="gray_r" if image.dim() == 2 else None, vmin=0.0, vmax=1.0,
                interpolation="nearest")
    axis.set_title(caption, fontsize=8, color=colour)
    axis.set_xticks([])
    axis.set_yticks([])
    for spine in axis.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(2.5 if colour != "black" else 1.0)


def score_distribution(scores: torch.Tensor, *, queries: Optional[Sequence[int]] = None, bins: int = 60,
                       title: Optional[str] = None):
    """Histograms of each query's scores over the training set (log-scaled counts), one line per query.

    Influence scores are heavy-tailed: most training examples barely matter and a few dominate. The
    x-axis is symmetric-log so both tails and the bulk near zero stay visible; the dashed line is 0.
    """
    scores = _as_scores(scores)
    rows = list(range(scores.shape[0])) if queries is None else list(queries)
    if not rows or any(not 0 <= q < scores.shape[0] for q in rows):
        raise InfluenceError(f"queries must be indices in [0, {scores.shape[0]}), got {queries!r}.")
    finite = scores[rows][torch.isfinite(scores[rows])]
    if finite.numel() == 0:
        raise InfluenceError("The scores hold no finite value to plot (an incomplete store reads as NaN).")
    threshold = float(finite.abs().quantile(0.5)) or 1.0  # linear within the typical magnitude, log beyond
    figure = _figure(6.4, 3.6)
    axis = figure.subplots()
    limit = float(finite.abs().max())
    edges = _symlog_edges(limit, threshold, bins)
    for q in rows:
        values = scores[q][torch.isfinite(scores[q])].numpy()
        axis.hist(values, bins=edges, histtype="step", linewidth=1.4, label=f"query {q}")
    axis.set_xscale("symlog", linthresh=threshold)
    axis.set_xticks(_symlog_ticks(limit, threshold))
    axis.set_yscale("log")
    axis.axvline(0.0, color="grey", linestyle="--", linewidth=1)
    axis.set_xlabel("influence score (> 0: the training example helps the query)")
    axis.set_ylabel("training examples")
    if len(rows) <= 10:
        axis.legend(fontsize=8)
    axis.set_title(title or "Distribution of influence scores", fontsize=10)
    return figure


def _symlog_ticks(limit: float, threshold: float, most_per_side: int = 5) -> List[float]:
    """0 and the powers of ten of ``(3 * threshold, limit]`` on both sides, every other one where there are many.

    The default symlog ticks put ``+-10^k`` inside the linear region around 0 too, where their labels overlap the
    0 label; beyond ``3 * threshold`` a label is at least half a decade of axis away from 0.
    """
    first = math.ceil(math.log10(3 * threshold))
    last = math.floor(math.log10(limit)) if limit > 0 else first - 1
    decades = list(range(first, last + 1))
    step = max(1, math.ceil(len(decades) / most_per_side))
    positive = [10.0 ** k for k in decades[::-1][::step][::-1]]
    return [-x for x in reversed(positive)] + [0.0] + positive


def _symlog_edges(limit: float, threshold: float, bins: int):
    """Bin edges evenly spaced on a symmetric-log axis covering ``[-limit, limit]``."""
    import numpy as np

    def forward(x):
        return np.sign(x) * np.log1p(np.abs(x) / threshold)

    def inverse(y):
        return np.sign(y) * threshold * np.expm1(np.abs(y))

    top = forward(limit * 1.0001)
    return inverse(np.linspace(-top, top, bins + 1))


def layer_contributions(per_module_scores: Mapping[str, torch.Tensor], *, title: Optional[str] = None):
    """Each layer's share of the total influence: ``sum |s_layer| / sum_layers sum |s_layer|`` over all entries.

    ``per_module_scores`` is ``pairwise_scores(..., per_module=True)`` (or ``self_scores``): ``{layer: scores}``.
    The bars show the share of absolute score mass; the text gives each layer's mean signed score, since layers
    can also cancel each other.
    """
    if not per_module_scores:
        raise InfluenceError("per_module_scores is empty: pass the dict from pairwise_scores(..., per_module=True).")
    names = list(per_module_scores)
    values = [torch.as_tensor(per_module_scores[n]).detach().to("cpu", torch.float64) for n in names]
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) != 1:
        raise InfluenceError(f"Every layer's scores must have the same shape, got {sorted(shapes)}.")
    masses = torch.stack([v.nan_to_num(0.0).abs().sum() for v in values])
    if float(masses.sum()) == 0.0:
        raise InfluenceError("Every layer's scores are zero (or missing): there is no contribution to show.")
    shares = masses / masses.sum()
    means = [float(v.nanmean()) for v in values]
    figure = _figure(6.4, 0.8 + 0.38 * len(names))
    axis = figure.subplots()
    positions = list(range(len(names)))[::-1]  # first layer on top
    axis.barh(positions, shares.numpy(), color="tab:blue")
    for y, share, mean in zip(positions, shares.tolist(), means):
        axis.text(share, y, f"  {100 * share:.1f}%  (mean {mean:+.2g})", va="center", fontsize=8)
    axis.set_yticks(positions, [n or "(root)" for n in names], fontsize=8)
    axis.set_xlim(0, min(1.0, float(shares.max()) * 1.6))
    axis.set_xlabel("share of total |score|")
    axis.set_title(title or "Contribution of each layer", fontsize=10)
    return figure
