"""Batched iterative solvers of ``A x = b`` for K right-hand sides at once, on dicts of ``[K, ...]`` tensors.

``apply(x)`` is ``A x`` and ``precondition(r)`` is ``M r`` with ``M ~ A^{-1}``, both on such dicts; inner
products sum over every entry of every key, per k, in float64. Each right-hand side gets its own step sizes:
the K solves are independent, so splitting the K vectors into groups changes nothing but rounding.

``steps`` counts products with ``A`` (the expensive part). With ``steps=0`` both return ``M b``.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict

import torch

Tensors = Dict[str, torch.Tensor]
Operator = Callable[[Tensors], Tensors]


def dot(x: Tensors, y: Tensors) -> torch.Tensor:
    """``[K]``: ``sum_key <x[key][k], y[key][k]>`` in float64."""
    return sum((x[key].to(torch.float64) * y[key].to(torch.float64)).flatten(1).sum(1) for key in x)


def combine(x: Tensors, scale: torch.Tensor, y: Tensors) -> Tensors:
    """``x + scale * y`` with ``scale`` ``[K]`` (one number per vector)."""
    return {key: x[key] + scale.to(x[key].dtype).reshape(-1, *[1] * (x[key].dim() - 1)) * y[key] for key in x}


def conjugate_gradients(apply: Operator, precondition: Operator, rhs: Tensors, steps: int) -> Tensors:
    """Preconditioned conjugate gradients from ``x = 0``, ``steps`` iterations (``steps`` products with A).

    After k steps ``x`` minimises the A-norm of the error over the Krylov space
    ``span{M b, (M A) M b, ..., (M A)^{k-1} M b}``; so the first step is ``M b`` rescaled per vector by the best
    factor, and the A-norm error never grows with k (A and M symmetric positive definite). ``steps=0`` returns
    ``M b`` itself. A vector whose search direction has ``p^T A p <= 0`` (an indefinite A, e.g. the Hessian)
    keeps its current ``x`` from then on, with a warning.
    """
    z = precondition(rhs)
    if steps == 0:
        return z
    x = {key: torch.zeros_like(value) for key, value in rhs.items()}
    r, p, rz = rhs, z, dot(rhs, z)
    active = rz > 0
    for step in range(steps):
        ap = apply(p)
        curvature = dot(p, ap)
        if bool((active & (curvature <= 0)).any()):
            warnings.warn("conjugate gradients met non-positive curvature p^T A p <= 0; those queries keep their "
                          "current solution (is the curvature indefinite? add damping).", stacklevel=3)
            active = active & (curvature > 0)
        alpha = torch.where(active, rz / torch.where(active, curvature, torch.ones_like(curvature)), 0.0)
        x = combine(x, alpha, p)
        if step == steps - 1:
            break
        r = combine(r, -alpha, ap)
        z = precondition(r)
        rz_next = dot(r, z)
        beta = torch.where(active & (rz > 0), rz_next / torch.where(rz > 0, rz, torch.ones_like(rz)), 0.0)
        p = combine(z, beta, p)
        rz = rz_next
        active = active & (rz > 0)
    return x


def richardson(apply: Operator, precondition: Operator, rhs: Tensors, steps: int, step_size: float = 1.0) -> Tensors:
    """Preconditioned Richardson (a Neumann series in ``I - M A``): ``x_0 = M b``,
    ``x_{k+1} = x_k + step_size * M (b - A x_k)``.

    It converges when every eigenvalue of ``step_size * M A`` lies in (0, 2); unlike conjugate gradients it
    diverges when ``M^{-1}`` underestimates ``A`` by more than a factor 2 in some direction (``step_size=1``).
    ``steps`` products with A.
    """
    x = precondition(rhs)
    first = next(iter(rhs.values()))
    minus_one = torch.full((first.shape[0],), -1.0, dtype=torch.float64, device=first.device)
    scale = torch.full((first.shape[0],), float(step_size), dtype=torch.float64, device=first.device)
    for _ in range(steps):
        x = combine(x, scale, precondition(combine(rhs, minus_one, apply(x))))
    return x
