"""The documentation's promises: the getting-started script runs as written, and the site's nav is whole."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _python_blocks(page: Path):
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def test_getting_started_script_writes_stores_and_a_plot(tmp_path, monkeypatch):
    blocks = _python_blocks(DOCS / "getting-started.md")
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    namespace = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only add synchronisation on a shared machine
    try:
        exec(compile(blocks[0], "getting-started.md", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    scores = namespace["scores"]
    assert scores.shape == (4, 1500) and torch.isfinite(scores).all()
    assert (tmp_path / "influential.png").read_bytes()[:4] == b"\x89PNG"
    from fninfluence.store.describe import describe

    assert describe(tmp_path / "influence" / "factors")["complete"]
    assert describe(tmp_path / "influence" / "scores")["shape"] == [4, 1500]
    # the promise of the page: proponents mostly share the query's label
    labels = namespace["labels"]
    proponents = scores.topk(5, dim=1).indices
    assert (labels[proponents] == labels[1500:1504, None]).float().mean() >= 0.6


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    config = (ROOT / "mkdocs.yml").read_text()
    listed = set(re.findall(r":\s+([\w./-]+\.md)\s*$", config, flags=re.M))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert listed == pages
