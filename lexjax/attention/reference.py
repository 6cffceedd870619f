"""Materialized attention: the `[heads, N, N]` logits in full. The truth the other
implementations are tested against; O(N^2) memory."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from lexjax.attention.common import RelativeBias, group_query_heads, masked_softmax_attention
from lexjax.attention.masks import MaskSpec


def reference_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, mask: MaskSpec,
                        bias: Optional[RelativeBias] = None) -> jnp.ndarray:
    """Attention with every logit materialized.

    Args:
      q: `[batch, q_len, heads, head_dim]`.
      k, v: `[batch, kv_len, kv_heads, head_dim]`, `heads % kv_heads == 0`; positions of q and k
        both start at 0 (self-attention).
      mask: which keys each query sees.
      bias: maps relative distance `q_pos - k_pos` (int32, any shape) to additive logits
        `[heads, *shape]`.
    Returns:
      `[batch, q_len, heads, head_dim]` in the dtype of `v`.
    """
    q_pos = jnp.arange(q.shape[1], dtype=jnp.int32)
    k_pos = jnp.arange(k.shape[1], dtype=jnp.int32)
    qg = group_query_heads(q, k.shape[2])  # [b, q, kv_heads, group, d]
    out = masked_softmax_attention(qg, k, v, q_pos, k_pos, mask=mask, bias=bias)
    return out.reshape(q.shape[:3] + (v.shape[-1],))
