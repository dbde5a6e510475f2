"""Hypothesis strategies for property tests: small random models, data sets and tasks.

Requires ``hypothesis`` (a test dependency). Everything is float64 so that properties can be
asserted to near machine precision.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

from .checks import SummedCrossEntropy

__all__ = ["SummedCrossEntropy", "small_models", "classification_datasets", "models_and_data", "ridge_problems",
           "strategies", "dampings", "STRATEGY_NAMES"]

STRATEGY_NAMES = ("identity", "diagonal", "kfac", "ekfac")


@st.composite
def small_models(draw, max_width: int = 6):
    """An MLP of one or two hidden layers (random widths, bias on or off, tanh or sigmoid), in float64."""
    d_in = draw(st.integers(1, max_width))
    widths = draw(st.lists(st.integers(1, max_width), min_size=1, max_size=2))
    classes = draw(st.integers(2, 4))
    bias = draw(st.booleans())
    activation = draw(st.sampled_from([nn.Tanh, nn.Sigmoid]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    layers, width = [], d_in
    for w in widths:
        layers += [nn.Linear(width, w, bias=bias), activation()]
        width = w
    layers.append(nn.Linear(width, classes, bias=True))
    return nn.Sequential(*layers).double().eval()


@st.composite
def classification_datasets(draw, model: nn.Module, min_size: int = 2, max_size: int = 12):
    """A float64 ``(inputs, labels)`` TensorDataset that fits ``model``."""
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    n = draw(st.integers(min_size, max_size))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(n, first.in_features, generator=g, dtype=torch.float64)
    y = torch.randint(0, last.out_features, (n,), generator=g)
    return TensorDataset(x, y)


@st.composite
def models_and_data(draw, min_size: int = 2, max_size: int = 12):
    model = draw(small_models())
    return model, draw(classification_datasets(model, min_size, max_size))


strategies = st.sampled_from(STRATEGY_NAMES)
dampings = st.one_of(st.none(), st.floats(1e-3, 1.0))


@st.composite
def ridge_problems(draw, max_examples: int = 12, max_features: int = 4):
    """``(x [N, D], y [N], l2, x_query [Q, D])`` in float64 for ridge-regression oracles; ``l2 > 0``."""
    n = draw(st.integers(2, max_examples))
    d = draw(st.integers(1, max_features))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    return x, y, draw(st.floats(1e-2, 10.0)), torch.randn(draw(st.integers(1, 3)), d, generator=g, dtype=torch.float64)
