"""The README's main job: the demo trains, fits EKFAC factors and ranks training images for each query."""

from __future__ import annotations

import torch

from fninfluence.cli import main
from fninfluence.demo import run_demo


def test_demo_ranks_same_class_training_images_as_proponents(capsys):
    result = run_demo(num_queries=3, top_k=5, progress=False)
    assert result["scores"].shape == (3, 1500)
    assert torch.isfinite(result["scores"]).all()
    assert result["accuracy"] > 0.85
    # The strongest proponents of a correctly classified digit are mostly digits of the same class.
    train_labels = torch.tensor([int(line.split("label")[1].split()[0])
                                 for line in capsys.readouterr().out.splitlines() if line.strip().startswith("train #")])
    assert train_labels.numel() == 3 * 10
    same_class = 0
    for q in range(3):
        proponent_labels = train_labels[q * 10:q * 10 + 5]
        same_class += int((proponent_labels == result["query_labels"][q]).sum())
    assert same_class >= 10


def test_cli_demo_runs(capsys):
    assert main(["demo", "--queries", "1", "--top-k", "2", "--no-progress", "--strategy", "kfac"]) in (0, None)
    out = capsys.readouterr().out
    assert "top 2 proponents" in out and "top 2 opponents" in out
