"""Linear Datamodeling Score of every strategy on scikit-learn's digits.

Trains a small MLP on 500 digits, computes influence scores of the training images on 50 test images with
identity, diagonal, KFAC and EKFAC curvature, then retrains the MLP on 100 random halves of the training set
and reports how well each strategy's scores rank those retrained models' query measurements (the LDS).

    python docs/examples/lds_digits.py [--subsets 100] [--cache lds-cache]

Retraining is deterministic (full-batch Adam from one fixed initialisation), so the retrained measurements are
a function of the subset alone; they are cached in ``--cache`` and shared by all strategies and reruns.
Takes about a minute on a laptop CPU the first time, seconds afterwards.
"""

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import fninfluence as fi
from fninfluence.eval import linear_datamodeling_score

TRAIN, QUERIES, STEPS, WEIGHT_DECAY = 500, 50, 400, 1e-3


def digits():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:TRAIN], order[TRAIN:TRAIN + QUERIES]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def train(data: TensorDataset, indices: torch.Tensor) -> nn.Module:
    """Full-batch Adam on ``data[indices]`` from the same initialisation every time: mean cross-entropy + L2."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    x, y = data.tensors[0][indices], data.tensors[1][indices]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + WEIGHT_DECAY * sum(p.square().sum() for p in model.parameters())
        loss.backward()
        optimizer.step()
    return model.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--cache", default="lds-cache")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matrices: threads cost more than they give

    train_data, query_data = digits()
    model = train(train_data, torch.arange(TRAIN))
    task = fi.classification_task()  # measurement: minus the query's margin

    def retrain(indices):
        return train(train_data, indices)

    print(f"{'strategy':<10} LDS (mean ± standard error over {QUERIES} queries, {args.subsets} subsets)")
    for strategy in ("identity", "diagonal", "kfac", "ekfac"):
        torch.manual_seed(0)  # with use_empirical_fisher=False the same label draws whether or not retraining ran
        factors = fi.fit_factors(model, task, train_data, strategy=strategy, batch_size=100, progress=False)
        scores = fi.pairwise_scores(model, task, factors, query_data, train_data, batch_size=100, progress=False)
        result = linear_datamodeling_score(scores, retrain, num_subsets=args.subsets, task=task, query_data=query_data,
                                           cache_dir=args.cache, cache_key=f"digits-mlp32-adam{STEPS}-wd{WEIGHT_DECAY}")
        print(f"{strategy:<10} {result.mean:.3f} ± {result.stderr:.3f}")


if __name__ == "__main__":
    main()
