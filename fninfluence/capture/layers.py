"""Which layers are tracked, and what the discovery pass learns about them."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..curvature.base import OneHotShape
from ..errors import InfluenceError
from .tap import CallRecord

SUPPORTED_MODULES: Tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
SUPPORTED_NAMES = ("nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention, Hugging Face's Conv1D and nn.Embedding "
                   "(when named)")


def is_supported(module: nn.Module) -> bool:
    """Linear and convolution layers, and Hugging Face's GPT-2-style ``Conv1D`` (``addmm`` with a [in, out] weight).

    Conv1D is recognised by its shape rather than imported, so transformers stays optional.
    """
    if isinstance(module, SUPPORTED_MODULES):
        return True
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf")
            and isinstance(getattr(module, "weight", None), torch.Tensor))


@dataclass(frozen=True)
class Target:
    """A tracked module and the names (as in ``model.named_parameters()``) of its parameters."""

    layer: str
    weight: str
    bias: Optional[str]
    one_hot: bool = False  # an nn.Embedding



@dataclass(frozen=True)
class LayerSpec:
    """A tracked layer as the discovery pass saw it."""

    name: str
    op: str  # "linear" | "conv1d" | "conv2d" | "addmm" | "embedding" | "parameters"
    groups: int
    out_features: int  # per group
    in_features: int  # per group, with the bias column when the layer has a tracked bias
    has_bias: bool
    weight: str
    bias: Optional[str]
    weight_shape: Tuple[int, ...]
    calls: int
    parameters: Tuple[str, ...] = ()  # op "parameters": the parameter names, flattened and concatenated

    @property
    def one_hot(self) -> bool:
        """Whether the layer's inputs are one-hot rows (an embedding: ``in`` is the vocabulary)."""
        return self.op == "embedding"

    @property
    def shape(self) -> Tuple[int, int, int]:
        """``(groups, out, in)``; a :class:`~fninfluence.curvature.base.OneHotShape` for an embedding."""
        shape = (self.groups, self.out_features, self.in_features)
        return OneHotShape(shape) if self.one_hot else shape


def _catalog(model: nn.Module) -> Dict[str, Tuple[nn.Module, str, str]]:
    """Every trackable layer in model order: ``{layer name: (module, weight attribute, bias attribute)}``.

    ``nn.MultiheadAttention`` contributes its fused input projection as the layer ``"<name>.in_proj"``
    (its ``out_proj`` is an ``nn.Linear`` and is listed as itself). ``nn.Embedding`` layers are listed
    too, but only tracked when named (see :func:`default_layers`).
    """
    catalog = {}
    for name, module in model.named_modules():
        if is_supported(module) or isinstance(module, nn.Embedding):
            catalog[name] = (module, "weight", "bias")
        elif isinstance(module, nn.MultiheadAttention):
            catalog.update({_join(name, layer): (module, weight, bias) for layer, weight, bias in _attention_layers(module)})
    return catalog


def _join(module: str, layer: str) -> str:
    return f"{module}.{layer}" if module else layer


def _attention_layers(module: nn.MultiheadAttention) -> List[Tuple[str, str, str]]:
    """``(layer, weight attribute, bias attribute)`` of an attention module's input projections.

    With ``kdim``/``vdim`` other than ``embed_dim`` the query, key and value projections are separate
    weights (``q_proj_weight`` ...) that share one bias vector, ``in_proj_bias``: they are three layers
    without a bias of their own, and ``in_proj_bias`` is a parameter layer (see
    :func:`resolve_parameter_layers`) when the module is named.
    """
    if module.in_proj_weight is not None:
        return [("in_proj", "in_proj_weight", "in_proj_bias")]
    return [(f"{x}_proj", f"{x}_proj_weight", "") for x in "qkv"]


def _supported_names(model: nn.Module) -> List[str]:
    return list(_catalog(model))


def default_layers(catalog) -> List[str]:
    """The layers tracked when ``Task.tracked_modules()`` is None: every supported layer but embeddings.

    Embeddings are left out because their factors are as large as the vocabulary (``[D, V]`` for
    EKFAC's Lambda, e.g. 768 x 50257 for GPT-2) and their dense query gradients are too; name them in
    ``Task.tracked_modules()`` to opt in.
    """
    return [name for name, (module, _, _) in catalog.items() if not isinstance(module, nn.Embedding)]


