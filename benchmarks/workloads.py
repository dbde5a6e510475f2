"""Benchmark workloads: a model, its task, training and query data, in a small and a medium size, and for the
language models a token-heavy "long" size and (GPT-2 only) a GPT-2-small-sized "large" one.

Small sizes are dominated by per-batch overheads (Python, dispatch, compilation); medium sizes are
compute-bound (each phase takes several seconds on 2 CPU cores). "long" (4 blocks, width 256, 256 tokens) is
where per-token activations dominate memory; "large" is GPT-2 small's shape (12 blocks, width 768, 12 heads)
with a vocabulary of 8192 and 256 tokens, random weights: minutes per pass on CPU, meant for a GPU or for
``--batches`` slices. Every workload is built from a seed and a config (no downloads). The same model, task
and data serve fninfluence and Kronfluence; the task is a Kronfluence 1.0.1 ``Task`` subclass when
Kronfluence is installed, and otherwise a plain fninfluence one (fninfluence reads the same method names).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import fninfluence


def _task_base():
    try:
        from kronfluence.task import Task as KronfluenceTask
        return KronfluenceTask
    except ImportError:  # Kronfluence is only needed for the side-by-side columns
        return fninfluence.Task


class ClassificationTask(_task_base()):
    """Summed cross-entropy; ``sample=True`` draws labels from the model (the true Fisher)."""

    def compute_train_loss(self, batch, model, sample=False):
        inputs, labels = batch
        logits = model(inputs)
        if sample:
            with torch.no_grad():
                labels = torch.multinomial(logits.softmax(-1), 1).flatten()
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch, model):
        inputs, labels = batch
        return F.cross_entropy(model(inputs), labels, reduction="sum")


class LanguageModelTask(_task_base()):
    """Next-token prediction, summed over tokens and sequences. ``logits_of`` maps the model output to logits."""

    def __init__(self, modules: Optional[List[str]] = None):
        super().__init__()
        self.modules = modules

    @staticmethod
    def _logits(model, ids):
        output = model(ids)
        return output.logits if hasattr(output, "logits") else output

    def compute_train_loss(self, batch, model, sample=False):
        (ids,) = batch
        logits = self._logits(model, ids)[:, :-1].flatten(0, 1)
        targets = ids[:, 1:].flatten()
        if sample:
            with torch.no_grad():
                targets = torch.multinomial(logits.softmax(-1), 1).flatten()
        return F.cross_entropy(logits, targets, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def get_influence_tracked_modules(self):
        return self.modules

    def tracked_modules(self):
        return self.modules


class CNN(nn.Module):
    def __init__(self, width: int, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.head(x.mean(dim=(2, 3)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TransformerLM(nn.Module):
    """A small pre-norm causal transformer built from nn.Linear layers (what both libraries track)."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, seq: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def gpt2_from_config(vocab: int, d: int, heads: int, layers: int, seq: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    # bos/eos inside the vocabulary (GPT-2's 50256 is not, and transformers warns); they do not enter the forward
    config = GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=d, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=vocab - 1,
                        eos_token_id=vocab - 1)
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config)


