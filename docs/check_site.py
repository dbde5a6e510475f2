"""Checks the built documentation site in a real browser (headless Chromium), as a reader would see it.

Usage (after ``mkdocs build --strict``; CI's docs step runs it)::

    python docs/check_site.py [site] [--screenshot DIR]

It serves ``site/`` on 127.0.0.1 (a throwaway server, for this run only), loads every page with
``chromium --headless --dump-dom``, and reads what a small probe script, added to each page as it is served,
measured in the rendered page. It fails (exit 1, one line per problem) unless:

* no Sphinx role (``:func:``, ``:class:``, ``:meth:``, ``:attr:``, ``:mod:``, ``:data:``, ...) is left in the text
  of any page, and the API reference links some of them to the objects they name;
* every formula was converted to MathML (no ``.arithmatex`` without a ``<math>``), Chromium lays each ``<math>``
  out as math, some page has math, and no TeX (``\\frac``, ``\\sum``, ``$$``, ``\\(``) is left in the text;
* the API reference shows a signature for each object, a long signature spans several lines, and no signature is
  wider than its box (cut off or scrolled) in a 1280-pixel-wide window;
* every link within the site reaches a page of the site, and its ``#anchor`` an element of that page.

``--screenshot DIR`` also saves PNGs of the API reference and of a page with math, to look at.
It needs Chromium (Debian: ``apt-get install chromium``) and only the standard library.
"""

from __future__ import annotations

import argparse
import functools
import html.parser
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT = 1280, 900
REFERENCE = "reference/index.html"
MATH_PAGE = "gradient-index/index.html"
# what mkdocs.yml asks of signatures (mkdocstrings-python: line_length, 60 if not set)
LINE_LENGTH = int((re.findall(r"^\s*line_length:\s*(\d+)", (ROOT / "mkdocs.yml").read_text(), flags=re.M) or [60])[0])

PROBE = r"""
<script>
window.addEventListener("load", () => {
  const article = document.querySelector("article") || document.body;
  const prose = article.cloneNode(true);
  prose.querySelectorAll("pre, code, math, script, style, .arithmatex").forEach((e) => e.remove());
  const text = prose.textContent;
  const around = (m) => text.slice(Math.max(0, m.index - 40), m.index + 60).replace(/\s+/g, " ");
  const roles = [...text.matchAll(/:(?:py:)?(?:func|class|meth|attr|mod|data|exc|obj|const):/g)].map(around);
  const tex = [...text.matchAll(/\\(?:frac|sum|top|math[a-z]+|operatorname|left|right|[Ll]ambda|nabla|\(|\[)|\$\$|\$[^$\s][^$]*\$/g)].map(around);
  const maths = [...document.querySelectorAll("math")].map((m) => {
    const r = m.getBoundingClientRect();
    return {display: getComputedStyle(m).display, width: r.width, height: r.height, text: m.textContent.slice(0, 60)};
  });
  const signatures = [...document.querySelectorAll(".doc-signature")].map((s) => {
    const code = s.querySelector("pre code") || s;
    return {text: code.textContent, scroll: code.scrollWidth, client: code.clientWidth};
  });
  const out = document.createElement("script");
  out.type = "application/json";
  out.id = "site-check";
  out.textContent = JSON.stringify({
    roles, tex, maths, signatures,
    unconverted: [...document.querySelectorAll(".arithmatex")].filter((e) => !e.querySelector("math")).map((e) => e.textContent.slice(0, 80)),
    autorefs: article.querySelectorAll("a.autorefs-internal").length,
    ids: [...document.querySelectorAll("[id], a[name]")].map((e) => e.id || e.name),
    links: [...document.querySelectorAll("a[href]")].map((a) => a.href),
  }).replace(/</g, "\\u003c");
  document.body.appendChild(out);
});
</script>
"""


class _Handler(SimpleHTTPRequestHandler):
    """Serves the site, with the probe added to each HTML page."""

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if path.is_dir():
            path = path / "index.html"
        if path.suffix != ".html" or not path.is_file():
            return super().do_GET()
        body = path.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>", 1).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _ResultParser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.inside = False
        self.data = []

    def handle_starttag(self, tag, attrs):
        self.inside = tag == "script" and ("id", "site-check") in attrs

    def handle_endtag(self, tag):
        self.inside = False

    def handle_data(self, data):
        if self.inside:
            self.data.append(data)


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    sys.exit("check_site: no Chromium found (Debian: apt-get install chromium); the site cannot be checked")


