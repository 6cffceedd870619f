"""Blocked attention in plain XLA: computes only the (query block, key block) pairs a mask needs.

Local masks (window / chunk / blockwise) cut the sequence into aligned blocks; query block i
attends to key blocks i-before .. i+after (`MaskSpec.key_blocks_around`), all blocks at once, so
memory and time are O(N * span). Full masks take a memory-lean path: a sequential map over query
blocks, each against all keys, rematerialized in the backward pass (O(block * N) live memory);
a sequence of one block is attended directly.
The relative bias is evaluated per block from positions; no `[N, N]` array exists. Segment ids
(packed documents) are cut into the same blocks as the tokens.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from lexjax.attention.common import RelativeBias, group_query_heads, masked_softmax_attention
from lexjax.attention.masks import MaskSpec

FULL_MASK_QUERY_BLOCK = 512


def default_block_size(mask: MaskSpec) -> int:
    """The block that makes a local mask's key span tight: its window, chunk or BCA block."""
    if mask.window is not None:
        return min(mask.window, 512)
    if mask.chunk is not None:
        return mask.chunk
    if mask.blockwise is not None:
        return mask.blockwise
    return FULL_MASK_QUERY_BLOCK


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _pad_length(x: jnp.ndarray, length: int, value=0) -> jnp.ndarray:
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2),
                   constant_values=value)


def blocked_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, mask: MaskSpec,
                      bias: Optional[RelativeBias] = None, block_size: Optional[int] = None,
                      segment_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Self-attention computing only the blocks `mask` needs; same contract as `attend`.

    Args:
      q: `[batch, length, heads, head_dim]`; k, v: `[batch, length, kv_heads, head_dim]`.
      block_size: query/key block length; default `default_block_size(mask)`, clipped to the
        sequence length.
      segment_ids: optional int32 `[batch, length]`: a query sees only keys of its own segment.
    """
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"blocked attention is self-attention: query length {q.shape[1]} != "
                         f"key length {k.shape[1]}; use impl='reference' for cross-attention")
    n = q.shape[1]
    block = min(block_size or default_block_size(mask), _round_up(n, 8))
    attention = _local_attention if mask.is_local else _full_attention
    return attention(q, k, v, mask=mask, bias=bias, block=block, segment_ids=segment_ids)


def _query_blocks(q: jnp.ndarray, kv_heads: int, block: int) -> jnp.ndarray:
    """`[b, n, h, d]` -> grouped, zero-padded query blocks `[b, blocks, block, kv, group, d]`."""
    b, n, h, d = q.shape
    num_blocks = -(-n // block)
    grouped = group_query_heads(_pad_length(q, num_blocks * block), kv_heads)
    return grouped.reshape(b, num_blocks, block, kv_heads, h // kv_heads, d)


def _local_attention(q, k, v, *, mask, bias, block, segment_ids):
    b, n, h, _ = q.shape
    kv_heads = k.shape[2]
    num_blocks = -(-n // block)
    n_pad = num_blocks * block
    before, after = mask.key_blocks_around(block)
    span = before + 1 + after

    def key_spans(x):  # [b, n, ...] -> [b, blocks, span * block, ...]
        xb = _pad_length(x, n_pad).reshape((b, num_blocks, block) + x.shape[2:])
        xb = jnp.pad(xb, [(0, 0), (before, after)] + [(0, 0)] * (xb.ndim - 2))
        spans = jnp.stack([xb[:, j:j + num_blocks] for j in range(span)], axis=2)
        return spans.reshape((b, num_blocks, span * block) + x.shape[2:])

    q_pos = jnp.arange(n_pad, dtype=jnp.int32).reshape(num_blocks, block)
    first_key = (jnp.arange(num_blocks, dtype=jnp.int32) - before) * block
    k_pos = first_key[:, None] + jnp.arange(span * block, dtype=jnp.int32)[None, :]
    k_valid = (k_pos >= 0) & (k_pos < n)
    segments = {}
    if segment_ids is not None:
        segments = dict(q_segments=_pad_length(segment_ids, n_pad).reshape(b, num_blocks, block),
                        k_segments=key_spans(segment_ids))
    out = masked_softmax_attention(_query_blocks(q, kv_heads, block), key_spans(k), key_spans(v),
                                   q_pos, k_pos, mask=mask, bias=bias, k_valid=k_valid,
                                   **segments)
    return out.reshape(b, n_pad, h, v.shape[-1])[:, :n]


def _full_attention(q, k, v, *, mask, bias, block, segment_ids):
    b, n, h, _ = q.shape
    num_blocks = -(-n // block)
    n_pad = num_blocks * block
    q_blocks = _query_blocks(q, k.shape[2], block)
    q_pos = jnp.arange(n_pad, dtype=jnp.int32).reshape(num_blocks, block)
    k_pos = jnp.arange(n, dtype=jnp.int32)
    q_segments = (None if segment_ids is None
                  else _pad_length(segment_ids, n_pad).reshape(b, num_blocks, block))

    def one_block(q_block, q_block_pos, q_block_segments):
        return masked_softmax_attention(q_block, k, v, q_block_pos, k_pos, mask=mask, bias=bias,
                                        q_segments=q_block_segments, k_segments=segment_ids)

    if num_blocks == 1:  # short sequences: one plain block, nothing to rematerialize
        out = one_block(q_blocks[:, 0], q_pos[0],
                        None if q_segments is None else q_segments[:, 0])
        return out.reshape(b, n_pad, h, v.shape[-1])[:, :n]
    blocks = (jnp.moveaxis(q_blocks, 1, 0), q_pos,
              None if q_segments is None else jnp.moveaxis(q_segments, 1, 0))
    out = jax.lax.map(jax.checkpoint(lambda args: one_block(*args)), blocks)  # [blocks, b, ...]
    return jnp.moveaxis(out, 0, 1).reshape(b, n_pad, h, v.shape[-1])[:, :n]