def conv1d_as_linear(model: nn.Module) -> nn.Module:
    """A copy with every Hugging Face ``Conv1D`` rewritten as the equivalent ``nn.Linear``: Kronfluence tracks
    only nn.Linear / nn.Conv2d, so this is how a Kronfluence user runs GPT-2. fninfluence runs the original."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "Conv1D":
                d_in, d_out = child.weight.shape
                linear = nn.Linear(d_in, d_out)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.T)
                    linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
    return model


@dataclass
class Workload:
    name: str
    model: nn.Module
    kronfluence_model: nn.Module  # the same function, in layers Kronfluence can track
    task: object
    kronfluence_task: object
    train: Dataset
    queries: Dataset
    batch_size: int


def _images(n: int, size: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g))


def _vectors(n: int, d: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, 10, (n,), generator=g))


def _tokens(n: int, seq: int, vocab: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(0, vocab, (n, seq), generator=g))


# name -> size -> settings; N is a multiple of the batch size, so every batch has one shape.
SIZES: Dict[str, Dict[str, dict]] = {
    "mlp": {"small": dict(n=512, q=16, d=64, hidden=128, batch=64),
            "medium": dict(n=4096, q=32, d=784, hidden=256, batch=256)},
    "cnn": {"small": dict(n=256, q=16, size=16, width=16, batch=32),
            "medium": dict(n=2048, q=32, size=32, width=48, batch=64)},
    "transformer": {"small": dict(n=64, q=8, vocab=128, d=64, heads=4, layers=1, seq=32, batch=16),
                    "medium": dict(n=512, q=16, vocab=512, d=192, heads=4, layers=2, seq=128, batch=16),
                    # token-heavy; tracks the blocks' Linear layers only (qkv, proj, up, down), not the lm_head
                    "long": dict(n=64, q=8, vocab=512, d=256, heads=4, layers=4, seq=256, batch=16,
                                 track="blocks")},
    "gpt2": {"small": dict(n=64, q=8, vocab=128, d=64, heads=4, layers=1, seq=32, batch=16),
             "medium": dict(n=384, q=16, vocab=512, d=192, heads=4, layers=2, seq=128, batch=16),
             "long": dict(n=64, q=8, vocab=512, d=256, heads=4, layers=4, seq=256, batch=16),
             # GPT-2 small's shape (about 92M parameters with this vocabulary), random weights
             "large": dict(n=256, q=8, vocab=8192, d=768, heads=12, layers=12, seq=256, batch=8)},
}


def _build_mlp(s) -> tuple:
    model = nn.Sequential(nn.Linear(s["d"], s["hidden"]), nn.ReLU(), nn.Linear(s["hidden"], s["hidden"]), nn.ReLU(),
                          nn.Linear(s["hidden"], 10))
    return model, ClassificationTask(), _vectors(s["n"], s["d"], 1), _vectors(s["q"], s["d"], 2)


def _build_cnn(s) -> tuple:
    return CNN(s["width"]), ClassificationTask(), _images(s["n"], s["size"], 1), _images(s["q"], s["size"], 2)


def _build_transformer(s) -> tuple:
    model = TransformerLM(s["vocab"], s["d"], s["heads"], s["layers"], s["seq"])
    return (model, LanguageModelTask(), _tokens(s["n"], s["seq"], s["vocab"], 1),
            _tokens(s["q"], s["seq"], s["vocab"], 2))


def _build_gpt2(s) -> tuple:
    model = gpt2_from_config(s["vocab"], s["d"], s["heads"], s["layers"], s["seq"])
    return (model, LanguageModelTask(), _tokens(s["n"], s["seq"], s["vocab"], 1),
            _tokens(s["q"], s["seq"], s["vocab"], 2))


BUILDERS: Dict[str, Callable] = {"mlp": _build_mlp, "cnn": _build_cnn, "transformer": _build_transformer,
                                 "gpt2": _build_gpt2}


def build(name: str, size: str, seed: int = 0) -> Workload:
    """The workload ``name`` at ``size``, in eval mode, with fixed random weights and data."""
    if name not in BUILDERS or size not in SIZES[name]:
        choices = "; ".join(f"{w}: {'/'.join(SIZES[w])}" for w in sorted(BUILDERS))
        raise ValueError(f"Unknown workload {name!r}/{size!r}: choose from {choices}.")
    settings = SIZES[name][size]
    torch.manual_seed(seed)
    model, task, train, queries = BUILDERS[name](settings)
    model = model.eval()
    kronfluence_model = conv1d_as_linear(model) if name == "gpt2" else copy.deepcopy(model)
    if name == "gpt2":
        # The LM head is tied to the token embedding (an nn.Embedding use of the same weight): neither
        # library can track it as a plain layer, so both track the transformer blocks' layers.
        kronfluence_task = LanguageModelTask(
            [n for n, m in kronfluence_model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n])
        task = LanguageModelTask([n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"])
    elif settings.get("track") == "blocks":
        # every block's nn.Linear (qkv, proj, up, down), not the lm_head; the copy has the same module names
        blocks = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
        task, kronfluence_task = LanguageModelTask(blocks), LanguageModelTask(list(blocks))
    else:
        kronfluence_task = task
    return Workload(name, model, kronfluence_model, task, kronfluence_task, train, queries, settings["batch"])


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(name: str, size: str) -> str:
    settings = SIZES[name][size]
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def ceil_div(a: int, b: int) -> int:
    return math.ceil(a / b)
