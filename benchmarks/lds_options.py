"""LDS and cost of iterative refinement (``fninfluence.refine``) against the default EKFAC scores.

    python -m benchmarks.lds_options                       # both workloads (~6 minutes on 2 shared cores, first run)
    python -m benchmarks.lds_options --workloads digits --subsets 50      # a quicker look

Workloads (each: a model trained on the full training set, queries from held-out data, the LDS over ``--subsets``
random halves of the training set, retrained deterministically and cached on disk in ``--cache``):

* ``digits``: the protocol of ``docs/examples/lds_digits.py`` (loaded from that file): an MLP 64-32-10 on 500
  scikit-learn digits, 50 test digits, measurement minus the margin;
* ``diabetes``: an MLP 10-32-1 (tanh) on 300 of scikit-learn's diabetes patients (standardised features and
  target), full-batch Adam, squared error + L2; 50 other patients as queries, measurement the query's squared error;
* ``cnn`` (not run by default; ``--workloads cnn``): the digits protocol's data as 1x8x8 images, conv 1->8 (3x3,
  padding 1), ReLU, conv 8->8 (3x3), ReLU, linear 288->10, trained like the digits MLP (full-batch Adam, 400 steps,
  L2 1e-3); its 100 retrainings take ~4 minutes. ``benchmarks/lds_every_option.py`` measures it.
* ``lm`` (not run by default; ``--workloads lm``): a tiny GPT-2 built from a config (``transformers``, random init
  seed 0, 1 layer, width 32, 2 heads, vocabulary 32, 16 positions, dropout 0, LM head untied) on 300 sequences of
  16 tokens from a fixed random sparse Markov chain (each token has 3 possible successors; :func:`lm_sequences`),
  full-batch Adam (lr 1e-2, 200 steps) on the mean next-token cross-entropy + L2 1e-2; 50 other sequences as
  queries, measurement the query's summed token loss; the task's loss is the summed next-token cross-entropy,
  targets drawn from the model with ``sample=True``. Its 100 retrainings take ~6 minutes (~3.5 s each);
  ``benchmarks/lds_every_option.py`` measures it (here the exact solve is slow: a GGN product costs ~4.5 s).

Rows: EKFAC factors fitted with the true Fisher (``use_empirical_fisher=False``, passed explicitly; seed 0), scored by
``fi.pairwise_scores`` (the default) or by ``fninfluence.refine.refined_pairwise_scores`` with ``steps`` products with
the exact damped GGN of the training set (conjugate gradients, or Richardson), on a random fifth of the training set
(``curv=subset``), with the empirical Fisher (factors and products), the exact damped solve (CG run to
convergence, ``steps=--exact-steps``, timed once), and, for comparison, EKFAC fitted with 4 label draws per example
(``fisher_samples=4``, whose cost is in the fit, ~2.6x: ``benchmarks/fisher_samples.py``). ``seconds`` is the
median of ``--repeats`` calls (factors fitted once, outside); ``x pairwise`` divides it by the median of
``fi.pairwise_scores`` with the default factors. Results go to ``benchmarks/results/lds-options-<workload>-cpu.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

import fninfluence as fi
from fninfluence.eval import lds_from_measurements, random_subsets, retrain_measurements
from fninfluence.refine import refined_pairwise_scores

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
BATCH_SIZE = 100


def _digits_protocol():
    spec = importlib.util.spec_from_file_location("lds_digits", ROOT / "docs" / "examples" / "lds_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Workload:
    """A trained model, its task and data, and a retraining function of a subset's indices."""

    def __init__(self, name, model, task, train_data, query_data, retrain: Callable, cache_key: str):
        self.name, self.model, self.task = name, model, task
        self.train_data, self.query_data, self.retrain, self.cache_key = train_data, query_data, retrain, cache_key


def digits() -> Workload:
    protocol = _digits_protocol()
    train_data, query_data = protocol.digits()
    model = protocol.train(train_data, torch.arange(protocol.TRAIN))
    return Workload("digits", model, fi.classification_task(), train_data, query_data,
                    lambda indices: protocol.train(train_data, indices),
                    f"digits-mlp32-adam{protocol.STEPS}-wd{protocol.WEIGHT_DECAY}")


