"""Per-token scores: which layers keep their tokens, and the one token count the others spread over."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..capture import LayerSpec, ModelTap
from ..core.scores import spread_to_tokens
from ..errors import InfluenceError
from .data import Data
from .slices import first_batch

PerLayer = Dict[str, torch.Tensor]
CONV_OPS = ("conv1d", "conv2d")


def has_tokens(spec: LayerSpec, conv_tokens: bool) -> bool:
    """Whether a layer's per-token scores keep its tokens: a conv layer's output positions count as tokens
    only with ``conv_tokens`` (else, as in Kronfluence, its scores are summed over them)."""
    return conv_tokens or spec.op not in CONV_OPS


def _token_count_error(lengths) -> InfluenceError:
    return InfluenceError(
        f"Per-token scores need one token count across layers, but the tracked layers have {sorted(lengths)} "
        "tokens (or output positions) per example. Track layers that share a sequence length, or pass "
        "conv_tokens=False (conv layers then give one score per example, summed over their positions, as in "
        "Kronfluence), or use per_module=True with per_token=False."
    )


def token_count(tap: ModelTap, train_data: Data, batch_size, conv_tokens: bool) -> int:
    """The one token count T of per-token scores (1 when no layer has tokens), or an error naming the counts."""
    first = first_batch(train_data, batch_size, tap.device, "train_data")
    lengths = {count for layer, count in tap.tokens_per_call("train", first).items()
               if count != 1 and has_tokens(tap.specs[layer], conv_tokens)}
    if len(lengths) > 1:
        raise _token_count_error(lengths)
    return lengths.pop() if lengths else 1


def align_tokens(per_layer: PerLayer, tokens: Optional[int] = None) -> PerLayer:
    """Layers without a token dimension (T = 1) spread their scores evenly over the ``tokens`` of the model
    (by default, those of the other layers here)."""
    lengths = {v.shape[-1] for v in per_layer.values() if v.shape[-1] != 1} | ({tokens} - {None, 1})
    if len(lengths) > 1:
        raise _token_count_error(lengths)
    if not lengths:
        return per_layer
    tokens = lengths.pop()
    return {layer: spread_to_tokens(v[..., 0], tokens) if v.shape[-1] == 1 else v for layer, v in per_layer.items()}
