"""``nn.MultiheadAttention`` seen from inside.

``F.multi_head_attention_forward`` reaches the tap as one call, so its projections would be invisible.
When one of its weights is tracked, the tap runs :func:`attention_forward` instead: the same
computation written with ``F.linear`` calls, batch first, so the fused input projection
(``in_proj_weight``, one ``[3E, E]`` matrix applied to the input) and ``out_proj`` are tapped like any
linear layer. The fused input projection is trackable for self-attention (query, key and value are the
same tensor); with distinct inputs its three row blocks see different inputs and it cannot be one layer.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import InfluenceError

NAMES = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
         "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training", "key_padding_mask",
         "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
         "static_k", "static_v", "average_attn_weights", "is_causal")
DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
            "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None, "v_proj_weight": None,
            "static_k": None, "static_v": None, "average_attn_weights": True, "is_causal": False}


def bind(args: tuple, kwargs: dict) -> Dict[str, Any]:
    bound = dict(DEFAULTS)
    bound.update(zip(NAMES, args))
    bound.update(kwargs)
    return bound


def _additive_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def attention_forward(layer: str, a: Dict[str, Any], in_proj_tracked: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``F.multi_head_attention_forward`` with its projections as batch-first ``F.linear`` calls."""
    for unsupported in ("bias_k", "bias_v", "static_k", "static_v"):
        if a[unsupported] is not None:
            raise InfluenceError(f"{layer}: nn.MultiheadAttention with {unsupported} is not supported by the tap.")
    if a["add_zero_attn"]:
        raise InfluenceError(f"{layer}: nn.MultiheadAttention with add_zero_attn=True is not supported by the tap.")
    query, key, value = a["query"], a["key"], a["value"]
    if query.dim() != 3:
        raise InfluenceError(f"{layer}: unbatched inputs to nn.MultiheadAttention have no batch dimension to tap.")
    heads = a["num_heads"]
    x_q, x_k, x_v = (t.transpose(0, 1) for t in (query, key, value))  # [L, N, E] -> [N, L, E]
    embed = x_q.shape[-1]
    if not a["use_separate_proj_weight"]:
        if query is key and key is value:
            q, k, v = F.linear(x_q, a["in_proj_weight"], a["in_proj_bias"]).chunk(3, dim=-1)
        elif in_proj_tracked:
            raise InfluenceError(
                f"{layer}: the fused input projection of nn.MultiheadAttention is trackable for self-attention only "
                "(query, key and value the same tensor). Track only its out_proj for cross-attention."
            )
        else:
            bias = a["in_proj_bias"]
            biases = (None, None, None) if bias is None else bias.chunk(3)
            weights = a["in_proj_weight"].chunk(3)
            q, k, v = (F.linear(x, w, b) for x, w, b in zip((x_q, x_k, x_v), weights, biases))
    else:
        bias = a["in_proj_bias"]
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
        q = F.linear(x_q, a["q_proj_weight"], b_q)
        k = F.linear(x_k, a["k_proj_weight"], b_k)
        v = F.linear(x_v, a["v_proj_weight"], b_v)
    n, target, source = x_q.shape[0], x_q.shape[1], x_k.shape[1]
    split = lambda t, length: t.reshape(n, length, heads, -1).transpose(1, 2)  # [N, H, L, d]
    q, k, v = split(q, target), split(k, source), split(v, source)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    attn_mask = _additive_mask(a["attn_mask"], logits.dtype)
    if attn_mask is None and a["is_causal"]:
        attn_mask = _additive_mask(torch.ones(target, source, dtype=torch.bool, device=q.device).triu(1), logits.dtype)
    if attn_mask is not None:
        logits = logits + (attn_mask.reshape(n, heads, target, source) if attn_mask.dim() == 3 else attn_mask)
    padding = _additive_mask(a["key_padding_mask"], logits.dtype)
    if padding is not None:
        logits = logits + padding[:, None, None, :]
    weights = logits.softmax(-1)
    if a["training"] and a["dropout_p"] > 0:
        weights = F.dropout(weights, p=a["dropout_p"])
    out = (weights @ v).transpose(1, 2).reshape(n, target, embed)
    out = F.linear(out, a["out_proj_weight"], a["out_proj_bias"]).transpose(0, 1)  # back to [L, N, E]
    if not a["need_weights"]:
        return out, None
    return out, weights.mean(1) if a["average_attn_weights"] else weights