class SquaredError(fi.Task):
    """Summed ``(f - y)^2 / 2``; sampled targets ``f + N(0, 1)`` (the Gaussian's true Fisher); measurement: the
    query's own squared error."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        out = model(x).squeeze(-1)
        if sample:
            with torch.no_grad():
                y = out.detach() + torch.randn_like(out)
        return 0.5 * (out - y).square().sum()

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model, sample=False)


DIABETES_TRAIN, DIABETES_QUERIES, DIABETES_STEPS, DIABETES_WD = 300, 50, 500, 1e-2


def _train_regression(data: TensorDataset, indices: torch.Tensor) -> nn.Module:
    """Full-batch Adam from one fixed initialisation: mean squared error / 2 + L2."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
    x, y = data.tensors[0][indices], data.tensors[1][indices]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(DIABETES_STEPS):
        optimizer.zero_grad()
        loss = 0.5 * (model(x).squeeze(-1) - y).square().mean()
        (loss + DIABETES_WD * sum(p.square().sum() for p in model.parameters())).backward()
        optimizer.step()
    return model.eval()


def diabetes() -> Workload:
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    y = torch.tensor((y - y.mean()) / y.std(), dtype=torch.float32)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:DIABETES_TRAIN], order[DIABETES_TRAIN:DIABETES_TRAIN + DIABETES_QUERIES]
    train_data, query_data = TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])
    model = _train_regression(train_data, torch.arange(DIABETES_TRAIN))
    return Workload("diabetes", model, SquaredError(), train_data, query_data,
                    lambda indices: _train_regression(train_data, indices),
                    f"diabetes-mlp32-adam{DIABETES_STEPS}-wd{DIABETES_WD}")


CNN_STEPS, CNN_WD = 400, 1e-3


def _cnn_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 10))


def train_cnn(data: TensorDataset, indices: torch.Tensor, every: int = 0):
    """Full-batch Adam (lr 1e-2, ``CNN_STEPS`` steps) from one fixed initialisation: mean cross-entropy + L2.
    With ``every > 0`` also returns the weights after every ``every`` steps (``{step: state_dict}``)."""
    torch.manual_seed(0)
    model = _cnn_model()
    x, y = data.tensors[0][indices], data.tensors[1][indices]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    states = {}
    for step in range(1, CNN_STEPS + 1):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + CNN_WD * sum(p.square().sum() for p in model.parameters())
        loss.backward()
        optimizer.step()
        if every and step % every == 0:
            states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return (model.eval(), states) if every else model.eval()


def cnn() -> Workload:
    """A small CNN on the digits protocol's images (the same 500 training and 50 query digits, as 1x8x8 images):
    conv 1->8 (3x3, padding 1), ReLU, conv 8->8 (3x3), ReLU, linear 288->10; measurement minus the margin."""
    protocol = _digits_protocol()
    flat_train, flat_query = protocol.digits()
    train_data = TensorDataset(flat_train.tensors[0].reshape(-1, 1, 8, 8), flat_train.tensors[1])
    query_data = TensorDataset(flat_query.tensors[0].reshape(-1, 1, 8, 8), flat_query.tensors[1])
    model = train_cnn(train_data, torch.arange(len(train_data)))
    return Workload("cnn", model, fi.classification_task(), train_data, query_data,
                    lambda indices: train_cnn(train_data, indices), f"digits-cnn8-8-adam{CNN_STEPS}-wd{CNN_WD}")


LM_VOCAB, LM_LENGTH, LM_TRAIN, LM_QUERIES, LM_SUCCESSORS = 32, 16, 300, 50, 3
LM_WIDTH, LM_HEADS, LM_LAYERS, LM_STEPS, LM_LR, LM_WD = 32, 2, 1, 200, 1e-2, 1e-2


def lm_sequences(count: int, seed: int = 0) -> torch.Tensor:
    """``[count, LM_LENGTH]`` token ids from a fixed random sparse Markov chain: every token has ``LM_SUCCESSORS``
    possible successors (a random choice of the vocabulary) with random probabilities (normalised exponentials),
    the first token uniform; all drawn from one ``torch.Generator`` seeded ``seed`` (no downloads)."""
    generator = torch.Generator().manual_seed(seed)
    successors = torch.stack([torch.randperm(LM_VOCAB, generator=generator)[:LM_SUCCESSORS]
                              for _ in range(LM_VOCAB)])
    weights = -torch.rand(LM_VOCAB, LM_SUCCESSORS, generator=generator).log()
    weights = weights / weights.sum(1, keepdim=True)
    ids = torch.empty(count, LM_LENGTH, dtype=torch.long)
    ids[:, 0] = torch.randint(LM_VOCAB, (count,), generator=generator)
    for t in range(1, LM_LENGTH):
        choice = torch.multinomial(weights[ids[:, t - 1]], 1, generator=generator).squeeze(1)
        ids[:, t] = successors[ids[:, t - 1], choice]
    return ids