def chromium(browser: str, profile: str, url: str, *extra: str, height: int = HEIGHT) -> subprocess.CompletedProcess:
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        "--no-default-browser-check", "--mute-audio", f"--user-data-dir={profile}",
        f"--window-size={WIDTH},{height}", "--virtual-time-budget=5000", *extra, url,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def probe(browser: str, profile: str, url: str) -> dict:
    run = chromium(browser, profile, url, "--dump-dom")
    parser = _ResultParser()
    parser.feed(run.stdout)
    if not parser.data:
        raise RuntimeError(f"no probe result from {url} (exit {run.returncode}): {run.stderr[-2000:]}")
    return json.loads("".join(parser.data))


def check(site: Path, results: dict[str, dict]) -> list[str]:
    """Problems found in the probe results of every page (``results``: page path in the site -> probe)."""
    problems = []
    for page, r in sorted(results.items()):
        problems += [f"{page}: Sphinx role rendered literally: ...{s}..." for s in r["roles"]]
        problems += [f"{page}: TeX left as text: ...{s}..." for s in r["tex"]]
        problems += [f"{page}: formula not converted to MathML: {s!r}" for s in r["unconverted"]]
        for m in r["maths"]:
            if "math" not in m["display"] or m["width"] <= 0 or m["height"] <= 0:
                problems.append(f"{page}: <math> not laid out as math ({m['display']}, {m['width']}x{m['height']}):"
                                f" {m['text']!r}")
        for s in r["signatures"]:
            first = s["text"].strip().splitlines()[0] if s["text"].strip() else "(empty)"
            if s["scroll"] > s["client"] + 1:
                problems.append(f"{page}: signature wider than its box ({s['scroll']} > {s['client']} px): {first}")
            if len(" ".join(s["text"].split())) > LINE_LENGTH and "\n" not in s["text"].strip():
                problems.append(f"{page}: long signature on a single line: {first}")
        for link in r["links"]:
            problems += _link_problems(site, page, link, results)
    reference = results.get(REFERENCE)
    if reference is None:
        problems.append(f"{REFERENCE}: missing")
    else:
        directives = len(re.findall(r"^::: ", (ROOT / "docs" / "reference.md").read_text(), flags=re.M))
        if len(reference["signatures"]) < directives:
            problems.append(f"{REFERENCE}: {len(reference['signatures'])} signatures for {directives} ::: entries")
        if reference["autorefs"] < 10:
            problems.append(f"{REFERENCE}: only {reference['autorefs']} cross-reference links (roles not linked?)")
    if not any(r["maths"] for r in results.values()):
        problems.append("no page has MathML: is the math hook (docs/hooks/mathml.py) running?")
    return problems


def _link_problems(site: Path, page: str, link: str, results: dict[str, dict]) -> list[str]:
    parts = urlsplit(link)
    if parts.scheme not in ("http", "https") or parts.hostname != "127.0.0.1":
        return []  # external links are not followed (the check runs offline)
    path = unquote(parts.path).lstrip("/")
    target = path + "index.html" if path.endswith("/") or not path else path
    if not (site / target).is_file():
        return [f"{page}: link to a missing page: {path or '/'}"]
    fragment = unquote(parts.fragment)
    if not fragment or target not in results or fragment.startswith("__"):
        return []
    if fragment not in results[target]["ids"]:
        return [f"{page}: link to a missing anchor: {path}#{fragment}"]
    return []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("site", nargs="?", default=str(ROOT / "site"), help="the built site (default: site/)")
    parser.add_argument("--screenshot", metavar="DIR", help="save PNGs of the API reference and a math page here")
    args = parser.parse_args(argv)
    site = Path(args.site).resolve()
    if not (site / REFERENCE).is_file():
        sys.exit(f"check_site: {site} has no {REFERENCE}: build the site first (mkdocs build --strict)")
    browser = find_chromium()
    pages = sorted(str(p.relative_to(site)) for p in site.rglob("*.html"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with tempfile.TemporaryDirectory() as profile:
            results = {page: probe(browser, profile, base + page) for page in pages}
            if args.screenshot:
                out = Path(args.screenshot).resolve()
                out.mkdir(parents=True, exist_ok=True)
                for page, height in ((REFERENCE, 2400), (MATH_PAGE, 1400)):
                    png = out / (page.split("/")[0] + ".png")
                    chromium(browser, profile, base + page, f"--screenshot={png}", height=height)
                    print(f"screenshot: {png}")
    finally:
        server.shutdown()
        server.server_close()
    problems = check(site, results)
    counts = {
        "pages": len(results),
        "signatures": sum(len(r["signatures"]) for r in results.values()),
        "formulas": sum(len(r["maths"]) for r in results.values()),
        "reference links": results[REFERENCE]["autorefs"],
        "internal links": sum(len(r["links"]) for r in results.values()),
    }
    print("check_site: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    for problem in problems:
        print("check_site: " + problem)
    print(f"check_site: {'FAILED, ' + str(len(problems)) + ' problems' if problems else 'all checks passed'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
