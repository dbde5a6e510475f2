"""Checks of the public functions' keyword arguments: a bad value gets an error that names it and the fix.

Python's ``bool`` is an ``int``, so ``True`` would pass for a count of 1 and ``0`` for "all": the checks here
say what is allowed instead of letting such a value mean something else.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Mapping

from ..errors import InfluenceError


def check_damping(damping: Any) -> None:
    """``None`` (the heuristic) or a finite number >= 0."""
    if damping is None:
        return
    if isinstance(damping, bool) or not isinstance(damping, Real) or not math.isfinite(damping) or damping < 0:
        raise InfluenceError(
            f"damping must be a finite number >= 0, or None (0.1 x the mean eigenvalue per layer); got {damping!r}."
        )


def check_positive(value: Any, name: str, allow_none: bool = True) -> None:
    """A positive integer (or ``None`` where that means "no limit")."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        allowed = "a positive integer" + (" or None" if allow_none else "")
        raise InfluenceError(f"{name} must be {allowed}, got {value!r}.")


def check_per_pass(value: Any, name: str, allow_none: bool) -> None:
    """A value for every pass (see :func:`check_positive`), or a mapping ``{pass name: value}``."""
    if isinstance(value, Mapping):
        for pass_name, item in value.items():
            check_positive(item, f"{name}[{pass_name!r}]", allow_none)
    else:
        check_positive(value, name, allow_none)


def check_fisher_samples(value: Any, use_empirical_fisher: bool) -> None:
    """Labels drawn per example for the true Fisher: a positive integer, and 1 with the empirical Fisher (the
    data's own labels are drawn by no one)."""
    check_positive(value, "fisher_samples", allow_none=False)
    if use_empirical_fisher and value != 1:
        raise InfluenceError(
            f"fisher_samples={value} draws labels for the true Fisher, but use_empirical_fisher=True (the default) "
            "uses the data's labels: pass use_empirical_fisher=False with fisher_samples, or drop fisher_samples."
        )
