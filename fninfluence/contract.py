"""Einsum with the contraction order chosen once per (equation, shapes) by opt_einsum.

``torch.einsum`` would search for an order on every call; the shapes of a scoring loop repeat, so the
path is found once and replayed as a sequence of pairwise ``torch.einsum`` calls. Inside
``torch.compile`` the plain ``torch.einsum`` is used: the order is then fixed once, at trace time.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import opt_einsum
import torch

_PLANS: Dict[Tuple[str, Tuple[Tuple[int, ...], ...]], List[Tuple[Tuple[int, ...], str]]] = {}


def _plan(equation: str, shapes: Tuple[Tuple[int, ...], ...]) -> List[Tuple[Tuple[int, ...], str]]:
    key = (equation, shapes)
    plan = _PLANS.get(key)
    if plan is None:
        _, info = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize="optimal" if len(shapes) <= 4 else "auto")
        plan = [(tuple(step[0]), step[2]) for step in info.contraction_list]
        _PLANS[key] = plan
    return plan


def contract(equation: str, *operands: torch.Tensor) -> torch.Tensor:
    """``torch.einsum(equation, *operands)`` in the cheapest order (by FLOPs) that opt_einsum finds."""
    if len(operands) <= 2 or torch.compiler.is_compiling():
        return torch.einsum(equation, *operands)
    pending = list(operands)
    for positions, step_equation in _plan(equation, tuple(tuple(o.shape) for o in operands)):
        picked = [pending[i] for i in positions]
        for i in sorted(positions, reverse=True):
            del pending[i]
        pending.append(torch.einsum(step_equation, *picked))
    return pending[0]
