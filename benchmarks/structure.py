"""Measures the shape of the package's code: what a new contributor has to read.

    python -m benchmarks.structure            # the table, then the worst offenders
    python -m benchmarks.structure --json     # the same numbers as JSON

Reported, from the source alone (``ast``; nothing is imported):

- files and lines per top-level folder of ``fninfluence/``;
- functions longer than ``--max-lines`` lines (``def`` to last line, docstring included), the longest first;
- internal functions (a name starting with ``_``, or defined inside another function) with more than
  ``--max-params`` parameters (``self`` / ``cls`` not counted); public functions keep the documented keyword API;
- import cycles between the package's modules, counting imports inside functions too (a lazy import that
  breaks a cycle at import time is still a cycle in the design);
- imports inside functions;
- string-keyed dispatch on the layer kind (``"ids" in stats`` and the like) outside the one algebra module
  (``fninfluence/core/algebra.py`` once it exists).

``tests/test_structure.py`` asserts the limits this script measures.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parent.parent / "fninfluence"
ALGEBRA_MODULES = {"fninfluence.core.algebra"}
LAYER_KIND_KEY = re.compile(r"""["'](ids|id_values)["']\s+(not\s+)?in\b|\bin\s+\w+\s*\[\s*["']ids["']""")


@dataclass
class Report:
    files: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # folder -> (files, lines)
    long_functions: List[Tuple[str, int]] = field(default_factory=list)
    wide_functions: List[Tuple[str, int]] = field(default_factory=list)
    import_cycles: List[List[str]] = field(default_factory=list)
    lazy_imports: List[str] = field(default_factory=list)
    layer_kind_dispatch: List[str] = field(default_factory=list)
    total_files: int = 0
    total_lines: int = 0


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name an ``ImportFrom`` refers to."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(module: str, is_package: bool, tree: ast.AST, known: Set[str]) -> Set[str]:
    """The package modules ``module`` imports (``from . import x`` counts as importing ``x`` if it is a module)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, is_package, node)
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in known else target)
    return {name for name in found if name in known and name != module}


def functions(tree: ast.AST, prefix: str):
    """``(qualified name, node, nested)`` for every function, methods and nested functions included."""
    def visit(node, names, nested):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield ".".join(names + [child.name]), child, nested
                yield from visit(child, names + [child.name], True)
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, names + [child.name], nested)
            else:
                yield from visit(child, names, nested)
    yield from visit(tree, [prefix], False)


def parameter_count(node) -> int:
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return len([n for n in names if n not in ("self", "cls")])


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def measure(max_lines: int = 60, max_params: int = 8) -> Report:
    report = Report()
    sources = {path: path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}
    known = {module_name(path) for path in sources}
    graph: Dict[str, Set[str]] = {}
    per_folder = defaultdict(lambda: [0, 0])
    for path, text in sources.items():
        module = module_name(path)
        tree = ast.parse(text)
        lines = text.count("\n")
        relative = path.relative_to(PACKAGE)
        folder = relative.parts[0] if len(relative.parts) > 1 else "(top level)"
        per_folder[folder][0] += 1
        per_folder[folder][1] += lines
        report.total_files += 1
        report.total_lines += lines
        graph[module] = imported_modules(module, path.name == "__init__.py", tree, known)
        for name, node, nested in functions(tree, module):
            length = node.end_lineno - node.lineno + 1
            if length > max_lines:
                report.long_functions.append((name, length))
            internal = nested or node.name.startswith("_")
            if internal and not node.name.startswith("__") and parameter_count(node) > max_params:
                report.wide_functions.append((name, parameter_count(node)))
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)) and not nested:
                    target = (inner.names[0].name if isinstance(inner, ast.Import)
                              else resolve(module, path.name == "__init__.py", inner))
                    if target.startswith("fninfluence") or (isinstance(inner, ast.ImportFrom) and inner.level):
                        report.lazy_imports.append(f"{name}: {target}")
        if module not in ALGEBRA_MODULES:
            for number, line in enumerate(text.splitlines(), 1):
                if LAYER_KIND_KEY.search(line) and not line.lstrip().startswith("#"):
                    report.layer_kind_dispatch.append(f"{relative}:{number}")
    report.files = {k: tuple(v) for k, v in sorted(per_folder.items())}
    report.long_functions.sort(key=lambda item: -item[1])
    report.wide_functions.sort(key=lambda item: -item[1])
    report.import_cycles = cycles(graph)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-lines", type=int, default=60)
    parser.add_argument("--max-params", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--top", type=int, default=10, help="offenders listed per category")
    options = parser.parse_args()
    report = measure(options.max_lines, options.max_params)
    if options.json:
        print(json.dumps(asdict(report), indent=1))
        return
    print(f"{report.total_files} files, {report.total_lines} lines")
    for folder, (count, lines) in report.files.items():
        print(f"  {folder:<14} {count:>3} files {lines:>6} lines")
    print(f"functions over {options.max_lines} lines: {len(report.long_functions)}")
    for name, length in report.long_functions[:options.top]:
        print(f"  {length:>5}  {name}")
    print(f"internal functions over {options.max_params} parameters: {len(report.wide_functions)}")
    for name, count in report.wide_functions[:options.top]:
        print(f"  {count:>5}  {name}")
    print(f"import cycles: {len(report.import_cycles)}")
    for component in report.import_cycles:
        print("  " + " <-> ".join(component))
    print(f"imports inside functions (package modules): {len(report.lazy_imports)}")
    for entry in report.lazy_imports[:options.top]:
        print(f"  {entry}")
    print(f"string-keyed layer-kind dispatch outside the algebra module: {len(report.layer_kind_dispatch)}")
    for entry in report.layer_kind_dispatch[:options.top]:
        print(f"  {entry}")


if __name__ == "__main__":
    main()
