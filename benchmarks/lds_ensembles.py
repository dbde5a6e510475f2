"""LDS of checkpoint ensembles (``fninfluence.ensemble``) against the final checkpoint alone, on the digits MLP.

    python -m benchmarks.lds_ensembles                 # ~1 minute on 2 shared cores with a warm retraining cache
    python -m benchmarks.lds_ensembles --subsets 50    # a quicker look

The protocol of ``benchmarks/lds_options.py`` (``docs/examples/lds_digits.py``): an MLP 64-32-10 trained by
full-batch Adam (400 steps) on 500 scikit-learn digits, 50 test digits as queries, measurement minus the margin, the
LDS over ``--subsets`` random halves retrained to the end (400 steps) and cached in ``--cache`` (shared with
``lds_options``). The one training run being attributed is replayed step for step, keeping its weights every 50 steps
(checkpoint ``s`` = the model after ``s`` steps; the replay's final model is checked to equal the protocol's bit for
bit). Rows: ``fninfluence.ensemble.ensemble_pairwise_scores`` over some of these checkpoints (each checkpoint its own
EKFAC, or identity, factors and scores; mean over checkpoints), against the final checkpoint alone; ``gain`` is the mean over queries of the per-query LDS difference to
the final-only row, with its paired standard error. ``seconds`` is the
median of ``--repeats`` calls (5) (K fits + K scorings); ``x final`` divides it by the final-only call's. The LDS is a rank
correlation, so ``combine="sum"`` gives the same LDS as the mean. Results go to
``benchmarks/results/lds-ensembles-digits-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Dict

import torch
from torch import nn

import fninfluence as fi
from fninfluence.ensemble import ensemble_pairwise_scores
from fninfluence.eval import lds_from_measurements, random_subsets, retrain_measurements

from .lds_options import BATCH_SIZE, RESULTS, _digits_protocol, _timed

EVERY = 50
ROWS = [  # (label, checkpoint steps)
    ("final only (400)", (400,)),
    ("last 2 (300, 400)", (300, 400)),
    ("4 (100, 200, 300, 400)", (100, 200, 300, 400)),
    ("late 4 (250, 300, 350, 400)", (250, 300, 350, 400)),
    ("8 (every 50 steps)", tuple(range(50, 401, 50))),
]


def train_with_checkpoints(protocol, data, indices, every: int = EVERY) -> Dict[int, Dict[str, torch.Tensor]]:
    """``protocol.train`` step for step, keeping a copy of the weights after every ``every`` steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    x, y = data.tensors[0][indices], data.tensors[1][indices]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    states = {}
    for step in range(1, protocol.STEPS + 1):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + protocol.WEIGHT_DECAY * sum(
            p.square().sum() for p in model.parameters())
        loss.backward()
        optimizer.step()
        if step % every == 0:
            states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return states


def measure(args) -> Dict:
    protocol = _digits_protocol()
    train_data, query_data = protocol.digits()
    task = fi.classification_task()
    final = protocol.train(train_data, torch.arange(protocol.TRAIN))
    states = train_with_checkpoints(protocol, train_data, torch.arange(protocol.TRAIN))
    assert all(torch.equal(final.state_dict()[k], v) for k, v in states[protocol.STEPS].items()), \
        "the replayed run must end at the protocol's model"
    subsets = random_subsets(protocol.TRAIN, args.subsets, 0.5, seed=0)
    started = time.perf_counter()
    measurements = retrain_measurements(lambda indices: protocol.train(train_data, indices), subsets, task=task,
                                        query_data=query_data, cache_dir=args.cache,
                                        cache_key=f"digits-mlp32-adam{protocol.STEPS}-wd{protocol.WEIGHT_DECAY}")
    retrain_seconds = time.perf_counter() - started

    def run(strategy, steps):
        torch.manual_seed(0)
        return ensemble_pairwise_scores([states[s] for s in steps], task, query_data, train_data, model=final,
                                        strategy=strategy, batch_size=BATCH_SIZE, progress=False)

    run("ekfac", (400,))  # warm-up
    rows = []
    for strategy in ("ekfac", "identity"):
        baseline, reference = None, None
        for label, steps in ROWS:
            scores, seconds = _timed(lambda: run(strategy, steps), args.repeats)
            lds = lds_from_measurements(scores, subsets, measurements)
            baseline, reference = baseline or seconds, reference if reference is not None else lds.per_query
            gain = (lds.per_query - reference)[torch.isfinite(lds.per_query - reference)]
            gain_mean, gain_stderr = gain.mean().item(), (gain.std() / gain.numel() ** 0.5).item()
            rows.append({"strategy": strategy, "row": label, "checkpoints": list(steps), "lds": lds.mean,
                         "stderr": lds.stderr, "gain_vs_final": gain_mean, "gain_stderr": gain_stderr,
                         "seconds": seconds, "x_final": seconds / baseline})
            print(f"{strategy:<9} {label:<30} LDS {lds.mean:.3f} ± {lds.stderr:.3f}  (paired gain {gain_mean:+.3f} ± "
                  f"{gain_stderr:.3f})  {seconds * 1e3:7.1f} ms {seconds / baseline:5.1f}x", flush=True)
    return {"workload": "digits", "train": protocol.TRAIN, "queries": len(query_data), "subsets": args.subsets,
            "training_steps": protocol.STEPS, "checkpoint_every": EVERY, "retrain_seconds": retrain_seconds,
            "repeats": args.repeats, "combine": "mean", "rows": rows}


def table(result: Dict) -> str:
    lines = [f"| strategy | checkpoints (steps of {result['training_steps']}) | LDS (± s.e., {result['queries']} "
             f"queries, {result['subsets']} subsets) | gain vs final only (paired ± s.e.) | seconds (K fits + K scorings) "
             "| × final only |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['strategy']} | {r['row']} | {r['lds']:.3f} ± {r['stderr']:.3f} | {r['gain_vs_final']:+.3f} ± "
                     f"{r['gain_stderr']:.3f} | {r['seconds']:.3f} "
                     f"| {r['x_final']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "fninfluence-lds-cache"))
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny matrices: threads cost more than they give (and the machine is shared)
    result = {**measure(args), "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "command": "python -m benchmarks.lds_ensembles"}
    print("\n" + table(result) + "\n")
    out = Path(args.out_dir) / "lds-ensembles-digits-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
