"""A self-contained demonstration on scikit-learn's bundled digits: ``fninfluence demo``.

It trains a small MLP on 8x8 digit images, fits curvature factors on the training set, and lists for
a few test images the training images that most helped (proponents) and most hurt (opponents) the
model's prediction. Everything runs on the CPU in seconds; no data is downloaded (the digits ship
with scikit-learn, which the demo needs but fninfluence itself does not).
"""

from __future__ import annotations

import time
from typing import Any, Dict

import torch
from torch import nn
from torch.utils.data import TensorDataset

NUM_TRAIN = 1500
EPOCHS = 400  # full-batch Adam steps: 1500 images of 64 pixels make one cheap batch
INFLUENCE_BATCH_SIZE = 250


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


def run_demo(strategy: str = "ekfac", num_queries: int = 3, top_k: int = 5, seed: int = 0,
             progress: bool = True) -> Dict[str, Any]:
    """Train an MLP on the digits, fit ``strategy`` factors, and print each query's proponents and opponents.

    The first ``NUM_TRAIN`` (1500) images are the training set and the remaining 297 the test set; the
    queries are the first ``num_queries`` test images. The measurement is that of
    :func:`fninfluence.classification_task` (minus the query's margin), so a positive score means that
    upweighting the training image raises the query's margin for its true label.

    Returns a dict with ``scores`` (``[num_queries, 1500]``), ``query_indices`` (indices into the full
    digits data set), ``query_labels``, ``query_predictions``, ``proponents`` and ``opponents``
    (``[num_queries, top_k]`` training indices), ``accuracy`` (test accuracy) and ``timings`` (seconds
    per phase).
    """
    # Every tensor here is tiny, so extra threads only add synchronisation; on small shared machines
    # an OpenMP barrier can then stall for seconds. Run on one thread and restore the setting after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(strategy, num_queries, top_k, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _run(strategy: str, num_queries: int, top_k: int, seed: int, progress: bool) -> Dict[str, Any]:
    import fninfluence  # the package's own API, as a user would call it

    timings: Dict[str, float] = {}
    started = time.perf_counter()
    images, labels = _load_digits()
    train_x, train_y = images[:NUM_TRAIN], labels[:NUM_TRAIN]
    test_x, test_y = images[NUM_TRAIN:], labels[NUM_TRAIN:]
    if not 1 <= num_queries <= len(test_x):
        raise DemoArgumentError(f"num_queries must be between 1 and {len(test_x)}, got {num_queries}.")
    if not 1 <= top_k <= len(train_x):
        raise DemoArgumentError(f"top_k must be between 1 and {len(train_x)}, got {top_k}.")
    train_ds = TensorDataset(train_x, train_y)
    query_ds = TensorDataset(test_x[:num_queries], test_y[:num_queries])
    timings["load data"] = time.perf_counter() - started
    print(f"Data: scikit-learn digits, {len(train_x)} training and {len(test_x)} test images "
          f"(8x8 pixels scaled to [0, 1]).")

    started = time.perf_counter()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    _train(model, train_x, train_y)
    with torch.no_grad():
        predictions = model(test_x).argmax(dim=-1)
    accuracy = (predictions == test_y).float().mean().item()
    timings["train model"] = time.perf_counter() - started
    print(f"Model: MLP 64-32-10 (tanh), full-batch Adam for {EPOCHS} epochs; test accuracy {100 * accuracy:.1f}%.")

    task = fninfluence.classification_task()
    started = time.perf_counter()
    factors = fninfluence.fit_factors(model, task, train_ds, strategy=strategy,
                                      batch_size=INFLUENCE_BATCH_SIZE, progress=progress)
    timings["fit factors"] = time.perf_counter() - started

    started = time.perf_counter()
    scores = fninfluence.pairwise_scores(model, task, factors, query_ds, train_ds,
                                         batch_size=INFLUENCE_BATCH_SIZE, progress=progress)
    timings["pairwise scores"] = time.perf_counter() - started
    print(f"Influence: {factors.strategy} curvature fitted on the {len(train_x)} training images, then the "
          f"scores of {num_queries} test image{'s' if num_queries > 1 else ''} against all of them.\n"
          "  score > 0: upweighting the training image raises the query's margin for its true label (it helps);\n"
          "  score < 0: it lowers that margin (it hurts). Scores are not divided by the number of examples.")

    proponents = scores.topk(top_k, dim=1).indices
    opponents = (-scores).topk(top_k, dim=1).indices
    for q in range(num_queries):
        label, predicted = int(test_y[q]), int(predictions[q])
        verdict = "correct" if label == predicted else "WRONG"
        print(f"\nQuery {q}: test image #{NUM_TRAIN + q}, label {label}, predicted {predicted} ({verdict})")
        for title, picked in (("proponents", proponents[q]), ("opponents", opponents[q])):
            print(f"  top {top_k} {title}:")
            for n in picked.tolist():
                print(f"    train #{n:<5d} label {int(train_y[n])}   score {float(scores[q, n]):+.2e}")

    print("\nTime: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in timings.items()))
    return {
        "scores": scores,
        "query_indices": list(range(NUM_TRAIN, NUM_TRAIN + num_queries)),
        "query_labels": test_y[:num_queries].clone(),
        "query_predictions": predictions[:num_queries].clone(),
        "proponents": proponents,
        "opponents": opponents,
        "accuracy": accuracy,
        "timings": timings,
    }
