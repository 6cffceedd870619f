"""Cross-attention from a few queries at explicit positions to a long run of keys (Perceiver AR).

`cross_attention` is softmax attention with the positions made explicit: queries sit at
`q_positions` (Perceiver AR's latents, the last M of N positions), keys at `k_positions` (all N
inputs), a `MaskSpec` decides visibility from the two positions (causal: the latent at p sees
inputs <= p), and an optional `key_valid [batch, n]` drops keys (cross-attention input dropout).
Queries go in blocks; each block reads the keys chunk by chunk, keeping per chunk the unnormalized
output, the row sums and the row maximum, then rescales and sums the chunks (the memory-efficient
attention of Rabe & Staats 2021, as in the Perceiver AR authors' chunked cross-attention). Each
chunk is rematerialized in the backward pass. Time O(M * N); live memory O(block * chunk) per
head, so a long context stays in cache: per-token cost does not grow with N on CPU either.

`LatentCrossAttention` is the layer: queries from the latents, keys and values from the inputs,
the position scheme's rotation and relative bias, grouped-query heads. Its key/value projection is
a separate method so a decoder can cache the projected inputs and add one row per new token.
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lexjax.attention import MaskSpec, RelativeBias
from lexjax.attention.common import NEG_INF, group_query_heads, grouped_bias
from lexjax.layers.basic import ACTIVATION_HEADS, Dtype, dense, with_activation_axes
from lexjax.positions import PositionScheme

DEFAULT_QUERY_BLOCK = 256
DEFAULT_KEY_CHUNK = 512


def _chunk_attention(q, k, v, q_pos, k_pos, k_valid, *, mask: MaskSpec,
                     bias: Optional[RelativeBias]):
    """Heads-first grouped queries `q [b, kv_heads, group, q, d]` (already scaled by
    1/sqrt(d)) at `q_pos [q]` against one key chunk `k, v [b, kv_heads, c, d]` at `k_pos [c]`,
    `k_valid [b, c]` -> `(numerator [b, kv_heads, group, q, d], row sums, row max
    [b, kv_heads, group, q])` in float32: the weights are exp(logit - row max) over the visible
    keys of the chunk."""
    logits = jnp.einsum("bhgqd,bhkd->bhgqk", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + grouped_bias(bias, q_pos[:, None] - k_pos[None, :], k.shape[1])
    visible = mask.allows(q_pos[:, None], k_pos[None, :])[None] & k_valid[:, None, :]
    logits = jnp.where(visible[:, None, None], logits, NEG_INF)
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    # A row with no visible key in this chunk subtracts 0, so its weights are exp(NEG_INF) = 0.
    weights = jnp.exp(logits - jnp.where(row_max > NEG_INF, row_max, 0.0)[..., None])
    numerator = jnp.einsum("bhgqk,bhkd->bhgqd", weights.astype(v.dtype), v,
                           preferred_element_type=jnp.float32)
    return numerator, jnp.sum(weights, axis=-1), row_max


def _combine_chunks(numerators, sums, maxima):
    """Stacked per-chunk results `[chunks, b, kv_heads, group, q, (d)]` -> the normalized output
    `[b, kv_heads, group, q, d]` (zero for a query that sees no key)."""
    scale = jnp.exp(maxima - jnp.max(maxima, axis=0))
    total = jnp.sum(sums * scale, axis=0)[..., None]
    numerator = jnp.sum(numerators * scale[..., None], axis=0)
    return numerator / jnp.where(total > 0, total, 1.0)


def _split(x: jnp.ndarray, size: int, axis: int, pad_value=0) -> jnp.ndarray:
    """Pads `axis` to a multiple of `size` and moves its chunks to a new leading axis."""
    count = -(-x.shape[axis] // size)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, count * size - x.shape[axis])
    x = jnp.pad(x, widths, constant_values=pad_value)
    x = x.reshape(x.shape[:axis] + (count, size) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def cross_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
                    q_positions: jnp.ndarray, k_positions: jnp.ndarray,
                    mask: MaskSpec = MaskSpec(), bias: Optional[RelativeBias] = None,
                    key_valid: Optional[jnp.ndarray] = None,
                    block_size: int = DEFAULT_QUERY_BLOCK,
                    key_chunk_size: int = DEFAULT_KEY_CHUNK) -> jnp.ndarray:
    """Softmax attention of queries at explicit positions over keys at explicit positions.

    Args:
      q: `[batch, m, heads, head_dim]` queries at int32 `q_positions [m]`.
      k, v: `[batch, n, kv_heads, head_dim]` at int32 `k_positions [n]`; `heads % kv_heads == 0`.
      mask: visibility as a function of (query position, key position), e.g. causal.
      bias: relative bias `rel = q_pos - k_pos -> [heads, *rel.shape]`, evaluated per chunk.
      key_valid: optional bool `[batch, n]`, False for keys no query may see.
      block_size: queries per block; key_chunk_size: keys per chunk.
    Returns:
      `[batch, m, heads, head_dim]` in v's dtype; a query that sees no key gets zeros.
    """
    b, m, h, d = q.shape
    n, kv_heads = k.shape[1], k.shape[2]
    block, chunk = min(block_size, m), min(key_chunk_size, n)
    # Heads-first layouts keep both matmuls free of transposes inside the loops.
    q_heads = jnp.transpose(group_query_heads(q * d ** -0.5, kv_heads), (0, 2, 3, 1, 4))
    q_blocks = _split(q_heads, block, axis=3)  # [blocks, b, kv_heads, group, block, d]
    # Padded queries repeat the last position (their rows are dropped); padded keys are invalid.
    q_pos = _split(jnp.pad(q_positions.astype(jnp.int32), (0, -m % block), mode="edge"), block, 0)
    valid = jnp.ones((b, n), bool) if key_valid is None else key_valid.astype(bool)
    chunks = (_split(jnp.swapaxes(k, 1, 2), chunk, 2), _split(jnp.swapaxes(v, 1, 2), chunk, 2),
              _split(k_positions.astype(jnp.int32), chunk, 0), _split(valid, chunk, 1, False))
    one_chunk = jax.checkpoint(functools.partial(_chunk_attention, mask=mask, bias=bias),
                               prevent_cse=False)

    def one_block(args):
        q_block, q_block_pos = args
        parts = jax.lax.map(lambda c: one_chunk(q_block, c[0], c[1], q_block_pos, c[2], c[3]),
                            chunks)
        return _combine_chunks(*parts)

    out = jax.lax.map(one_block, (q_blocks, q_pos))  # [blocks, b, kv, g, block, d]
    out = jnp.transpose(out, (1, 0, 4, 2, 3, 5)).reshape(b, -1, h, v.shape[-1])[:, :m]
    return out.astype(v.dtype)


class LatentCrossAttention(nn.Module):
    """Multi-head (grouped-query) cross-attention from latents to inputs, any position scheme.

    Call `keys_values(inputs)` for the projected, unrotated keys and values of the inputs, then
    `__call__(latents, latent_positions, keys, values, key_positions)`. Rotation is applied at
    attention time from the positions, so cached keys stay valid for every scheme (xPos centres its
    scales on the key positions it is given).

    Attributes:
      features: model width (input and output of the layer).
      position: the scheme template; the layer clones it, so learned biases are per layer.
      mask: visibility by positions (default causal).
      block_size: latents per query block; key_chunk_size: inputs per key chunk.
    """

    features: int
    num_heads: int
    head_dim: int
    position: PositionScheme
    num_kv_heads: Optional[int] = None
    mask: MaskSpec = MaskSpec()
    block_size: int = DEFAULT_QUERY_BLOCK
    key_chunk_size: int = DEFAULT_KEY_CHUNK
    dtype: Dtype = jnp.float32

    def setup(self):
        kv_heads = self.num_kv_heads or self.num_heads
        self.query = dense((self.num_heads, self.head_dim), ("embed", "heads", "kv"),
                           dtype=self.dtype, name="query")
        self.key = dense((kv_heads, self.head_dim), ("embed", "kv_heads", "kv"), dtype=self.dtype,
                         name="key")
        self.value = dense((kv_heads, self.head_dim), ("embed", "kv_heads", "kv"),
                           dtype=self.dtype, name="value")
        self.out = dense(self.features, ("heads", "kv", "embed"), dtype=self.dtype,
                         contract=(-2, -1), name="out")
        self.scheme = self.position.clone()

    def keys_values(self, inputs: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """`inputs [batch, n, features]` -> unrotated keys and values `[batch, n, kv_heads, d]`."""
        return self.key(inputs), self.value(inputs)

    def __call__(self, latents: jnp.ndarray, latent_positions: jnp.ndarray, keys: jnp.ndarray,
                 values: jnp.ndarray, key_positions: jnp.ndarray,
                 key_valid: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        """`latents [batch, m, features]` at int32 `latent_positions [m]`, `keys`/`values` from
        `keys_values` at `key_positions [n]`, optional bool `key_valid [batch, n]`
        -> `[batch, m, features]`."""
        q = self.query(latents)
        q, k = self.scheme.rotate(q, keys, latent_positions, key_positions)
        bias = self.scheme.relative_bias(self.num_heads, self.head_dim)
        q = with_activation_axes(q, ACTIVATION_HEADS)
        out = cross_attention(q, k, values, q_positions=latent_positions,
                              k_positions=key_positions, mask=self.mask, bias=bias,
                              key_valid=key_valid, block_size=self.block_size,
                              key_chunk_size=self.key_chunk_size)
        return self.out(out)
