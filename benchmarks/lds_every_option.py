"""Every attribution option on every task: LDS and fit + score cost against the default (issue 15, item 4).

    python -m benchmarks.lds_every_option                          # digits, diabetes, cnn (warm cache: ~2 minutes)
    python -m benchmarks.lds_every_option --workloads cnn --subsets 50
    python -m benchmarks.lds_every_option --workloads lm --repeats 3   # the tiny LM: ~5 min warm, ~11 cold

The workloads, retrained subsets and on-disk retraining cache are those of ``benchmarks/lds_options.py`` (imported
from there; the CNN is its ``cnn`` workload, the tiny GPT-2 language model its ``lm`` workload). Every row passes
``use_empirical_fisher`` to ``fi.fit_factors`` explicitly, so the rows mean the same whatever the library's default
is. Rows, each timed end to end (factors fitted and scores computed, the median of ``--repeats`` calls, taken round
robin over the rows; ``x default`` and the paired column are relative to the first row, ``ekfac, true fisher``):

* ``ekfac, true fisher``: ``fi.fit_factors`` (EKFAC, ``use_empirical_fisher=False``: one label draw from the model
  per example, seed 0) + ``fi.pairwise_scores``;
* ``ekfac, empirical fisher``: ``use_empirical_fisher=True`` (the training labels);
* ``ekfac, fisher_samples=4``: four label draws per example (true Fisher);
* ``kfac, true fisher`` / ``kfac, empirical fisher``: ``strategy="kfac"``, true / empirical Fisher;
* ``cg 3 (ggn)`` / ``cg 10 (ggn)``: the true-Fisher factors, then ``fninfluence.refine.refined_pairwise_scores``
  (CG on the exact damped GGN of the whole training set); ``cg 10 (empirical fisher)``: the empirical-Fisher
  factors, CG on the exact damped empirical Fisher (refinement's default curvature for such factors);
* ``ensemble 4``: ``fninfluence.ensemble.ensemble_pairwise_scores`` over 4 checkpoints of the one training run
  (after 1/4, 2/4, 3/4 and all of its steps, replayed; the replay's final weights are checked against the model),
  each checkpoint's factors fitted with the true Fisher (``factors_kwargs``);
* ``chosen damping``: the true-Fisher factors, ``fninfluence.damping.choose_damping``, scores with the chosen damping.

``SKIP`` leaves rows out of a workload where they cost too much (none at present). The paired column is the mean
over queries of the per-query LDS difference to the first row, ± its standard error. Results go to
``benchmarks/results/lds-every-option-<workload>-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

import fninfluence as fi
from fninfluence.damping import choose_damping
from fninfluence.ensemble import ensemble_pairwise_scores
from fninfluence.eval import lds_from_measurements, random_subsets, retrain_measurements
from fninfluence.refine import refined_pairwise_scores

from . import lds_options
from .lds_options import BATCH_SIZE, RESULTS, WORKLOADS, Workload, _digits_protocol


def _states_digits(w: Workload, every: int):
    from .lds_ensembles import train_with_checkpoints

    protocol = _digits_protocol()
    return train_with_checkpoints(protocol, w.train_data, torch.arange(len(w.train_data)), every), protocol.STEPS


def _states_diabetes(w: Workload, every: int):
    """``lds_options._train_regression`` step for step, keeping the weights every ``every`` steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
    x, y = w.train_data.tensors
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    states = {}
    for step in range(1, lds_options.DIABETES_STEPS + 1):
        optimizer.zero_grad()
        loss = 0.5 * (model(x).squeeze(-1) - y).square().mean()
        (loss + lds_options.DIABETES_WD * sum(p.square().sum() for p in model.parameters())).backward()
        optimizer.step()
        if step % every == 0:
            states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return states, lds_options.DIABETES_STEPS


def _states_cnn(w: Workload, every: int):
    _, states = lds_options.train_cnn(w.train_data, torch.arange(len(w.train_data)), every=every)
    return states, lds_options.CNN_STEPS


def _states_lm(w: Workload, every: int):
    _, states = lds_options.train_lm(w.train_data, torch.arange(len(w.train_data)), every=every)
    return states, lds_options.LM_STEPS


