"""mkdocs hook: the math of the pages (``$...$``, ``$$...$$``) as MathML, converted when the site is built.

``pymdownx.arithmatex`` in generic mode wraps each formula in ``<span class="arithmatex">\\(...\\)</span>`` (inline)
or ``<div class="arithmatex">\\[...\\]</div>`` (display). This hook replaces the TeX inside with MathML from
``latex2mathml``, which browsers render natively: the site needs no JavaScript and no network for its math. A
formula that does not convert fails the build (an error under ``mkdocs build --strict``).
"""

from __future__ import annotations

import html
import logging
import re

from latex2mathml.converter import convert

log = logging.getLogger("mkdocs.hooks.mathml")

MATH_RE = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*(?P<open>\\\(|\\\[)(?P<tex>.*?)(?:\\\)|\\\])\s*</(?P=tag)>', re.S
)


def to_mathml(tex: str, display: bool) -> str:
    """The MathML of one formula (``tex`` unescaped)."""
    return convert(tex.strip(), display="block" if display else "inline")


def render_math(content: str, where: str = "") -> str:
    """``content`` (a page's HTML) with every arithmatex formula replaced by MathML."""

    def replace(match: re.Match) -> str:
        tex = html.unescape(match["tex"])
        display = match["open"] == "\\["
        try:
            mathml = to_mathml(tex, display)
        except Exception as error:  # latex2mathml raises its own errors for unsupported TeX
            log.error("%s: cannot convert the formula %r to MathML: %s", where, tex, error)
            return match[0]
        return f'<{match["tag"]} class="arithmatex">{mathml}</{match["tag"]}>'

    return MATH_RE.sub(replace, content)


def on_page_content(html_content: str, page, **kwargs) -> str:
    return render_math(html_content, page.file.src_uri)
