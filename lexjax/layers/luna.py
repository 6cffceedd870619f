"""Luna: linear unified nested attention (Ma et al., NeurIPS 2021).

A fixed-length extra sequence P (`[batch, l, embed]`) carries the context between layers:

    pack:    C = softmax((P Wpq)(X Wpc)^T / sqrt(d)) (X Wpc)       # [l, embed]: X read into l slots
    unpack:  Y = softmax((X Wq)(C Wc)^T / sqrt(d)) (C Wc) Wo       # [n, embed]: each token reads C
    layer:   X <- X + Y,  P <- P + C  (then the MLP on X)

(keys tied to values, as the reference's default), O(n l) instead of O(n^2).

The causal form (the reference's `LunarCausalAttention`) packs each prefix: token j weighs the l
slots by pattn_j = softplus_{ln 2}((X_j Wpc) . (P Wpq)_l / sqrt(d)) (1 at 0, like the reference's
ELU + 1), and with c_j = X_j Wc

    a_t   = softmax_l( (1/t) sum_{j<=t} (q_t . c_j) pattn_j )
    out_t = (1/t) sum_{j<=t} (a_t . pattn_j) c_j

both of the form (1/t) sum_{j<=t} (x_t . y_j) z_j (`causal_mean_attention`), computed chunk by
chunk with `lax.scan` (a running `[heads, d1, d2]` state, never the `[n, d1, d2]` prefix sums)
and, when decoding, one token at a time from that state: O(1) per token. P is not updated in the
causal form (packing the whole row would leak later tokens); the model reads one learned P.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lexjax.layers.basic import Dtype, Layer, dense, make_norm, with_activation_axes
from lexjax.layers.decoding import cached_recurrence
from lexjax.layers.mlp import MLP

#: softplus with beta = ln 2: 1 at 0, like ELU + 1, positive everywhere.
PACK_BETA = math.log(2.0)


def pack_weights(x: jnp.ndarray) -> jnp.ndarray:
    """softplus_beta(x) = log(1 + exp(beta x)) / beta, beta = ln 2 (float32)."""
    return jax.nn.softplus(PACK_BETA * x.astype(jnp.float32)) / PACK_BETA


def causal_mean_attention(x: jnp.ndarray, y: jnp.ndarray, z: jnp.ndarray,
                          chunk_size: int) -> jnp.ndarray:
    """out_t = (1/t) sum_{j<=t} (x_t . y_j) z_j, t = 1..n.

    Args:
      x, y: `[batch, n, heads, d1]`; z: `[batch, n, heads, d2]`.
      chunk_size: tokens per `lax.scan` step (quadratic inside a chunk, a running
        `[batch, heads, d1, d2]` state across chunks).
    Returns:
      float32 `[batch, n, heads, d2]`.
    """
    b, n, h, d1 = x.shape
    d2 = z.shape[-1]
    size = min(chunk_size, n)
    chunks = -(-n // size)
    pad = chunks * size - n

    def blocks(a):  # [b, n, h, d] -> [chunks, b, size, h, d]
        a = jnp.pad(a.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
        return jnp.moveaxis(a.reshape(b, chunks, size, h, a.shape[-1]), 1, 0)

    causal = jnp.tril(jnp.ones((size, size), jnp.float32))

    def step(state, block):
        xc, yc, zc = block
        scores = jnp.einsum("bthd,bshd->bhts", xc, yc) * causal
        out = (jnp.einsum("bhts,bshe->bthe", scores, zc)
               + jnp.einsum("bthd,bhde->bthe", xc, state))
        return state + jnp.einsum("bshd,bshe->bhde", yc, zc), out

    state = jnp.zeros((b, h, d1, d2), jnp.float32)
    _, out = jax.lax.scan(step, state, (blocks(x), blocks(y), blocks(z)))
    out = jnp.moveaxis(out, 0, 1).reshape(b, chunks * size, h, d2)[:, :n]
    counts = jnp.arange(1, n + 1, dtype=jnp.float32)[None, :, None, None]
    return out / counts


def masked_softmax_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                             key_valid: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Bidirectional softmax attention, q `[b, m, h, d]` over k, v `[b, n, h, d]` (scaled by
    d^-0.5, float32 scores; `key_valid` bool `[b, n]` leaves keys out) -> `[b, m, h, d]`."""
    scores = jnp.einsum("bmhd,bnhd->bhmn", q, k, preferred_element_type=jnp.float32)
    scores = scores * (q.shape[-1] ** -0.5)
    if key_valid is not None:
        scores = jnp.where(key_valid[:, None, None, :], scores, -1e30)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhmn,bnhd->bmhd", weights, v)


class LunaAttention(nn.Module):
    """Bidirectional nested attention: `(x [b, n, embed], p [b, l, embed])` -> (the tokens'
    output `[b, n, embed]`, the packed context C `[b, l, embed]`). heads x head_dim must equal
    embed (C is added to P)."""

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    use_bias: bool = False

    def projection(self, name: str) -> nn.Module:
        return dense((self.num_heads, self.head_dim), ("embed", "heads", "kv"), dtype=self.dtype,
                     use_bias=self.use_bias, name=name)

    @nn.compact
    def __call__(self, x: jnp.ndarray, p: jnp.ndarray,
                 key_valid: Optional[jnp.ndarray] = None) -> tuple[jnp.ndarray, jnp.ndarray]:
        context = self.projection("pack_context")(x)  # keys tied to values
        packed = masked_softmax_attention(self.projection("pack_query")(p), context, context,
                                          key_valid)
        packed = packed.reshape(packed.shape[:2] + (-1,))  # [b, l, embed]
        unpacked = self.projection("context")(packed)
        out = masked_softmax_attention(self.projection("query")(x), unpacked, unpacked)
        out = dense(x.shape[-1], ("heads", "kv", "embed"), dtype=self.dtype, contract=(-2, -1),
                    use_bias=self.use_bias, name="out")(out)
        return out, packed


