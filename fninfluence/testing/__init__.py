"""Testing toolkit: oracles for checking influence computations exactly, and a property suite for estimators.

Importing this package needs only torch. :mod:`fninfluence.testing.strategies` (hypothesis strategies for
random small models and data sets) needs ``hypothesis``, which is in the ``test`` extra.
"""

from .checks import (CHECKS, DAMPING_DECADES, Case, CheckResult, EstimatorCheckError, SummedCrossEntropy,
                     check_estimator, damping_law_distances, relative_error, standard_cases)
from .oracles import (dense_fisher, dense_ggn, dense_influence, exact_ggn_influence, flat_gradients, layer_gradients,
                      per_example_gradients, ridge_influence, ridge_leave_one_out, ridge_leverages, ridge_solution)

__all__ = [
    "per_example_gradients", "layer_gradients", "flat_gradients", "dense_fisher", "dense_influence", "dense_ggn",
    "exact_ggn_influence", "ridge_solution", "ridge_leverages", "ridge_influence", "ridge_leave_one_out",
    "check_estimator", "standard_cases", "Case", "CheckResult", "EstimatorCheckError", "CHECKS",
    "SummedCrossEntropy", "relative_error", "damping_law_distances", "DAMPING_DECADES",
]