def lm_entropy_rate(seed: int = 0) -> float:
    """The chain's mean per-token entropy (nats) over a uniform current token: the best achievable per-token loss
    is about this (the stationary distribution weights the tokens a little differently)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(LM_VOCAB):
        torch.randperm(LM_VOCAB, generator=generator)
    weights = -torch.rand(LM_VOCAB, LM_SUCCESSORS, generator=generator).log()
    weights = weights / weights.sum(1, keepdim=True)
    return float(-(weights * weights.log()).sum(1).mean())


def _lm_model() -> nn.Module:
    """A GPT-2 causal LM from a config, randomly initialised (seed 0), dropout off, eager attention. The LM head is
    not tied to the token embedding (``tie_word_embeddings=False``), so that it is a plain layer fninfluence tracks
    (a tied head cannot be: its weight is also used by the embedding); the embeddings are left out, as by default.
    ``use_cache=False``: the output is then tensors only, which the exact GGN products of refinement need."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=LM_VOCAB, n_positions=LM_LENGTH, n_embd=LM_WIDTH, n_layer=LM_LAYERS,
                        n_head=LM_HEADS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=LM_VOCAB - 1, eos_token_id=LM_VOCAB - 1, tie_word_embeddings=False,
                        use_cache=False)
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config)


class NextTokenLoss(fi.Task):
    """Next-token cross-entropy summed over the sequences and tokens of a batch of ``(input_ids,)``; with
    ``sample=True`` the targets are drawn from the model's own predictive distribution (the true Fisher).
    Measurement: the query sequence's summed token loss (its own tokens, not sampled)."""

    def compute_train_loss(self, batch, model, sample=False):
        (ids,) = batch
        logits = model(input_ids=ids).logits[:, :-1].flatten(0, 1)
        targets = ids[:, 1:].flatten()
        if sample:
            with torch.no_grad():
                targets = torch.distributions.Categorical(logits=logits.detach()).sample()
        return nn.functional.cross_entropy(logits, targets, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model, sample=False)


def train_lm(data: TensorDataset, indices: torch.Tensor, every: int = 0):
    """Full-batch Adam (lr ``LM_LR``, ``LM_STEPS`` steps) from one fixed initialisation: mean next-token
    cross-entropy + ``LM_WD`` x L2. With ``every > 0`` also returns the weights after every ``every`` steps."""
    model = _lm_model()
    ids = data.tensors[0][indices]
    optimizer = torch.optim.Adam(model.parameters(), lr=LM_LR)
    states = {}
    for step in range(1, LM_STEPS + 1):
        optimizer.zero_grad()
        logits = model(input_ids=ids).logits[:, :-1].flatten(0, 1)
        loss = nn.functional.cross_entropy(logits, ids[:, 1:].flatten())
        (loss + LM_WD * sum(p.square().sum() for p in model.parameters())).backward()
        optimizer.step()
        if every and step % every == 0:
            states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return (model.eval(), states) if every else model.eval()


def lm() -> Workload:
    """A tiny GPT-2 (from a config) on sequences of a random sparse Markov chain (:func:`lm_sequences`)."""
    ids = lm_sequences(LM_TRAIN + LM_QUERIES)
    train_data, query_data = TensorDataset(ids[:LM_TRAIN]), TensorDataset(ids[LM_TRAIN:])
    model = train_lm(train_data, torch.arange(LM_TRAIN))
    key = (f"lm-gpt2-untied-v{LM_VOCAB}-t{LM_LENGTH}-d{LM_WIDTH}-l{LM_LAYERS}-markov{LM_SUCCESSORS}"
           f"-adam{LM_STEPS}-lr{LM_LR}-wd{LM_WD}")
    return Workload("lm", model, NextTokenLoss(), train_data, query_data, lambda indices: train_lm(train_data, indices),
                    key)


WORKLOADS = {"digits": digits, "diabetes": diabetes, "cnn": cnn, "lm": lm}
DEFAULT_WORKLOADS = ["digits", "diabetes"]  # the documented tables; ``--workloads cnn`` adds the CNN


# use_empirical_fisher explicit in every fit, so that the labels hold whatever the library's default is
FACTORS = {"true fisher": {"use_empirical_fisher": False}, "empirical": {"use_empirical_fisher": True},
           "4 draws": {"use_empirical_fisher": False, "fisher_samples": 4}}


def _fit(w: Workload, options: Dict):
    torch.manual_seed(0)
    return fi.fit_factors(w.model, w.task, w.train_data, strategy="ekfac", batch_size=BATCH_SIZE, progress=False,
                          **options)


