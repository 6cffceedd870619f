"""The attention cores of the gated attention unit (Hua et al. 2022, "Transformer Quality in
Linear Time"): squared-ReLU scores over one shared low-dimensional query/key space.

- `quadratic_attention` (FLASH-Quad): `A = relu²(Q Kᵀ / T + b)` over all visible keys, `A V`.
- `mixed_chunk_attention` (FLASH): chunks of `C` tokens; exact quadratic attention inside each
  chunk, `relu²(Q_quad K_quadᵀ / C + b)`, plus linear attention across chunks,
  `Q_lin · Σ_h K_lin,hᵀ V_h / C` over the earlier chunks h < g (causal: an exclusive cumulative
  sum of per-chunk states) or over all chunks (bidirectional). Time and memory O(N·C).
- `mixed_chunk_decode_step`: one causal step of the same formula from a cache holding the state of
  the completed chunks and the current chunk's keys and values: O(C) per token.

Scaling ("the 1/T scaling done right", a known pitfall of re-implementations):
- mixed chunk: both parts divide by the chunk size C (the paper's pseudocode: `qk / c` in the
  kernel, `lin_kv / c`), a constant, so outputs never depend on the padded or total length;
- quadratic: the paper divides by T, its fixed (padded) training length: `length=T`, a
  constant, so outputs never depend on the row's length, packing or decoding. With
  `length=None`, T is the number of keys a query sees: row t of a causal layer divides by
  t + 1, a bidirectional one by N (Mega's `element_attention`; the scores then keep their scale
  at any length).

The quadratic form also takes Mega's other element-wise attention functions
(`ELEMENTWISE_ATTENTION`: "relu2", and "laplace" = `0.5 (1 + erf((x − μ) / (σ √2)))`, μ = √½,
σ = √(1/4π), the reference's stabler stand-in for relu², Ma et al. 2023 App. C.1).

Shapes: queries/keys `[batch, length, s]`, values `[batch, length, e]` (one head). Scores, the
squared ReLU and every state are float32; outputs come back in v's dtype. Relative biases are
callables `rel [*S] -> [1, *S]` (the zoo's `PositionScheme.relative_bias(1, s)`), added inside
the squared ReLU as the paper's `b`.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import jax.scipy.special

from lexjax.attention import RelativeBias
from lexjax.layers.mlp import squared_relu


LAPLACE_MU = math.sqrt(0.5)
LAPLACE_SIGMA = math.sqrt(1.0 / (4.0 * math.pi))


def laplace_attention(x: jnp.ndarray) -> jnp.ndarray:
    """Mega's Laplace attention function `0.5 (1 + erf((x − μ) / (σ √2)))`: relu²'s value and
    slope at x = μ, bounded in (0, 1)."""
    return 0.5 * (1.0 + jax.scipy.special.erf((x - LAPLACE_MU) / (LAPLACE_SIGMA * math.sqrt(2.0))))


# Element-wise attention functions f of `f(q kᵀ / T + b) v` (Mega's `attention_activation`).
ELEMENTWISE_ATTENTION: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "relu2": squared_relu,
    "laplace": laplace_attention,
}


def _with_bias(scores: jnp.ndarray, bias: Optional[RelativeBias], rel: jnp.ndarray) -> jnp.ndarray:
    """Adds `bias(rel)[0]` (one head) to float32 scores broadcastable against `rel`."""
    if bias is None:
        return scores
    return scores + bias(rel)[0].astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# FLASH-Quad: the GAU over all keys
# ----------------------------------------------------------------------------------------------

def quadratic_attention_at(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, q_pos: jnp.ndarray,
                           k_pos: jnp.ndarray, *, causal: bool, bias: Optional[RelativeBias],
                           k_valid: Optional[jnp.ndarray] = None,
                           q_segments: Optional[jnp.ndarray] = None,
                           k_segments: Optional[jnp.ndarray] = None,
                           length: Optional[int] = None,
                           function: Callable[[jnp.ndarray], jnp.ndarray] = squared_relu,
                           chunk: Optional[int] = None) -> jnp.ndarray:
    """Queries `[b, m, s]` at positions `q_pos [m]` against keys `[b, n, s]` at `k_pos [n]`,
    values `[b, n, e]` -> float32 `[b, m, e]`. A query sees the keys not in its future (causal),
    valid (`k_valid [n]`), of its own segment (`q_segments [b, m]`, `k_segments [b, n]`) and,
    given `chunk`, of its own chunk of that many positions (Mega-chunk); T is `length`, or (None)
    how many keys it sees (t + 1 causal, n bidirectional); `function` is the element-wise
    attention function (relu²)."""
    rel = q_pos[:, None] - k_pos[None, :]
    visible = rel >= 0 if causal else jnp.ones(rel.shape, bool)
    if chunk is not None:
        visible = visible & (q_pos[:, None] // chunk == k_pos[None, :] // chunk)
    if k_valid is not None:
        visible = visible & k_valid[None, :]
    if q_segments is not None:
        visible = visible & (q_segments[:, :, None] == k_segments[:, None, :])
    if length is None:
        normalizer = jnp.maximum(jnp.sum(visible, axis=-1, dtype=jnp.float32), 1.0)[..., None]
    else:
        normalizer = jnp.float32(length)
    scores = jnp.einsum("bis,bjs->bij", q, k, preferred_element_type=jnp.float32)
    kernel = function(_with_bias(scores / normalizer, bias, rel))
    kernel = jnp.where(visible, kernel, 0.0)
    return jnp.einsum("bij,bje->bie", kernel, v.astype(jnp.float32),
                      preferred_element_type=jnp.float32)


def quadratic_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, causal: bool,
                        bias: Optional[RelativeBias] = None, block_size: Optional[int] = None,
                        segment_ids: Optional[jnp.ndarray] = None,
                        length: Optional[int] = None,
                        function: Callable[[jnp.ndarray], jnp.ndarray] = squared_relu
                        ) -> jnp.ndarray:
    """The GAU's full attention `relu²(q kᵀ / T + b) v` (or another element-wise `function`).

    Args:
      q, k: `[batch, length, s]` (already transformed by the position scheme's rotation).
      v: `[batch, length, e]`.
      causal: key <= query only, else all keys.
      bias: optional relative bias callable (one head).
      block_size: if set and shorter than the sequence, queries are processed in blocks of this
        many (a rematerialized map), so memory is O(block_size · length) instead of O(length²).
      segment_ids: optional int32 `[batch, length]` (packed documents): a query sees (and a
        counted T counts) the keys of its own segment only.
      length: T, a constant (the paper: its training length), or None: the keys visible to
        the query (t + 1 causal, the sequence length bidirectional).
      function: the element-wise attention function (default relu²; `ELEMENTWISE_ATTENTION`).
    Returns:
      `[batch, length, e]` in v's dtype.
    """
    b, n, _ = q.shape
    positions = jnp.arange(n, dtype=jnp.int32)
    if block_size is None or block_size >= n:
        out = quadratic_attention_at(q, k, v, positions, positions, causal=causal, bias=bias,
                                     q_segments=segment_ids, k_segments=segment_ids,
                                     length=length, function=function)
        return out.astype(v.dtype)
    blocks = -(-n // block_size)
    pad = blocks * block_size - n

    def to_blocks(x):  # [b, n, ...] -> [blocks, b, block, ...], zero-padded
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((b, blocks, block_size) + x.shape[2:]), 1, 0)

    starts = jnp.arange(blocks, dtype=jnp.int32) * block_size
    q_segments = None if segment_ids is None else to_blocks(segment_ids)

    @jax.checkpoint
    def one_block(args):
        q_block, start, q_block_segments = args
        pos = start + jnp.arange(block_size, dtype=jnp.int32)
        return quadratic_attention_at(q_block, k, v, pos, positions, causal=causal, bias=bias,
                                      q_segments=q_block_segments, k_segments=segment_ids,
                                      length=length, function=function)

    out = jax.lax.map(one_block, (to_blocks(q), starts, q_segments))  # [blocks, b, block, e]
    out = jnp.moveaxis(out, 0, 1).reshape(b, blocks * block_size, -1)[:, :n]
    return out.astype(v.dtype)


# ----------------------------------------------------------------------------------------------
# FLASH: mixed chunk attention
# ----------------------------------------------------------------------------------------------

def _to_chunks(x: jnp.ndarray, chunk_size: int) -> jnp.ndarray:
    """`[b, n, f]` -> `[b, g, chunk_size, f]`, zero-padded to g = ceil(n / chunk_size) chunks."""
    b, n, f = x.shape
    g = -(-n // chunk_size)
    x = jnp.pad(x, [(0, 0), (0, g * chunk_size - n), (0, 0)])
    return x.reshape(b, g, chunk_size, f)


def mixed_chunk_attention(q_quad: jnp.ndarray, k_quad: jnp.ndarray, q_lin: jnp.ndarray,
                          k_lin: jnp.ndarray, v: jnp.ndarray, *, chunk_size: int, causal: bool,
                          bias: Optional[RelativeBias] = None) -> jnp.ndarray:
    """FLASH's mixed chunk attention, any length (padded internally to whole chunks).

    out_i = Σ_{j in chunk(i), visible} relu²(q_quad,i · k_quad,j / C + b(i - j)) v_j
          + q_lin,i · Σ_{j in earlier chunks (causal) / all chunks} k_lin,j v_jᵀ / C

    Padding is exact: padded values are zero, so padded keys add nothing to either part (and a
    causal query never sees them anyway).

    Args:
      q_quad, k_quad, q_lin, k_lin: `[batch, length, s]`, position-transformed.
      v: `[batch, length, e]`.
      chunk_size: C.
      causal: causal inside chunks and an exclusive cumulative sum across them; else every key.
      bias: optional relative bias for the quadratic part (one head).
    Returns:
      `[batch, length, e]` in v's dtype.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    n = v.shape[1]
    c = chunk_size
    qq, kq, ql, kl, vc = (_to_chunks(x, c) for x in (q_quad, k_quad, q_lin, k_lin, v))
    vc32 = vc.astype(jnp.float32)

    # Local: exact quadratic attention inside each chunk.
    pos = jnp.arange(c, dtype=jnp.int32)
    rel = pos[:, None] - pos[None, :]
    scores = jnp.einsum("bgis,bgjs->bgij", qq, kq, preferred_element_type=jnp.float32) / c
    kernel = squared_relu(_with_bias(scores, bias, rel))
    if causal:
        kernel = jnp.where(rel >= 0, kernel, 0.0)
    local = jnp.einsum("bgij,bgje->bgie", kernel, vc32, preferred_element_type=jnp.float32)

    # Global: linear attention across chunks through per-chunk states K_gᵀ V_g / C (float32).
    states = jnp.einsum("bgjs,bgje->bgse", kl, vc32, preferred_element_type=jnp.float32) / c
    if causal:
        running = jax.lax.associative_scan(jnp.add, states, axis=1)
        context = jnp.pad(running[:, :-1], [(0, 0), (1, 0), (0, 0), (0, 0)])  # exclusive
        glob = jnp.einsum("bgis,bgse->bgie", ql, context, preferred_element_type=jnp.float32)
    else:
        context = jnp.sum(states, axis=1)
        glob = jnp.einsum("bgis,bse->bgie", ql, context, preferred_element_type=jnp.float32)

    out = (local + glob).reshape(v.shape[0], -1, v.shape[-1])[:, :n]
    return out.astype(v.dtype)


def init_mixed_chunk_cache(batch: int, chunk_size: int, qk_dim: int, value_dim: int,
                           dtype=jnp.float32) -> dict[str, jnp.ndarray]:
    """Empty decoding cache of one layer: `keys [b, C, s]`, `values [b, C, e]` of the current
    chunk (in `dtype`), float32 `state [b, s, e]` (Σ K_lin,hᵀ V_h / C over completed chunks) and
    float32 `pending [b, s, e]` (the same sum over the current chunk so far)."""
    return {
        "keys": jnp.zeros((batch, chunk_size, qk_dim), dtype),
        "values": jnp.zeros((batch, chunk_size, value_dim), dtype),
        "state": jnp.zeros((batch, qk_dim, value_dim), jnp.float32),
        "pending": jnp.zeros((batch, qk_dim, value_dim), jnp.float32),
    }


def mixed_chunk_decode_step(cache: dict[str, jnp.ndarray], q_quad: jnp.ndarray,
                            k_quad: jnp.ndarray, q_lin: jnp.ndarray, k_lin: jnp.ndarray,
                            v: jnp.ndarray, position: jnp.ndarray, *, chunk_size: int,
                            bias: Optional[RelativeBias] = None
                            ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """One causal step of `mixed_chunk_attention` for the token at `position`.

    Args:
      cache: from `init_mixed_chunk_cache` or the previous step (positions 0 .. position-1).
      q_quad, k_quad, q_lin, k_lin: `[batch, s]` of this token, position-transformed.
      v: `[batch, e]`.
      position: int32 scalar, the token's position.
      chunk_size, bias: as in `mixed_chunk_attention`.
    Returns:
      (`[batch, e]` in v's dtype, the updated cache). Cost O(C·(s + e) + s·e).
    """
    slot = position % chunk_size
    keys = jax.lax.dynamic_update_slice_in_dim(cache["keys"], k_quad[:, None].astype(
        cache["keys"].dtype), slot, axis=1)
    values = jax.lax.dynamic_update_slice_in_dim(cache["values"], v[:, None].astype(
        cache["values"].dtype), slot, axis=1)
    slots = jnp.arange(chunk_size, dtype=jnp.int32)
    rel = slot - slots  # position minus the key positions of this chunk
    scores = jnp.einsum("bs,bcs->bc", q_quad, keys, preferred_element_type=jnp.float32)
    kernel = squared_relu(_with_bias(scores / chunk_size, bias, rel))
    kernel = jnp.where(rel >= 0, kernel, 0.0)  # later slots hold the previous chunk's tokens
    local = jnp.einsum("bc,bce->be", kernel, values.astype(jnp.float32),
                       preferred_element_type=jnp.float32)
    glob = jnp.einsum("bs,bse->be", q_lin, cache["state"], preferred_element_type=jnp.float32)

    pending = cache["pending"] + jnp.einsum(
        "bs,be->bse", k_lin, v, preferred_element_type=jnp.float32) / chunk_size
    chunk_done = slot == chunk_size - 1
    new_cache = {
        "keys": keys,
        "values": values,
        "state": jnp.where(chunk_done, cache["state"] + pending, cache["state"]),
        "pending": jnp.where(chunk_done, jnp.zeros_like(pending), pending),
    }
    return (local + glob).astype(v.dtype), new_cache
