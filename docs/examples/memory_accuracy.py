"""Predicted against measured peak memory, per phase, for an MLP, a CNN and a small transformer.

    python docs/examples/memory_accuracy.py [--batch-size 32] [--queries 16]

Measured: ``fninfluence.memory.measure_peak`` (torch.profiler's allocation events on CPU,
``torch.cuda.max_memory_allocated`` on a GPU) around each public call. Predicted: ``estimate_memory`` on a
batch of 4 examples.
"""

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset, TensorDataset

import fninfluence as fi
from fninfluence.memory import fit_phase_peak, measure_peak, pairwise_call_peak, self_call_peak

MiB = 2 ** 20


class TinyLM(nn.Module):
    """One causal attention block and an MLP, built from nn.Linear layers around an embedding."""

    def __init__(self, vocab=50, d=64, heads=2, seq=32):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(seq, d))
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        b, t = ids.shape
        x = self.embed(ids) + self.pos[:t]
        split = lambda z: z.view(b, t, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, -1))
        x = x + self.down(torch.tanh(self.up(x)))
        return self.lm_head(x)


def lm_loss(batch, model, sample):
    (ids,) = batch
    logits = model(ids)[:, :-1].flatten(0, 1)
    targets = ids[:, 1:].flatten()
    if sample:
        with torch.no_grad():
            targets = torch.multinomial(logits.softmax(-1), 1).flatten()
    return F.cross_entropy(logits, targets, reduction="sum")


def cases():
    torch.manual_seed(0)
    classify = fi.classification_task()
    yield "mlp", nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 10)).eval(), \
        TensorDataset(torch.randn(256, 256), torch.randint(0, 10, (256,))), classify
    yield "cnn", nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 32, 3, stride=2), nn.Tanh(),
                               nn.Flatten(), nn.Linear(32 * 7 * 7, 10)).eval(), \
        TensorDataset(torch.randn(128, 3, 16, 16), torch.randint(0, 10, (128,))), classify
    yield "transformer", TinyLM().eval(), TensorDataset(torch.randint(0, 50, (64, 32))), fi.task_from_functions(lm_loss)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--queries", type=int, default=16)
    args = parser.parse_args()
    print(f"predicted / measured MiB (ratio); batch size {args.batch_size}, {args.queries} queries")
    print(f"{'model':<12}{'strategy':<10}{'fit_factors':>24}{'pairwise_scores':>24}{'self_scores':>24}")
    for name, model, data, task in cases():
        queries = Subset(data, range(args.queries))
        for first, strategy in enumerate(("identity", "diagonal", "kfac", "ekfac")):
            checked = dict(checked=first > 0)  # the exactness check runs in the model's first call only
            estimate = fi.estimate_memory(model, task, data[:4], strategy=strategy, batch_size=args.batch_size,
                                          num_queries=args.queries, num_train=len(data))
            factors, fit = measure_peak(lambda: fi.fit_factors(model, task, data, strategy=strategy,
                                                               batch_size=args.batch_size, progress=False))
            _, pairwise = measure_peak(lambda: fi.pairwise_scores(model, task, factors, queries, data,
                                                                  batch_size=args.batch_size, progress=False))
            _, self_ = measure_peak(lambda: fi.self_scores(model, task, factors, data, batch_size=args.batch_size,
                                                           progress=False))
            cells = [f"{p / MiB:7.2f} / {m / MiB:7.2f} ({p / m:.2f})" for p, m in (
                (fit_phase_peak(estimate, **checked), fit), (pairwise_call_peak(estimate, checked=True), pairwise),
                (self_call_peak(estimate, checked=True), self_))]
            print(f"{name:<12}{strategy:<10}" + "".join(f"{c:>24}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
