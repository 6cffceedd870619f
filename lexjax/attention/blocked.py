"""Blocked attention in plain XLA: computes only the (query block, key block) pairs a mask needs.

Local masks (window / chunk / blockwise) cut the sequence into aligned blocks; query block i
attends to key blocks i-before .. i+after (`MaskSpec.key_blocks_around`), all blocks at once, so
memory and time are O(N * span). Full masks take a memory-lean path: a sequential map over query
blocks, each against all keys, rematerialized in the backward pass (O(block * N) live memory);
a sequence of one block is attended directly.
The relative bias (and a content bias, DeBERTa's) is evaluated per block from positions; no
`[N, N]` array exists. Segment ids (packed documents) are cut into the same blocks as the tokens.
Global tokens (`MaskSpec.global_tokens` = G) keep a local mask O(N * (span + G)): every query block
attends in one softmax to the G global keys and to its local span (less the span's keys below G,
already counted), and the G global queries are then attended apart, over all N keys.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lexjax.attention.common import (ContentBias, RelativeBias, Rotation, group_query_heads,
                                     masked_softmax_attention)
from lexjax.attention.masks import MaskSpec
from lexjax.attention.reference import attend_at_positions

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
                      segment_ids: Optional[jnp.ndarray] = None,
                      content_bias: Optional[ContentBias] = None,
                      rotation: Optional[Rotation] = None) -> jnp.ndarray:
    """Self-attention computing only the blocks `mask` needs; same contract as `attend`.

    Args:
      q: `[batch, length, heads, head_dim]`; k, v: `[batch, length, kv_heads, head_dim]`.
      block_size: query/key block length; default `default_block_size(mask)`, clipped to the
        sequence length.
      segment_ids: optional int32 `[batch, length]`: a query sees only keys of its own segment.
      content_bias: optional `ContentBias`, called per block with the block's query and key
        positions (padding positions past the sequence included: clip them when gathering).
      rotation: optional `Rotation` of the un-rotated q and k: under a local mask without
        global tokens, applied to each query block and its key span at positions relative to
        the block's first query (the same for every block); otherwise over the whole sequence.
    """
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"blocked attention is self-attention: query length {q.shape[1]} != "
                         f"key length {k.shape[1]}; use impl='reference' for cross-attention")
    n = q.shape[1]
    block = min(block_size or default_block_size(mask), _round_up(n, 8))
    if rotation is not None and not (mask.is_local and not mask.global_tokens):
        positions = np.arange(n, dtype=np.int32)
        q, k = rotation(q, k, positions, positions)
        rotation = None
    if not mask.is_local:
        return _full_attention(q, k, v, mask=mask, bias=bias, block=block,
                               segment_ids=segment_ids, content_bias=content_bias)
    return _local_attention(q, k, v, mask=mask, bias=bias, block=block, segment_ids=segment_ids,
                            content_bias=content_bias, rotation=rotation)


def _query_blocks(q: jnp.ndarray, kv_heads: int, block: int) -> jnp.ndarray:
    """`[b, n, h, d]` -> grouped, zero-padded query blocks `[b, blocks, block, kv, group, d]`."""
    b, n, h, d = q.shape
    num_blocks = -(-n // block)
    grouped = group_query_heads(_pad_length(q, num_blocks * block), kv_heads)
    return grouped.reshape(b, num_blocks, block, kv_heads, h // kv_heads, d)


def _rotate_blocks(rotation: Rotation, q_blocks: jnp.ndarray, k_spans: jnp.ndarray,
                   before: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Rotates grouped query blocks `[b, blocks, block, kv, group, d]` and their key spans
    `[b, blocks, span_len, kv, d]` at positions relative to each block's first query: queries
    0..block-1, keys from -before * block (numpy constants, the same for every block)."""
    b, blocks, block, kv, group, d = q_blocks.shape
    q_rel = np.arange(block, dtype=np.int32)
    k_rel = np.arange(k_spans.shape[2], dtype=np.int32) - before * block
    q_rotated, k_rotated = rotation(q_blocks.reshape(b, blocks, block, kv * group, d), k_spans,
                                    q_rel, k_rel)
    return q_rotated.reshape(q_blocks.shape), k_rotated


