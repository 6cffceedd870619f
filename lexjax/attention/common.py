"""Pieces shared by the attention implementations: the relative-bias type, grouped-query
reshapes, and the masked softmax over one span of keys."""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from lexjax.attention.masks import MaskSpec

# Maps relative distance `q_pos - k_pos` (int32, any shape S) to additive logits `[heads, *S]`.
RelativeBias = Callable[[jnp.ndarray], jnp.ndarray]

# Maps query and key positions (int32 `[..., q]`, `[..., k]`) to additive float32 logits
# `[batch, ..., heads, q, k]`: a bias that reads the queries' and keys' content (DeBERTa's
# content-to-position and position-to-content terms), so it is not a function of distance alone.
# Evaluated per block like `RelativeBias`.
ContentBias = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]

# Applies a position scheme's transform to queries `[..., q_len, heads, d]` and keys `[..., k_len,
# kv_heads, d]` at int32 positions `[q_len]`, `[k_len]` (`PositionScheme.rotate`); implementations
# call it where they choose (block by block in the blocked path: `attend(..., rotation=...)`).
Rotation = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray],
                    tuple[jnp.ndarray, jnp.ndarray]]

# Finite "minus infinity": keeps fully masked rows (padding) free of NaNs.
NEG_INF = -1e30


def group_query_heads(q: jnp.ndarray, kv_heads: int) -> jnp.ndarray:
    """`[b, n, heads, d]` -> `[b, n, kv_heads, heads // kv_heads, d]` (grouped-query attention)."""
    b, n, h, d = q.shape
    if h % kv_heads:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({kv_heads})")
    return q.reshape(b, n, kv_heads, h // kv_heads, d)


def grouped_bias(bias: RelativeBias, rel: jnp.ndarray, kv_heads: int) -> jnp.ndarray:
    """Evaluates `bias(rel)` -> `[heads, *S]` and splits heads into `[kv_heads, group, *S]`."""
    values = bias(rel).astype(jnp.float32)
    return values.reshape((kv_heads, values.shape[0] // kv_heads) + rel.shape)


def masked_softmax_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                             q_pos: jnp.ndarray, k_pos: jnp.ndarray, *, mask: MaskSpec,
                             bias: Optional[RelativeBias], k_valid: Optional[jnp.ndarray] = None,
                             q_segments: Optional[jnp.ndarray] = None,
                             k_segments: Optional[jnp.ndarray] = None,
                             content_bias: Optional[ContentBias] = None) -> jnp.ndarray:
    """Softmax attention of grouped queries over one span of keys, logits in float32.

    Computed head-major (`[..., kv_heads, (group,) q, k]` logits), with the group axis dropped
    when it is 1 (plain multi-head attention): the two products are then batched matrix
    products over contiguous `[q, d]` / `[k, d]` tiles, which XLA:CPU runs without the layout
    copies a singleton axis between heads and positions costs (about 30% of attention's forward
    and backward time, see experiments/train_efficiency.py).

    Args:
      q: `[..., q_len, kv_heads, group, d]` grouped queries.
      k, v: `[..., k_len, kv_heads, d]`.
      q_pos: `[..., q_len]` int32 positions; k_pos: `[..., k_len]`.
      k_valid: optional `[..., k_len]` bool, False for padding keys.
      q_segments, k_segments: optional int32 `[..., q_len]`, `[..., k_len]` segment ids (packed
        documents): a query sees only keys of its own segment. Both or neither.
      content_bias: optional `ContentBias`, called with `q_pos` and `k_pos`; its `[batch, ...,
        heads, q, k]` logits are added to the scores.
    Returns:
      `[..., q_len, kv_heads, group, d]`.
    """
    group = q.shape[-2]
    heads = "h" if group == 1 else "hg"
    q_heads = (jnp.moveaxis(q[..., 0, :], -3, -2) if group == 1   # [..., h, q, d]
               else jnp.moveaxis(q, -4, -2))                       # [..., h, g, q, d]
    k_heads, v_heads = jnp.moveaxis(k, -3, -2), jnp.moveaxis(v, -3, -2)  # [..., h, k, d]
    logits = jnp.einsum(f"...{heads}qd,...hkd->...{heads}qk", q_heads, k_heads,
                        preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    rel = q_pos[..., :, None] - k_pos[..., None, :]  # [..., q, k]
    if bias is not None:
        b = grouped_bias(bias, rel, k.shape[-2])  # [h, g, ..., q, k]
        b = b[:, 0] if group == 1 else b
        logits = logits + jnp.moveaxis(b, tuple(range(len(heads))),
                                       tuple(range(-2 - len(heads), -2)))
    if content_bias is not None:
        extra = content_bias(q_pos, k_pos).astype(jnp.float32)  # [..., heads, q, k]
        if group > 1:
            extra = extra.reshape(extra.shape[:-3] + (k.shape[-2], group) + extra.shape[-2:])
        logits = logits + extra
    visible = mask.allows(q_pos[..., :, None], k_pos[..., None, :])
    if k_valid is not None:
        visible = visible & k_valid[..., None, :]
    if (q_segments is None) != (k_segments is None):
        raise ValueError("pass both q_segments and k_segments, or neither")
    if q_segments is not None:
        visible = visible & (q_segments[..., :, None] == k_segments[..., None, :])
    visible = visible.reshape(visible.shape[:-2] + (1,) * len(heads) + visible.shape[-2:])
    logits = jnp.where(visible, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(f"...{heads}qk,...hkd->...{heads}qd", probs.astype(v.dtype), v_heads,
                     preferred_element_type=jnp.float32)  # [..., h, (g,) q, d]
    out = (jnp.moveaxis(out, -2, -3)[..., None, :] if group == 1
           else jnp.moveaxis(out, -2, -4))
    return out.astype(v.dtype)
