"""Tiny models, data sets and tasks shared by the tests (float64 where exactness is asserted)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import fninfluence as fi


def mlp(d_in=6, hidden=5, classes=3, bias=True):
    return nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.Tanh(), nn.Linear(hidden, classes, bias=bias))


class SmallCNN(nn.Module):
    def __init__(self, classes=3, **conv_kwargs):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, **conv_kwargs)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        x = torch.tanh(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


class TinyTransformerLM(nn.Module):
    """A one-block causal language model built only from nn.Linear layers around an embedding."""

    def __init__(self, vocab=11, d=8, heads=2, seq=6):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(seq, d))
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def reset_parameters(self):
        """Only ``pos`` is this module's own; the layers reset themselves (see :func:`deterministic`)."""
        with torch.no_grad():
            self.pos.copy_(0.1 * torch.randn(self.pos.shape, dtype=self.pos.dtype))

    def forward(self, ids):
        b, t = ids.shape
        x = self.embed(ids) + self.pos[:t]
        split = lambda z: z.view(b, t, self.heads, -1).transpose(1, 2)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, -1))
        x = x + self.down(torch.tanh(self.up(x)))
        return self.lm_head(x)


def classification_data(n=24, d_in=6, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d_in, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g))


def image_data(n=12, channels=2, size=7, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, channels, size, size, generator=g, dtype=dtype),
                         torch.randint(0, classes, (n,), generator=g))


def sequence_data(n=10, seq=6, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(0, vocab, (n, seq), generator=g))


class LMTask(fi.Task):
    """Next-token prediction, summed over tokens and sequences."""

    def compute_train_loss(self, batch, model, sample=False):
        (ids,) = batch
        logits = model(ids)[:, :-1].flatten(0, 1)
        targets = ids[:, 1:].flatten()
        if sample:
            with torch.no_grad():
                targets = torch.multinomial(logits.detach().softmax(-1), 1).flatten()
        return F.cross_entropy(logits, targets, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model, sample=False)

    def tracked_modules(self):
        return ["q", "k", "v", "o", "up", "down", "lm_head"]


class ClassificationTask(fi.Task):
    """Summed cross-entropy; the measurement is minus the summed margin (Kronfluence's examples)."""

    def __init__(self, modules=None):
        self.modules = modules

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        logits = model(x)
        if sample:
            with torch.no_grad():
                y = torch.multinomial(logits.detach().softmax(-1), 1).flatten()
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
        x, y = batch
        logits = model(x)
        correct = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).logsumexp(-1)
        return -(correct - others).sum()

    def tracked_modules(self):
        return self.modules


def deterministic(model, seed=0):
    """``model`` with every parameter re-drawn from ``seed``, module by module, by the modules' own initialisers.

    A model's weights then do not depend on what the random generator did before it was built (which tests ran
    first, in which order), and the generator's state outside this call is left as it was. A parameter that no
    ``reset_parameters`` re-draws is an error: give its module one.
    """
    versions = {name: p._version for name, p in model.named_parameters()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
            if callable(reset):
                reset()
    stale = [name for name, p in model.named_parameters() if p._version == versions[name]]
    if stale:
        raise ValueError(f"No reset_parameters() re-draws {stale}: add one to their module.")
    return model


def float64(model, seed=0):
    """``model`` re-initialised from ``seed`` (:func:`deterministic`), in float64 and eval mode.

    The global generator is then seeded too, so that what a test draws next (sampled labels) is reproducible.
    """
    deterministic(model, seed)
    torch.manual_seed(0)
    return model.double().eval()