def _local_attention(q, k, v, *, mask, bias, block, segment_ids, content_bias, rotation=None):
    b, n, h, _ = q.shape
    kv_heads = k.shape[2]
    num_blocks = -(-n // block)
    n_pad = num_blocks * block
    before, after = mask.key_blocks_around(block)
    span = before + 1 + after
    num_global = min(mask.global_tokens, n)

    def key_spans(x):  # [b, n, ...] -> [b, blocks, num_global + span * block, ...]
        xb = _pad_length(x, n_pad).reshape((b, num_blocks, block) + x.shape[2:])
        xb = jnp.pad(xb, [(0, 0), (before, after)] + [(0, 0)] * (xb.ndim - 2))
        spans = jnp.stack([xb[:, j:j + num_blocks] for j in range(span)], axis=2)
        spans = spans.reshape((b, num_blocks, span * block) + x.shape[2:])
        return _prepend_global_keys(spans, x[:, :num_global])

    q_pos = jnp.arange(n_pad, dtype=jnp.int32).reshape(num_blocks, block)
    k_pos, k_valid = _key_span_positions(num_blocks, block, before, span, n, num_global)
    segments = {}
    if segment_ids is not None:
        segments = dict(q_segments=_pad_length(segment_ids, n_pad).reshape(b, num_blocks, block),
                        k_segments=key_spans(segment_ids))
    q_blocks, k_spans = _query_blocks(q, kv_heads, block), key_spans(k)
    if rotation is not None:
        q_blocks, k_spans = _rotate_blocks(rotation, q_blocks, k_spans, before)
    out = masked_softmax_attention(q_blocks, k_spans, key_spans(v),
                                   q_pos, k_pos, mask=mask, bias=bias, k_valid=k_valid,
                                   content_bias=content_bias, **segments)
    out = out.reshape(b, n_pad, h, v.shape[-1])[:, :n]
    if not num_global:
        return out
    global_pos = jnp.arange(num_global, dtype=jnp.int32)
    global_out = attend_at_positions(
        q[:, :num_global], k, v, global_pos, jnp.arange(n, dtype=jnp.int32), mask=mask,
        bias=bias, q_segments=None if segment_ids is None else segment_ids[:, :num_global],
        k_segments=segment_ids, content_bias=content_bias)
    return jnp.concatenate([global_out, out[:, num_global:]], axis=1)


def _prepend_global_keys(spans: jnp.ndarray, global_keys: jnp.ndarray) -> jnp.ndarray:
    """Puts the global keys in front of every block's span.

    Args:
      spans: `[batch, blocks, span_len, ...]` per-block key spans.
      global_keys: `[batch, num_global, ...]` (the first positions of the sequence).
    Returns:
      `[batch, blocks, num_global + span_len, ...]`.
    """
    if not global_keys.shape[1]:
        return spans
    shape = spans.shape[:2] + global_keys.shape[1:]
    return jnp.concatenate([jnp.broadcast_to(global_keys[:, None], shape), spans], axis=2)


def _key_span_positions(num_blocks: int, block: int, before: int, span: int, n: int,
                        num_global: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """int32 positions and validity `[blocks, num_global + span * block]` of each query block's
    keys: the global keys 0..num_global-1, then its span (starting `before` blocks back).

    A span key is valid when it is a real position (0 <= pos < n) not already among the global
    keys, so no key is counted twice.
    """
    first_key = (jnp.arange(num_blocks, dtype=jnp.int32) - before) * block
    k_pos = first_key[:, None] + jnp.arange(span * block, dtype=jnp.int32)[None, :]
    k_valid = (k_pos >= num_global) & (k_pos < n)
    global_pos = jnp.broadcast_to(jnp.arange(num_global, dtype=jnp.int32), (num_blocks, num_global))
    return (jnp.concatenate([global_pos, k_pos], axis=1),
            jnp.concatenate([jnp.ones_like(global_pos, dtype=bool), k_valid], axis=1))


def _full_attention(q, k, v, *, mask, bias, block, segment_ids, content_bias):
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
                                        q_segments=q_block_segments, k_segments=segment_ids,
                                        content_bias=content_bias)

    if num_blocks == 1:  # short sequences: one plain block, nothing to rematerialize
        out = one_block(q_blocks[:, 0], q_pos[0],
                        None if q_segments is None else q_segments[:, 0])
        return out.reshape(b, n_pad, h, v.shape[-1])[:, :n]
    blocks = (jnp.moveaxis(q_blocks, 1, 0), q_pos,
              None if q_segments is None else jnp.moveaxis(q_segments, 1, 0))
    out = jax.lax.map(jax.checkpoint(lambda args: one_block(*args)), blocks)  # [blocks, b, ...]
    return jnp.moveaxis(out, 0, 1).reshape(b, n_pad, h, v.shape[-1])[:, :n]
