"""The tap: hook-free capture of layer inputs and output gradients (see :mod:`.tap`)."""

from .engine import ModelTap, batch_examples, check_finite, unfused
from .layers import SUPPORTED_MODULES, LayerSpec, Target, resolve_targets
from .ops import weight_as_matrix
from .tap import Tap, TrackedWeight

__all__ = [
    "ModelTap", "batch_examples", "check_finite", "unfused", "SUPPORTED_MODULES", "LayerSpec", "Target", "resolve_targets",
    "Tap", "TrackedWeight", "weight_as_matrix",
]