def _parameter_names(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Every name of every parameter, tied aliases included (``lm_head.weight`` and ``wte.weight``)."""
    return dict(model.named_parameters(remove_duplicate=False))


def _own_parameters(module: nn.Module) -> List[nn.Parameter]:
    return [p for p in module.parameters(recurse=False)]


def _requested(model: nn.Module, catalog, names: Sequence[str]) -> List[str]:
    """Names of the tap layers among ``names`` (modules with parameters but no tap layer are skipped)."""
    modules = dict(model.named_modules())
    chosen: List[str] = []
    for name in names:
        if name in catalog:
            chosen.append(name)
            continue
        module = modules.get(name)
        if isinstance(module, nn.MultiheadAttention):  # its input projections and out_proj
            chosen += [n for n in [_join(name, layer) for layer, _, _ in _attention_layers(module)]
                       + [_join(name, "out_proj")] if n in catalog]
            continue
        if module is None and name in _parameter_names(model):
            continue  # a single parameter, see resolve_parameter_layers
        if module is None:
            close = difflib.get_close_matches(name, list(modules) + list(catalog), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise InfluenceError(
                f"Task.tracked_modules() names {name!r}, which is not a module of the model.{hint} "
                f"Use names from model.named_modules(); supported layers here: {list(catalog)[:20]}."
            )
        if _own_parameters(module):
            continue  # a parameter layer, see resolve_parameter_layers
        raise InfluenceError(
            f"Tracked module {name!r} is a {type(module).__name__} with no parameters of its own; supported layers "
            f"are {SUPPORTED_NAMES}, and any other module's own parameters. Track its submodules instead."
        )
    return chosen


def resolve_parameter_layers(model: nn.Module, tracked_modules: Optional[Sequence[str]]) -> Dict[str, List[str]]:
    """Named modules that the tap cannot follow but that hold parameters (LayerNorm, RMSNorm, a positional
    table, a custom module's bias): ``{module name: its own parameter names}``.

    Their per-example gradients come from ``vmap(grad(...))`` rather than the tap, so any module works;
    they are only tracked when named in ``Task.tracked_modules()``. A parameter's own name (e.g.
    ``"lm_head.weight"``) makes a layer of that one parameter: for a weight tied to another module, its
    gradient then sums every use, which the tap cannot do.
    """
    if tracked_modules is None:
        return {}
    catalog = _catalog(model)
    modules = dict(model.named_modules())
    canonical = {id(p): name for name, p in model.named_parameters()}
    parameters = _parameter_names(model)
    layers = {}
    for name in tracked_modules:
        if name not in modules and name in parameters:  # one parameter by name: all of its uses, tied or not
            layers[name] = [canonical[id(parameters[name])]]
            continue
        module = modules.get(name)
        if isinstance(module, nn.MultiheadAttention):
            # separate q/k/v weights share in_proj_bias, which no single projection owns (see _attention_layers)
            if module.in_proj_weight is None and module.in_proj_bias is not None:
                layers[_join(name, "in_proj_bias")] = [canonical[id(module.in_proj_bias)]]
            continue
        if name in catalog or module is None:
            continue
        own = [canonical[id(p)] for p in _own_parameters(module) if id(p) in canonical]
        if own:
            layers[name] = own
    return layers


def resolve_targets(model: nn.Module, tracked_modules: Optional[Sequence[str]], allow_empty: bool = False) -> List[Target]:
    """The tracked tap layers of ``model``: the names given, or every supported layer when None."""
    catalog = _catalog(model)
    canonical = {id(p): name for name, p in model.named_parameters()}
    names = default_layers(catalog) if tracked_modules is None else _requested(model, catalog, tracked_modules)
    if not names and not allow_empty:
        raise InfluenceError(
            f"No layer to track: the model has no {SUPPORTED_NAMES} module"
            + ("" if tracked_modules is None else " and Task.tracked_modules() returned an empty list")
            + ". Return module names from Task.tracked_modules()."
        )
    targets, seen_weights = [], {}
    for name in names:
        module, weight_attr, bias_attr = catalog[name]
        weight_name = canonical.get(id(getattr(module, weight_attr)))
        if weight_name is None:
            raise InfluenceError(f"The weight of {name!r} is not a parameter of the model (is it frozen as a buffer?).")
        if weight_name in seen_weights:
            raise InfluenceError(
                f"Modules {seen_weights[weight_name]!r} and {name!r} share one weight ({weight_name}); "
                "track only one of them in Task.tracked_modules()."
            )
        seen_weights[weight_name] = name
        bias = getattr(module, bias_attr, None)
        targets.append(Target(name, weight_name, canonical.get(id(bias)) if isinstance(bias, torch.Tensor) else None,
                              one_hot=isinstance(module, nn.Embedding)))
    return targets


def specs_from_calls(targets: Sequence[Target], calls: Dict[str, List[CallRecord]]) -> Dict[str, LayerSpec]:
    specs = {}
    for t in targets:
        records = calls[t.layer]
        first = records[0]
        for r in records[1:]:
            if (r.op, r.groups, r.has_bias) != (first.op, first.groups, first.has_bias):
                raise InfluenceError(
                    f"Layer {t.layer!r} is called in different ways within one forward pass "
                    f"({first.op}, groups={first.groups}, bias={first.has_bias} vs {r.op}, groups={r.groups}, "
                    f"bias={r.has_bias}); fninfluence needs every call of a tracked weight to be the same op."
                )
        groups, out, inp = first.weight_shape
        specs[t.layer] = LayerSpec(
            name=t.layer, op=first.op, groups=groups, out_features=out, in_features=inp + int(first.has_bias),
            has_bias=first.has_bias, weight=t.weight, bias=t.bias if first.has_bias else None,
            weight_shape=first.param_shape, calls=len(records),
        )
    return specs
