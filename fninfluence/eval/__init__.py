"""Attribution quality: how well influence scores predict what retraining actually does."""

from .cache import RetrainCache
from .lds import (LDSResult, linear_datamodeling_score, lds_from_measurements, random_subsets, retrain_measurements,
                  spearman, subset_predictions)

__all__ = ["linear_datamodeling_score", "lds_from_measurements", "LDSResult", "random_subsets", "subset_predictions",
           "retrain_measurements", "spearman", "RetrainCache"]
