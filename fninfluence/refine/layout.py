"""The tracked layers' parameters in two layouts: the model's (``{parameter name: tensor}``) and the tap's
(``{layer: [G, out, in]}``, the bias as the last input column).

The map from the first to the second is :func:`fninfluence.capture.weight_as_matrix` per layer (for a layer
tracked through its own parameters, op ``"parameters"``: the parameters flattened and concatenated). It only
moves entries, so it is a permutation and its inverse is its adjoint, which :func:`to_parameters` takes with
``torch.func.vjp``: no inverse is written by hand per op (transposed, grouped, one-hot), so the two directions
cannot disagree. Every function takes a leading batch dimension ``K`` (one vector per query).
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import torch

from ..capture import LayerSpec, weight_as_matrix

Tensors = Dict[str, torch.Tensor]


def parameter_names(specs: Mapping[str, LayerSpec]) -> List[str]:
    """The tracked parameters, layer by layer: each layer's weight then its tracked bias (or its parameters)."""
    names = []
    for spec in specs.values():
        if spec.op == "parameters":
            names.extend(spec.parameters)
        else:
            names.extend([spec.weight] + ([spec.bias] if spec.has_bias else []))
    return names


def _layer_matrix(spec: LayerSpec, params: Tensors) -> torch.Tensor:
    """One example's ``[G, out, in]`` for one layer."""
    if spec.op == "parameters":
        return torch.cat([params[name].flatten() for name in spec.parameters])[None, None, :]
    return weight_as_matrix(params[spec.weight], params[spec.bias] if spec.has_bias else None, spec.groups, spec.op)


def to_layout(params: Tensors, specs: Mapping[str, LayerSpec]) -> Tensors:
    """``{name: [K, *shape]}`` -> ``{layer: [K, G, out, in]}``."""
    one = lambda p: {layer: _layer_matrix(spec, p) for layer, spec in specs.items()}  # noqa: E731
    return torch.func.vmap(one)(params)


def to_parameters(vectors: Tensors, specs: Mapping[str, LayerSpec], shapes: Mapping[str, Tuple[int, ...]]) -> Tensors:
    """``{layer: [K, G, out, in]}`` -> ``{name: [K, *shape]}``, the inverse of :func:`to_layout` (its adjoint)."""
    first = next(iter(vectors.values()))
    zeros = {name: torch.zeros(shapes[name], dtype=first.dtype, device=first.device) for name in parameter_names(specs)}
    one = lambda p: {layer: _layer_matrix(spec, p) for layer, spec in specs.items()}  # noqa: E731
    _, pullback = torch.func.vjp(one, zeros)
    return torch.func.vmap(lambda v: pullback(v)[0])(vectors)
