"""Griffe extension: Sphinx cross-reference roles in docstrings become mkdocstrings cross-references.

The docstrings are written for Sphinx (``:func:`fit_factors```, ``:class:`~fninfluence.task.Task```,
``:meth:`text <Class.method>```). mkdocstrings does not know these roles and would print them literally, so this
extension rewrites each docstring once the package is loaded, before it is parsed:

* a target that names an object of the loaded package (absolute, relative to the docstring's module or class as
  Sphinx resolves it, ``.name`` relative to the package, or a unique suffix of a path) becomes an *optional*
  autoref to the object's canonical path: a link where the object is rendered on the site, plain code elsewhere,
  and never an unresolved-reference warning under ``mkdocs build --strict``;
* any other target (``torch.Tensor``) becomes plain code; one that is meant to be in the package (``fninfluence.``
  or ``.`` in front) but names nothing there is a warning, so a typo fails ``mkdocs build --strict``.

The text shown follows Sphinx: ``~a.b.c`` shows ``c``, ``text <target>`` shows ``text``, a leading ``.`` is
dropped. :func:`rewrite_roles` is the pure rewrite (unit-tested in ``tests/test_docs.py`` without griffe).
"""

from __future__ import annotations

import html
import logging
import re
from typing import Callable, Optional

try:
    from griffe import Extension
except ImportError:  # the unit test of rewrite_roles runs without the docs requirements
    Extension = object

ROLES = ("func", "class", "meth", "attr", "mod", "data", "exc", "obj", "const", "type")

# :role:`body` or :py:role:`body`; not preceded by a word character or a backtick (``:func:`x` `` in code stays).
ROLE_RE = re.compile(
    r"(?<![\w`]):(?:py:)?(?P<role>" + "|".join(ROLES) + r"):`(?P<body>[^`]+)`"
)
EXPLICIT_RE = re.compile(r"^(?P<title>.*?)\s*<(?P<target>[^<>]+)>$", re.S)

# under mkdocs' logger, so that a warning fails ``mkdocs build --strict``
log = logging.getLogger("mkdocs.plugins.sphinx_roles")

Resolver = Callable[[str, str], Optional[str]]


def parse_role(body: str) -> tuple[str, str, bool]:
    """``(title, target, link)`` of a role's body, as Sphinx reads it."""
    body = " ".join(body.split())
    match = EXPLICIT_RE.match(body)
    if match and match["title"]:
        title, target = match["title"], match["target"].strip()
    else:
        target = body
        title = body.lstrip("!").lstrip(".")
        if title.startswith("~"):
            title = title[1:].lstrip(".").rsplit(".", 1)[-1]
    link = not target.startswith("!")
    target = target.lstrip("!~")
    return title, target, link


def rewrite_roles(text: str, resolve: Resolver) -> str:
    """``text`` with every Sphinx role replaced: an optional autoref when ``resolve(role, target)`` names an object,
    else the title as inline code."""

    def replace(match: re.Match) -> str:
        title, target, link = parse_role(match["body"])
        code = f"`{title}`" if "`" not in title else f"`` {title} ``"
        path = resolve(match["role"], target) if link else None
        if not path:
            return code
        return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'

    return ROLE_RE.sub(replace, text)


def _candidates(obj, target: str):
    """Paths that ``target`` may name, seen from the docstring of ``obj``, in Sphinx's order of preference."""
    module = obj if obj.is_module else obj.module
    if target.startswith("."):
        dots = len(target) - len(target.lstrip("."))
        base = module if module.is_init_module else module.parent
        for _ in range(dots - 1):
            base = base.parent if base is not None and base.parent is not None else base
        if base is not None:
            yield f"{base.path}.{target[dots:]}"
        return
    scope = obj if (obj.is_class or obj.is_module) else obj.parent
    while scope is not None:  # the class, its module, the enclosing packages
        yield f"{scope.path}.{target}"
        scope = scope.parent
    yield target


class SphinxRoles(Extension):
    """Rewrites the docstrings of every object of a loaded package (see the module docstring)."""

    def on_package(self, *, pkg, loader, **kwargs) -> None:
        collection = loader.modules_collection
        index: dict[str, list[str]] = {}  # last path component -> canonical paths, for suffix matches
        objects = list(_walk(pkg))
        for obj in objects:
            index.setdefault(obj.name, []).append(obj.path)

        def lookup(path: str) -> Optional[str]:
            try:
                found = collection[path]
                return found.final_target.path if found.is_alias else found.path
            except Exception:  # missing, or an alias to something not loaded (torch, numpy)
                return None

        for obj in objects:
            if obj.docstring is None or ":`" not in obj.docstring.value:
                continue

            def resolve(role: str, target: str, obj=obj) -> Optional[str]:
                for candidate in _candidates(obj, target):
                    if path := lookup(candidate):
                        return path
                name = target.lstrip(".")
                suffix = [p for p in index.get(name.rsplit(".", 1)[-1], []) if p.endswith("." + name)]
                if len(suffix) == 1:
                    return suffix[0]
                if target.startswith((".", f"{pkg.name}.")):
                    log.warning("%s: :%s:`%s` names nothing in %s", obj.path, role, target, pkg.name)
                return None

            obj.docstring.value = rewrite_roles(obj.docstring.value, resolve)


def _walk(obj):
    """Every object defined (not imported) under ``obj``, ``obj`` included."""
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)
