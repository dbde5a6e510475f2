"""The tap's per-example gradients against a per-example autograd loop, for every layer configuration."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

import fninfluence as fi
from fninfluence.capture import ModelTap
from fninfluence.curvature import per_example_grads
from fninfluence.testing import layer_gradients, per_example_gradients


class Regression(fi.Task):
    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        return 0.5 * (model(x) - y).square().sum()

    def compute_measurement(self, batch, model):
        x, y = batch
        return model(x).sum()


class ConvHead(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.head = nn.Linear(conv.out_channels, 2)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        return self.head(h.flatten(2).mean(-1))


class LeadingDims(nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.fc = nn.Linear(4, 3, bias=bias)
        self.head = nn.Linear(3, 2, bias=not bias)

    def forward(self, x):  # x: [B, 2, 5, 4]
        return self.head(torch.tanh(self.fc(x)).sum(dim=(1, 2)))


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.block(x))
        h = torch.tanh(self.block(h))  # the same weight, a second time
        h = torch.tanh(self.block(h[:, :2].repeat(1, 2)))  # and a third, on different inputs
        return self.head(h)


def _tap_grads(model, task, data, objective="train"):
    engine = ModelTap(model, task)
    batch = tuple(torch.stack(t) for t in zip(*[data[i] for i in range(len(data))]))
    probes = engine.probes_for(objective, batch)
    _, stats = engine.layer_stats(objective, engine.params, engine.buffers, batch, probes)
    return engine.specs, {layer: per_example_grads(s) for layer, s in stats.items()}


def _assert_exact(model, x, objective="train"):
    torch.manual_seed(1)
    model = model.double().eval()
    y = torch.randn(x.shape[0], 2, dtype=torch.float64)
    data = TensorDataset(x.double(), y)
    task = Regression()
    specs, tapped = _tap_grads(model, task, data, objective)
    expected = layer_gradients(per_example_gradients(model, task, data, objective=objective), specs)
    assert set(tapped) == set(expected)
    for layer in expected:
        scale = expected[layer].abs().max()
        assert scale > 0
        torch.testing.assert_close(tapped[layer], expected[layer], rtol=0, atol=1e-12 * float(scale))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_with_leading_dims(bias):
    torch.manual_seed(0)
    _assert_exact(LeadingDims(bias), torch.randn(5, 2, 5, 4))


def test_weight_called_several_times_sums_every_call():
    torch.manual_seed(0)
    _assert_exact(Reused(), torch.randn(6, 4))


def test_measurement_gradients():
    torch.manual_seed(0)
    _assert_exact(LeadingDims(True), torch.randn(5, 2, 5, 4), objective="measurement")


CONV1D = [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, dilation=2, padding=2, bias=False),
    dict(kernel_size=4, padding="same"),
    dict(kernel_size=3, padding="valid"),
    dict(kernel_size=3, padding=2, padding_mode="reflect"),
    dict(kernel_size=3, padding=1, padding_mode="replicate"),
    dict(kernel_size=3, padding=1, padding_mode="circular", stride=2),
    dict(kernel_size=3, groups=2, out_channels=6),
    dict(kernel_size=3, groups=4, out_channels=8, padding=1, padding_mode="reflect"),  # depthwise
]

CONV2D = [
    dict(kernel_size=3),
    dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 0)),
    dict(kernel_size=3, dilation=2, padding=2),
    dict(kernel_size=(4, 3), padding="same", dilation=(1, 2)),
    dict(kernel_size=3, padding="valid", bias=False),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=3, padding=(1, 2), padding_mode="replicate"),
    dict(kernel_size=3, padding=1, padding_mode="circular", stride=2),
    dict(kernel_size=3, groups=2, out_channels=6, stride=2),
    dict(kernel_size=3, groups=4, out_channels=4, padding=1),  # depthwise
]


@pytest.mark.parametrize("config", CONV1D, ids=str)
def test_conv1d(config):
    torch.manual_seed(0)
    config = {"out_channels": 3, **config}
    _assert_exact(ConvHead(nn.Conv1d(4, **config)), torch.randn(5, 4, 11))


@pytest.mark.parametrize("config", CONV2D, ids=str)
def test_conv2d(config):
    torch.manual_seed(0)
    config = {"out_channels": 3, **config}
    _assert_exact(ConvHead(nn.Conv2d(4, **config)), torch.randn(4, 4, 8, 9))


def test_conv_called_through_functional_api():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            h = torch.nn.functional.conv2d(x, self.conv.weight, self.conv.bias, 2, 1, 1, 1)
            return self.head(torch.tanh(h).mean(dim=(2, 3)))

    torch.manual_seed(0)
    _assert_exact(Functional(), torch.randn(3, 2, 6, 6))


@st.composite
def conv_configs(draw):
    """Random Conv1d/Conv2d layers with every setting the tap reads from the call."""
    spatial = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2, 3]))
    in_channels = groups * draw(st.integers(1, 2))
    out_channels = groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(spatial))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(spatial))
    same = draw(st.booleans())
    stride = (1,) * spatial if same else tuple(draw(st.integers(1, 2)) for _ in range(spatial))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    if same:
        padding = "same"
    else:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(spatial))
    conv_type = nn.Conv1d if spatial == 1 else nn.Conv2d
    conv = conv_type(in_channels, out_channels, kernel, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, bias=draw(st.booleans()), padding_mode=padding_mode)
    size = (9,) if spatial == 1 else (7, 8)
    return conv, (draw(st.integers(1, 4)), in_channels) + size


@settings(max_examples=30, deadline=None)
@given(conv_configs(), st.integers(0, 2**16))
def test_random_conv_layers(config, seed):
    conv, shape = config
    torch.manual_seed(seed)
    _assert_exact(ConvHead(conv), torch.randn(shape))