CHECKPOINTS = {"digits": (_states_digits, 100), "diabetes": (_states_diabetes, 125), "cnn": (_states_cnn, 100),
               "lm": (_states_lm, lds_options.LM_STEPS // 4)}
DEFAULT_WORKLOADS = ["digits", "diabetes", "cnn"]  # ``--workloads lm`` runs the language model (slower)
SKIP: Dict[str, List[str]] = {}  # workload -> labels of rows left out of it (too slow there)


def _fit(w: Workload, *, use_empirical_fisher: bool, **options):
    """``fi.fit_factors`` seeded 0; ``use_empirical_fisher`` is required, so no row depends on the library default."""
    torch.manual_seed(0)
    return fi.fit_factors(w.model, w.task, w.train_data, batch_size=BATCH_SIZE, progress=False,
                          use_empirical_fisher=use_empirical_fisher, **options)


def _pairwise(w: Workload, factors, **options):
    return fi.pairwise_scores(w.model, w.task, factors, w.query_data, w.train_data, batch_size=BATCH_SIZE,
                              progress=False, **options)


def _refined(w: Workload, steps: int, use_empirical_fisher: bool = False):
    """CG on the exact damped curvature refinement defaults to for the factors: the GGN for true-Fisher factors, the
    empirical Fisher for empirical ones."""
    factors = _fit(w, use_empirical_fisher=use_empirical_fisher)
    return refined_pairwise_scores(w.model, w.task, factors, w.query_data, w.train_data, batch_size=BATCH_SIZE,
                                   curvature_batch_size=len(w.train_data), steps=steps, progress=False)


def _chosen(w: Workload):
    factors = _fit(w, use_empirical_fisher=False)
    choice = choose_damping(w.model, w.task, factors, w.train_data, batch_size=BATCH_SIZE)
    return _pairwise(w, factors, damping=choice.damping)


def rows(w: Workload):
    make_states, every = CHECKPOINTS[w.name]
    states, total = make_states(w, every)
    assert all(torch.equal(w.model.state_dict()[k], v) for k, v in states[total].items()), \
        "the replayed run must end at the workload's model"

    def ensemble():
        torch.manual_seed(0)
        return ensemble_pairwise_scores([states[s] for s in sorted(states)], w.task, w.query_data, w.train_data,
                                        model=w.model, strategy="ekfac", batch_size=BATCH_SIZE, progress=False,
                                        factors_kwargs=dict(use_empirical_fisher=False))

    every_row = [
        ("ekfac, true fisher", lambda: _pairwise(w, _fit(w, use_empirical_fisher=False))),
        ("ekfac, empirical fisher", lambda: _pairwise(w, _fit(w, use_empirical_fisher=True))),
        ("ekfac, fisher_samples=4", lambda: _pairwise(w, _fit(w, use_empirical_fisher=False, fisher_samples=4))),
        ("kfac, true fisher", lambda: _pairwise(w, _fit(w, use_empirical_fisher=False, strategy="kfac"))),
        ("kfac, empirical fisher", lambda: _pairwise(w, _fit(w, use_empirical_fisher=True, strategy="kfac"))),
        ("cg 3 (ggn)", lambda: _refined(w, 3)),
        ("cg 10 (ggn)", lambda: _refined(w, 10)),
        ("cg 10 (empirical fisher)", lambda: _refined(w, 10, use_empirical_fisher=True)),
        (f"ensemble 4 (steps {', '.join(str(s) for s in sorted(states))})", ensemble),
        ("chosen damping", lambda: _chosen(w)),
    ]
    skipped = SKIP.get(w.name, [])
    return [(label, function) for label, function in every_row if label not in skipped]


def measure(w: Workload, args) -> Dict:
    subsets = random_subsets(len(w.train_data), args.subsets, 0.5, seed=0)
    started = time.perf_counter()
    measurements = retrain_measurements(w.retrain, subsets, task=w.task, query_data=w.query_data,
                                        cache_dir=args.cache, cache_key=w.cache_key)
    retrain_seconds = time.perf_counter() - started
    options = rows(w)
    scores = {label: function() for label, function in options}  # warm-up; the scores are deterministic (seeded)
    seconds = {label: [] for label, _ in options}
    for _ in range(args.repeats):  # round robin, so that a slow spell of the shared machine hits every row alike
        for label, function in options:
            started = time.perf_counter()
            function()
            seconds[label].append(time.perf_counter() - started)
    baseline = statistics.median(seconds[options[0][0]])
    out, reference = [], None
    for label, function in options:
        lds = lds_from_measurements(scores[label], subsets, measurements)
        reference = reference if reference is not None else lds.per_query
        diff = (lds.per_query - reference).double()
        diff = diff[torch.isfinite(diff)]
        paired_mean, paired_se = diff.mean().item(), (diff.std() / diff.numel() ** 0.5).item()
        median = statistics.median(seconds[label])
        out.append({"row": label, "lds": lds.mean, "stderr": lds.stderr, "minus_default": paired_mean,
                    "minus_default_stderr": paired_se, "seconds": median, "x_default": median / baseline})
        print(f"{w.name:<9} {label:<40} LDS {lds.mean:.3f} ± {lds.stderr:.3f}  ({paired_mean:+.3f} ± {paired_se:.3f})"
              f"  {median * 1e3:8.1f} ms {median / baseline:6.1f}x", flush=True)
    return {"workload": w.name, "train": len(w.train_data), "queries": len(w.query_data), "subsets": args.subsets,
            "cache_key": w.cache_key, "retrain_seconds": retrain_seconds, "repeats": args.repeats,
            "default_seconds": baseline, "rows": out}


def table(results: List[Dict]) -> str:
    """One row per option (the union over the workloads, in order of first appearance); "–" where a workload
    left the option out (``SKIP``)."""
    labels = list(dict.fromkeys(row["row"] for r in results for row in r["rows"]))
    lines = ["| option | " + " | ".join(f"{r['workload']} LDS | × default" for r in results) + " |",
             "|---|" + "---|---|" * len(results)]
    for label in labels:
        cells = []
        for r in results:
            x = next((row for row in r["rows"] if row["row"] == label), None)
            cells.append("– | –" if x is None else f"{x['lds']:.3f} ± {x['stderr']:.3f} | {x['x_default']:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=DEFAULT_WORKLOADS, choices=list(WORKLOADS))
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "fninfluence-lds-cache"))
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny matrices: threads cost more than they give (and the machine is shared)
    results = []
    for name in args.workloads:
        result = {**measure(WORKLOADS[name](), args), "machine": platform.processor() or platform.machine(),
                  "torch": torch.__version__, "command": "python -m benchmarks.lds_every_option"}
        out = Path(args.out_dir) / f"lds-every-option-{name}-cpu.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        results.append(result)
    print("\n" + table(results) + "\n")
    return results


if __name__ == "__main__":
    main()