class LunaCausalAttention(nn.Module):
    """Causal nested attention (see the module docstring): `(x [b, n, embed], p [b or 1, l,
    embed])` -> `[b, n, embed]`; with `decode`, one token per call from a running state (the
    "cache" collection), O(1) per token."""

    num_heads: int
    head_dim: int
    chunk_size: int = 64
    dtype: Dtype = jnp.float32
    use_bias: bool = False
    decode: bool = False

    def projection(self, name: str) -> nn.Module:
        return dense((self.num_heads, self.head_dim), ("embed", "heads", "kv"), dtype=self.dtype,
                     use_bias=self.use_bias, name=name)

    @nn.compact
    def __call__(self, x: jnp.ndarray, p: jnp.ndarray) -> jnp.ndarray:
        scale = self.head_dim ** -0.5
        slots = self.projection("pack_query")(p) * scale                  # [b|1, l, h, d]
        weights = pack_weights(jnp.einsum("bnhd,blhd->bnhl", self.projection("pack_context")(x),
                                          jnp.broadcast_to(slots, (x.shape[0],) + slots.shape[1:]),
                                          preferred_element_type=jnp.float32))
        q = (self.projection("query")(x) * scale).astype(jnp.float32)
        c = self.projection("context")(x).astype(jnp.float32)              # keys tied to values
        if self.decode:
            out = self.decode_tokens(q, c, weights)
        else:
            scores = causal_mean_attention(q, c, weights, self.chunk_size)  # [b, n, h, l]
            attention = jax.nn.softmax(scores, axis=-1)
            out = causal_mean_attention(attention, weights, c, self.chunk_size)
        return dense(x.shape[-1], ("heads", "kv", "embed"), dtype=self.dtype, contract=(-2, -1),
                     use_bias=self.use_bias, name="out")(out.astype(self.dtype))

    def decode_tokens(self, q: jnp.ndarray, c: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
        """The decoding path: state (sum_j c_j (x) pattn_j `[b, h, d, l]`, sum_j pattn_j (x) c_j
        `[b, h, l, d]`, t) updated by each token."""
        d, slots = q.shape[-1], weights.shape[-1]
        inputs = jnp.concatenate([q, c, weights], axis=-1)  # [b, n, h, 2d + l]

        def forward(packed):
            q, c, w = jnp.split(packed, [d, 2 * d], axis=-1)
            attention = jax.nn.softmax(causal_mean_attention(q, c, w, self.chunk_size), axis=-1)
            return causal_mean_attention(attention, w, c, self.chunk_size)

        def initial_state(batch):
            heads = q.shape[2]
            return {"keys": jnp.zeros((batch, heads, d, slots), jnp.float32),
                    "values": jnp.zeros((batch, heads, slots, d), jnp.float32),
                    "count": jnp.zeros((), jnp.float32)}

        def step(token, state):  # token [b, h, 2d + l]
            q_t, c_t, w_t = jnp.split(token, [d, 2 * d], axis=-1)
            count = state["count"] + 1.0
            keys = state["keys"] + jnp.einsum("bhd,bhl->bhdl", c_t, w_t)
            values = state["values"] + jnp.einsum("bhl,bhd->bhld", w_t, c_t)
            attention = jax.nn.softmax(jnp.einsum("bhd,bhdl->bhl", q_t, keys) / count, axis=-1)
            out = jnp.einsum("bhl,bhld->bhd", attention, values) / count
            return out, {"keys": keys, "values": values, "count": count}

        return cached_recurrence(self, inputs, name="luna_state", forward=forward,
                                 initial_state=initial_state, step=step)


class LunaLayer(Layer, kw_only=True):
    """A pre-norm Luna block: `x + Attn(Norm x, Norm' p)` (and `p + C` in the bidirectional
    form), then `x + MLP(Norm'' x)`. `(x [b, n, embed], p [b, l, embed])` -> same."""

    num_heads: int
    head_dim: int
    mlp_dim: int
    causal: bool
    chunk_size: int = 64
    norm: str = "rmsnorm"
    mlp_activation: str = "gelu"

    @nn.compact
    def __call__(self, x: jnp.ndarray, p: jnp.ndarray,
                 key_valid: Optional[jnp.ndarray] = None) -> tuple[jnp.ndarray, jnp.ndarray]:
        h = make_norm(self.norm, dtype=self.dtype, name="pre_attention_norm")(x)
        hp = make_norm(self.norm, dtype=self.dtype, name="pre_extra_norm")(p)
        if self.causal:
            y = LunaCausalAttention(self.num_heads, self.head_dim, self.chunk_size, self.dtype,
                                    decode=self.decode, name="attention")(h, hp)
        else:
            y, packed = LunaAttention(self.num_heads, self.head_dim, self.dtype,
                                      name="attention")(h, hp, key_valid)
            p = p + self.residual_dropout(packed.astype(p.dtype))
        x = x + self.residual_dropout(y)
        h = make_norm(self.norm, dtype=self.dtype, name="pre_mlp_norm")(x)
        h = MLP(self.mlp_dim, self.mlp_activation, self.dropout_rate, self.dtype, name="mlp")(
            h, deterministic=self.deterministic)
        return with_activation_axes(x + self.residual_dropout(h)), p

