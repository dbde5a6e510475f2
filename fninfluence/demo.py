"""A self-contained demonstration on scikit-learn's bundled digits: ``fninfluence demo``.

It trains a small MLP on 8x8 digit images, fits curvature factors on the training set, and lists for
a few test images the training images that most helped (proponents) and most hurt (opponents) the
model's prediction. Everything runs on the CPU in seconds; no data is downloaded (the digits ship
with scikit-learn, which the demo needs but fninfluence itself does not).

Results go to an output directory (``./fninfluence-demo`` by default)::

    <out>/factors/        the fitted factors, a Zarr store (fit_factors(store=...))
    <out>/scores/         the pairwise scores, total and per layer (pairwise_scores(store=...))
    <out>/influence.png   each query with its top proponents and opponents (needs matplotlib)

so that ``fninfluence inspect <out>`` and ``fninfluence top <out>/scores --query 0`` have something to read.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn
from torch.utils.data import TensorDataset

import fninfluence  # the package's own API, as a user would call it

from .store.describe import is_store
from .store.scores_store import read_scores

NUM_TRAIN = 1500
EPOCHS = 400  # full-batch Adam steps: 1500 images of 64 pixels make one cheap batch
INFLUENCE_BATCH_SIZE = 250
DEFAULT_OUT = "fninfluence-demo"


class DemoArgumentError(ValueError):
    """An argument of :func:`run_demo` is out of range."""


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # scikit-learn is only needed for this demo
        raise ImportError(
            "The fninfluence demo uses the digits data set bundled with scikit-learn, which is not installed. "
            "Install it with: pip install scikit-learn"
        ) from error
    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # pixel values 0..16 -> [0, 1]
    labels = torch.tensor(digits.target, dtype=torch.long)
    return images, labels


def _train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(EPOCHS):
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def _store_path(out: Path, name: str) -> Path:
    """``out / name``, refusing to replace a folder that is not an fninfluence store (the demo overwrites its own)."""
    path = out / name
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not is_store(path))):
        raise DemoArgumentError(
            f"{path} exists and is not an fninfluence store, so the demo will not overwrite it: pass another --out."
        )
    return path


def _save_figure(result: Dict[str, Any], query_x, train_x, train_y, query_y, path: Path) -> Optional[Path]:
    """The proponents/opponents grid as a PNG, or None (with a hint) when matplotlib is missing."""
    try:
        from .plot import influential_examples
        figure = influential_examples(
            query_x, train_x, result["scores"], k=result["top_k"], image_shape=(8, 8),
            query_labels=[f"label {int(y)}, predicted {int(p)}" for y, p in zip(query_y, result["query_predictions"])],
            train_labels=[f"label {int(y)}" for y in train_y],
            title=f"Digits MLP, {result['strategy']} influence: the training images that most help (green) and "
                  "most hurt (red) each test image's margin",
        )
    except ImportError:
        print('\nFigure: skipped, matplotlib is not installed. For the PNG: pip install "fninfluence[plot]"')
        return None
    figure.savefig(path, dpi=110)
    return path


def run_demo(strategy: str = "ekfac", num_queries: int = 3, top_k: int = 5, seed: int = 0,
             progress: bool = True, out: Union[str, Path] = DEFAULT_OUT) -> Dict[str, Any]:
    """Train an MLP on the digits, fit ``strategy`` factors, and print each query's proponents and opponents.

    The first ``NUM_TRAIN`` (1500) images are the training set and the remaining 297 the test set; the
    queries are the first ``num_queries`` test images. The measurement is that of
    :func:`fninfluence.classification_task` (minus the query's margin), so a positive score means that
    upweighting the training image raises the query's margin for its true label.

    The factors, the scores (total and per layer) and a PNG of the proponents and opponents are written
    under ``out`` (see the module docstring); a previous demo's stores there are replaced.

    Returns a dict with ``scores`` (``[num_queries, 1500]``), ``per_layer`` (``{layer: [num_queries, 1500]}``),
    ``query_indices`` (indices into the full digits data set), ``query_labels``, ``query_predictions``,
    ``proponents`` and ``opponents`` (``[num_queries, top_k]`` training indices), ``accuracy`` (test
    accuracy), ``timings`` (seconds per phase), and the paths ``factors_store``, ``scores_store`` and
    ``figure`` (None without matplotlib).
    """
    # Every tensor here is tiny, so extra threads only add synchronisation; on small shared machines
    # an OpenMP barrier can then stall for seconds. Run on one thread and restore the setting after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(strategy, num_queries, top_k, seed, progress, Path(out))
    finally:
        torch.set_num_threads(threads)


def _split(num_queries: int, top_k: int):
    """``(train_x, train_y, test_x, test_y)``: the first NUM_TRAIN digits and the rest, after checking the
    demo's arguments against their sizes."""
    images, labels = _load_digits()
    train_x, train_y = images[:NUM_TRAIN], labels[:NUM_TRAIN]
    test_x, test_y = images[NUM_TRAIN:], labels[NUM_TRAIN:]
    if not 1 <= num_queries <= len(test_x):
        raise DemoArgumentError(f"num_queries must be between 1 and {len(test_x)}, got {num_queries}.")
    if not 1 <= top_k <= len(train_x):
        raise DemoArgumentError(f"top_k must be between 1 and {len(train_x)}, got {top_k}.")
    print(f"Data: scikit-learn digits, {len(train_x)} training and {len(test_x)} test images "
          f"(8x8 pixels scaled to [0, 1]).")
    return train_x, train_y, test_x, test_y


def _trained_model(seed: int, train_x, train_y, test_x, test_y):
    """``(model, test predictions, test accuracy)`` of the demo's MLP."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    _train(model, train_x, train_y)
    with torch.no_grad():
        predictions = model(test_x).argmax(dim=-1)
    accuracy = (predictions == test_y).float().mean().item()
    print(f"Model: MLP 64-32-10 (tanh), full-batch Adam for {EPOCHS} epochs; test accuracy {100 * accuracy:.1f}%.")
    return model, predictions, accuracy


def _print_ranking(scores, proponents, opponents, test_y, predictions, train_y, top_k: int) -> None:
    for q in range(scores.shape[0]):
        label, predicted = int(test_y[q]), int(predictions[q])
        verdict = "correct" if label == predicted else "WRONG"
        print(f"\nQuery {q}: test image #{NUM_TRAIN + q}, label {label}, predicted {predicted} ({verdict})")
        for title, picked in (("proponents", proponents[q]), ("opponents", opponents[q])):
            print(f"  top {top_k} {title}:")
            for n in picked.tolist():
                print(f"    train #{n:<5d} label {int(train_y[n])}   score {float(scores[q, n]):+.2e}")


def _timed(timings: Dict[str, float], name: str, compute):
    started = time.perf_counter()
    result = compute()
    timings[name] = time.perf_counter() - started
    return result


def _run(strategy: str, num_queries: int, top_k: int, seed: int, progress: bool, out: Path) -> Dict[str, Any]:
    timings: Dict[str, float] = {}
    train_x, train_y, test_x, test_y = _timed(timings, "load data", lambda: _split(num_queries, top_k))
    factors_store, scores_store = _store_path(out, "factors"), _store_path(out, "scores")
    train_ds = TensorDataset(train_x, train_y)
    query_ds = TensorDataset(test_x[:num_queries], test_y[:num_queries])
    model, predictions, accuracy = _timed(timings, "train model",
                                          lambda: _trained_model(seed, train_x, train_y, test_x, test_y))
    task = fninfluence.classification_task()
    factors = _timed(timings, "fit factors", lambda: fninfluence.fit_factors(
        model, task, train_ds, strategy=strategy, batch_size=INFLUENCE_BATCH_SIZE, progress=progress,
        store=factors_store, overwrite=True))
    per_layer = _timed(timings, "pairwise scores", lambda: fninfluence.pairwise_scores(
        model, task, factors, query_ds, train_ds, batch_size=INFLUENCE_BATCH_SIZE, progress=progress, per_module=True,
        store=scores_store, overwrite=True))
    scores = read_scores(scores_store)["all_modules"]  # the layers' sum, as the store holds it
    print(f"Influence: {factors.strategy} curvature fitted on the {len(train_x)} training images, then the "
          f"scores of {num_queries} test image{'s' if num_queries > 1 else ''} against all of them.\n"
          "  score > 0: upweighting the training image raises the query's margin for its true label (it helps);\n"
          "  score < 0: it lowers that margin (it hurts). Scores are not divided by the number of examples.")
    proponents, opponents = scores.topk(top_k, dim=1).indices, (-scores).topk(top_k, dim=1).indices
    _print_ranking(scores, proponents, opponents, test_y, predictions, train_y, top_k)
    result = {
        "scores": scores, "per_layer": per_layer, "strategy": factors.strategy, "top_k": top_k,
        "query_indices": list(range(NUM_TRAIN, NUM_TRAIN + num_queries)),
        "query_labels": test_y[:num_queries].clone(), "query_predictions": predictions[:num_queries].clone(),
        "proponents": proponents, "opponents": opponents, "accuracy": accuracy, "timings": timings,
        "factors_store": factors_store, "scores_store": scores_store,
    }
    out.mkdir(parents=True, exist_ok=True)
    result["figure"] = _save_figure(result, test_x[:num_queries], train_x, train_y, test_y[:num_queries],
                                    out / "influence.png")
    print("\nTime: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in timings.items()))
    print(f"\nWrote {factors_store} ({factors.strategy} factors) and {scores_store} (scores {list(scores.shape)}, "
          "total and per layer)" + (f", and {result['figure']}" if result["figure"] else "") + ". Look inside with:\n"
          f"  fninfluence inspect {out}\n  fninfluence top {scores_store} --query 0 -k {top_k}")
    return result
