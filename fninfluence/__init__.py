"""fninfluence: influence functions for PyTorch models, built from pure functions.

The native API::

    factors = fninfluence.fit_factors(model, task, train_data, strategy="ekfac")
    scores = fninfluence.pairwise_scores(model, task, factors, query_data, train_data)   # [Q, N]
    self_influence = fninfluence.self_scores(model, task, factors, train_data)            # [N]
"""

from .curvature import CurvatureEstimator, FitPass, diagonal, ekfac, get_estimator, identity, kfac
from .errors import InfluenceError, InfluenceWarning, Interrupted
from .factors import Factors
from .index import build_index, index_scores
from .memory import estimate_memory
from .pipeline import fit_factors, pairwise_scores, query_gradients, self_scores
from .task import Task, classification_task, task_from_functions
from .version import __version__

__all__ = [
    "Task", "task_from_functions", "classification_task", "fit_factors", "pairwise_scores", "self_scores",
    "query_gradients", "build_index", "index_scores", "Factors", "CurvatureEstimator", "FitPass", "get_estimator",
    "identity", "diagonal", "kfac", "ekfac", "InfluenceError", "InfluenceWarning", "Interrupted", "estimate_memory",
    "__version__",
]