def variants(w: Workload, exact_steps: int) -> List[tuple]:
    """``(label, factors, options)``; options None: ``fi.pairwise_scores``, else refinement's."""
    subset = Subset(w.train_data, torch.randperm(len(w.train_data), generator=torch.Generator().manual_seed(1))
                    [:len(w.train_data) // 5].tolist())
    rows = [("ekfac (default)", "true fisher", None)]
    rows += [(f"cg {s} (ggn)", "true fisher", dict(steps=s)) for s in (1, 2, 3, 5, 10)]
    rows += [(f"cg {s} (ggn, curv=subset)", "true fisher", dict(steps=s, curvature_data=subset)) for s in (3, 10)]
    rows += [(f"richardson {s} (ggn)", "true fisher", dict(steps=s, method="richardson")) for s in (3, 10)]
    rows += [(f"exact damped ggn (cg {exact_steps})", "true fisher", dict(steps=exact_steps))]
    rows += [("ekfac, empirical fisher", "empirical", None)]
    rows += [(f"cg {s} (empirical fisher)", "empirical", dict(steps=s)) for s in (3, 10)]
    rows += [(f"exact damped emp. fisher (cg {exact_steps})", "empirical", dict(steps=exact_steps))]
    rows += [("ekfac, fisher_samples=4 (fit ~2.6x)", "4 draws", None)]
    return rows


def _scores(w: Workload, factors, options):
    if options is None:
        return fi.pairwise_scores(w.model, w.task, factors, w.query_data, w.train_data, batch_size=BATCH_SIZE,
                                  progress=False)
    return refined_pairwise_scores(w.model, w.task, factors, w.query_data, w.train_data, batch_size=BATCH_SIZE,
                                   curvature_batch_size=len(w.train_data), progress=False, **options)


def _timed(function, repeats: int = 1):
    """``(the last result, the median seconds over repeats calls)``."""
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - started)
    return result, statistics.median(seconds)


def measure(w: Workload, args) -> Dict:
    subsets = random_subsets(len(w.train_data), args.subsets, 0.5, seed=0)
    started = time.perf_counter()
    measurements = retrain_measurements(w.retrain, subsets, task=w.task, query_data=w.query_data,
                                        cache_dir=args.cache, cache_key=w.cache_key)
    retrain_seconds = time.perf_counter() - started
    factors = {name: _fit(w, options) for name, options in FACTORS.items()}
    _timed(lambda: _scores(w, factors["true fisher"], None), 2)  # warm-up
    _timed(lambda: _scores(w, factors["true fisher"], dict(steps=1)), 2)
    _, baseline = _timed(lambda: _scores(w, factors["true fisher"], None), args.repeats)
    rows = []
    for label, key, options in variants(w, args.exact_steps):
        repeats = 1 if options and options["steps"] == args.exact_steps else args.repeats  # a reference, not an option
        scores, seconds = _timed(lambda: _scores(w, factors[key], options), repeats)
        lds = lds_from_measurements(scores, subsets, measurements)
        rows.append({"row": label, "lds": lds.mean, "stderr": lds.stderr, "seconds": seconds,
                     "x_pairwise": seconds / baseline})
        print(f"{w.name:<9} {label:<40} LDS {lds.mean:.3f} ± {lds.stderr:.3f}  {seconds * 1e3:7.1f} ms "
              f"{seconds / baseline:6.1f}x", flush=True)
    return {"workload": w.name, "train": len(w.train_data), "queries": len(w.query_data), "subsets": args.subsets,
            "pairwise_seconds": baseline, "retrain_seconds": retrain_seconds, "repeats": args.repeats,
            "exact_steps": args.exact_steps, "rows": rows}


def table(result: Dict) -> str:
    lines = [f"| {result['workload']} | LDS (± s.e., {result['queries']} queries, {result['subsets']} subsets) "
             "| seconds | × pairwise_scores |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['row']} | {r['lds']:.3f} ± {r['stderr']:.3f} | {r['seconds']:.3f} "
                     f"| {r['x_pairwise']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=DEFAULT_WORKLOADS, choices=list(WORKLOADS))
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--exact-steps", type=int, default=400)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "fninfluence-lds-cache"))
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny matrices: threads cost more than they give (and the machine is shared)
    results = []
    for name in args.workloads:
        result = {**measure(WORKLOADS[name](), args), "machine": platform.processor() or platform.machine(),
                  "torch": torch.__version__, "command": "python -m benchmarks.lds_options"}
        print("\n" + table(result) + "\n")
        out = Path(args.out_dir) / f"lds-options-{name}-cpu.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        results.append(result)
    return results


if __name__ == "__main__":
    main()
