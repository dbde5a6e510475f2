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


def _sphinx_roles():
    """docs/hooks/sphinx_roles.py, the griffe extension that turns Sphinx roles into cross-references (imported by
    path; its rewrite needs neither griffe nor mkdocs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sphinx_roles", DOCS / "hooks" / "sphinx_roles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sphinx_roles_become_optional_cross_references_or_code():
    roles = _sphinx_roles()
    known = {"fit_factors": "fninfluence.pipeline.fit_factors", "fninfluence.task.Task": "fninfluence.task.Task",
             ".loop.run_pass": "fninfluence.run.loop.run_pass", "Factors.save": "fninfluence.factors.Factors.save"}
    asked = []

    def resolve(role, target):
        asked.append((role, target))
        return known.get(target)

    def link(path, title):
        return f'<autoref identifier="{path}" optional>`{title}`</autoref>'

    cases = {
        ":func:`fit_factors`": link("fninfluence.pipeline.fit_factors", "fit_factors"),
        ":class:`~fninfluence.task.Task`": link("fninfluence.task.Task", "Task"),
        ":class:`fninfluence.task.Task`": link("fninfluence.task.Task", "fninfluence.task.Task"),
        ":meth:`saving <Factors.save>`": link("fninfluence.factors.Factors.save", "saving"),
        ":func:`~.loop.run_pass`": link("fninfluence.run.loop.run_pass", "run_pass"),
        ":mod:`.loop.run_pass`": link("fninfluence.run.loop.run_pass", "loop.run_pass"),
        ":py:func:`fit_factors`": link("fninfluence.pipeline.fit_factors", "fit_factors"),
        ":class:`~torch.Tensor`": "`Tensor`",  # not in the package: code, no link
        ":attr:`name`": "`name`",
        ":data:`!fit_factors`": "`fit_factors`",  # Sphinx's "no link"
        ":func:`the\n    fit <fit_factors>`": link("fninfluence.pipeline.fit_factors", "the fit"),
    }
    for source, expected in cases.items():
        assert roles.rewrite_roles(f"See {source}, then.", resolve) == f"See {expected}, then.", source
    assert ("data", "fit_factors") not in asked  # a ! target is never looked up
    # text that only looks like a role stays as it is: code spans, unknown roles, no backticks
    for text in ["``:func:`fit_factors` ``", ":ref:`page`", ":func: fit_factors", "a:func:`x`"]:
        assert roles.rewrite_roles(text, resolve) == text


def test_sphinx_role_targets_are_looked_up_where_sphinx_looks():
    """Short names from the docstring's class, module and enclosing packages, ``.name`` from the package."""
    from types import SimpleNamespace as Obj

    roles = _sphinx_roles()
    root = Obj(path="fninfluence", parent=None, is_init_module=True, is_module=True, is_class=False)
    run = Obj(path="fninfluence.run", parent=root, is_init_module=True, is_module=True, is_class=False)
    fit = Obj(path="fninfluence.run.fit", parent=run, is_init_module=False, is_module=True, is_class=False)
    cls = Obj(path="fninfluence.run.fit.Plan", parent=fit, module=fit, is_module=False, is_class=True)
    method = Obj(path="fninfluence.run.fit.Plan.go", parent=cls, module=fit, is_module=False, is_class=False)
    assert list(roles._candidates(method, "stop")) == [
        "fninfluence.run.fit.Plan.stop", "fninfluence.run.fit.stop", "fninfluence.run.stop", "fninfluence.stop", "stop"]
    assert list(roles._candidates(fit, ".loop.run_pass")) == ["fninfluence.run.loop.run_pass"]
    assert list(roles._candidates(run, ".loop")) == ["fninfluence.run.loop"]
    assert list(roles._candidates(method, "..partitions")) == ["fninfluence.partitions"]


def test_the_site_build_needs_no_torch_and_wires_its_helpers():
    """docs/requirements.txt (what CI and the README install) lists the build's packages and not torch; mkdocs.yml
    loads the roles extension and the math hook, and keeps the helpers out of the site. The built site itself is
    checked in a browser by docs/check_site.py (CI's docs step)."""
    requirements = (DOCS / "requirements.txt").read_text()
    names = {re.split(r"[\[<>=]", line)[0] for line in requirements.splitlines() if line and line[0].isalpha()}
    assert {"mkdocs", "mkdocs-material", "mkdocstrings", "ruff", "latex2mathml"} <= names
    assert "torch" not in names and "fninfluence" not in names
    config = (ROOT / "mkdocs.yml").read_text()
    assert "docs/hooks/sphinx_roles.py:SphinxRoles" in config and "docs/hooks/mathml.py" in config
    assert "pymdownx.arithmatex" in config and "/hooks/" in config and "/check_site.py" in config
    run = (ROOT / ".ci" / "run").read_text()
    assert "pip install -r docs/requirements.txt && mkdocs build --strict" in run
    assert "python docs/check_site.py" in run
