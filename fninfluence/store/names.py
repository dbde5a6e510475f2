"""User-given names (factors, scores, analyses) become directory names: keep them inside the output directory."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import InfluenceError

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str, what: str = "name") -> str:
    """``name`` itself if it is one plain path component; otherwise a clear error.

    Letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit: no separators, no ``..``,
    no absolute paths, so a name can never point outside the directory it is joined to.
    """
    if not isinstance(name, str) or not _SAFE.match(name) or ".." in name:
        raise InfluenceError(
            f"{what} {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit (no '/', no '..'), so that it names a folder inside the output directory."
        )
    return name


def child(directory: Path, name: str, what: str = "name") -> Path:
    """``directory / name`` after checking ``name`` (and that the result stays inside ``directory``)."""
    path = (Path(directory) / check_name(name, what)).resolve()
    if Path(directory).resolve() not in path.parents:
        raise InfluenceError(f"{what} {name!r} would point outside {directory}.")
    return path
