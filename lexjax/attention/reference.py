"""Materialized attention: every logit in full. `reference_attention` (self-attention, positions
0..N-1) is the truth the other implementations are tested against; `attend_at_positions` is the
same computation for queries and keys at explicit positions (decoding against a cache, the
Block-Recurrent Transformer's spans). O(q_len * k_len) memory."""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from lexjax.attention.common import (ContentBias, RelativeBias, group_query_heads,
                                     masked_softmax_attention)
from lexjax.attention.masks import MaskSpec


def attend_at_positions(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, q_pos: jnp.ndarray,
                        k_pos: jnp.ndarray, *, mask: MaskSpec,
                        bias: Optional[RelativeBias] = None,
                        k_valid: Optional[jnp.ndarray] = None,
                        q_segments: Optional[jnp.ndarray] = None,
                        k_segments: Optional[jnp.ndarray] = None,
                        content_bias: Optional[ContentBias] = None) -> jnp.ndarray:
    """Softmax attention of queries at `q_pos` over keys at `k_pos`, logits in float32.

    Args:
      q: `[..., q_len, heads, head_dim]`; k, v: `[..., k_len, kv_heads, head_dim]` (same leading
        dims), `heads % kv_heads == 0`.
      q_pos, k_pos: int32 `[q_len]`, `[k_len]` positions for the mask and the relative bias.
      mask: which keys each query sees, by position.
      bias: maps `q_pos - k_pos` (int32, any shape) to additive logits `[heads, *shape]`.
      k_valid: optional bool `[..., k_len]` (broadcastable), False for keys no query may see.
      q_segments, k_segments: optional int32 `[..., q_len]`, `[..., k_len]`: a query sees only
        keys of its own segment.
      content_bias: optional `ContentBias` of `(q_pos, k_pos)` (logits `[batch, heads, q, k]`).
    Returns:
      `[..., q_len, heads, head_dim]` in the dtype of `v`.
    """
    grouped = group_query_heads(q.reshape((-1,) + q.shape[-3:]), k.shape[-2])
    grouped = grouped.reshape(q.shape[:-2] + grouped.shape[-3:])
    out = masked_softmax_attention(grouped, k, v, q_pos, k_pos, mask=mask, bias=bias,
                                   k_valid=k_valid, q_segments=q_segments,
                                   k_segments=k_segments, content_bias=content_bias)
    return out.reshape(q.shape[:-1] + (v.shape[-1],))


def reference_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, mask: MaskSpec,
                        bias: Optional[RelativeBias] = None,
                        segment_ids: Optional[jnp.ndarray] = None,
                        content_bias: Optional[ContentBias] = None) -> jnp.ndarray:
    """Self-attention with every logit materialized.

    Args:
      q: `[batch, length, heads, head_dim]`.
      k, v: `[batch, length, kv_heads, head_dim]`, `heads % kv_heads == 0`; positions of q and k
        both run 0..length-1.
      mask: which keys each query sees.
      bias: maps relative distance `q_pos - k_pos` (int32, any shape) to additive logits
        `[heads, *shape]`.
      segment_ids: optional int32 `[batch, length]`: a query sees only keys of its own segment.
      content_bias: optional `ContentBias` (logits `[batch, heads, length, length]`).
    Returns:
      `[batch, length, heads, head_dim]` in the dtype of `v`.
    """
    q_pos = jnp.arange(q.shape[1], dtype=jnp.int32)
    k_pos = jnp.arange(k.shape[1], dtype=jnp.int32)
    return attend_at_positions(q, k, v, q_pos, k_pos, mask=mask, bias=bias,
                               q_segments=segment_ids, k_segments=segment_ids,
                               content_bias=content_bias)
