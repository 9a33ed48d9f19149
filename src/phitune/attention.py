"""Attention for training on a CPU: in bf16, plain matmuls and a softmax for short rows; PyTorch's
SDPA for long rows and for float32.

PyTorch's CPU flash-attention kernel is slow in bf16 on the short rows of most fine-tuning data
(dictionary pairs, classification, short chat turns): two batched matmuls with a masked softmax
between them are several times faster forward and backward there. Their cost and memory grow with the
square of the length, so past `SHORT_KEYS` keys SDPA runs instead; in float32 SDPA is the faster
at every length. Both measured in benchmarks/results/attention_choice.md.

Registered with transformers' attention and mask registries under `NAME`: the model's own
attention module calls it exactly where it would call SDPA, with SDPA's boolean masks (padding,
causal, sliding windows, packed sequences). Grouped-query attention is computed without repeating
keys and values: the query heads of one key/value head are stacked into one matrix.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "phitune_cpu"
SHORT_KEYS = 160
MATMUL_DTYPES = (torch.bfloat16, torch.float16)


def short_rows_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (batch, heads, q, dim), key and value
    (batch, kv_heads, k, dim); the output is (batch, q, heads, dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, k_len = query.shape[2], key.shape[2]
    device = query.device.type
    # Under autocast the projections may hand over float32 (LoRA updates kept in float32): the
    # matmuls run in autocast's dtype all the same.
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    if (
        k_len > SHORT_KEYS
        or q_len == 1
        or device != "cpu"
        or compute not in MATMUL_DTYPES
        or position_bias is not None
        or kwargs.get("softcap") is not None
        or (attention_mask is not None and attention_mask.dtype != torch.bool)
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, position_bias, **kwargs
        )
    query, key, value = query.to(compute), key.to(compute), value.to(compute)
    return _matmul_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal), None


def _matmul_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    is_causal: bool | None,
) -> torch.Tensor:
    """Two batched matmuls and a float32 softmax, every key/value head read once; (batch, q, heads, dim)."""
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal:
            attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
            attention_mask = attention_mask[None, None]
    # (batch, kv_heads, group * q, dim) @ (batch, kv_heads, dim, k): each key/value head once.
    scores = (query.reshape(batch, kv_heads, group * q_len, dim) @ key.transpose(-1, -2)).view(
        batch, kv_heads, group, q_len, k_len
    )
    # The softmax in float32, as transformers' eager attention computes it. Masked scores get the
    # lowest finite value, not -inf: a fully masked row (a padding query) stays finite.
    scores = scores.float().mul_(scale)
    if attention_mask is not None:
        mask = attention_mask.reshape(attention_mask.shape[0], -1, 1, q_len, k_len)  # batch, 1 or heads, ...
        if mask.shape[1] == heads and heads != kv_heads:
            mask = mask.reshape(mask.shape[0], kv_heads, group, q_len, k_len)
        scores = scores.masked_fill_(~mask, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    if dropout > 0 and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    out = probs.view(batch, kv_heads, group * q_len, k_len) @ value
    return out.view(batch, heads, q_len, dim).transpose(1, 2).contiguous()


def register() -> str:
    """Make `NAME` an attention implementation transformers models accept; returns it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, short_rows_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


def use_where_sdpa(model: Any) -> None:
    """Switch a model that transformers gave SDPA, and that takes registered attention functions,
    to this one (training on a CPU)."""
    if model.config._attn_implementation == "sdpa" and model.is_backend_compatible():
        model.set_attn_implementation(register())
