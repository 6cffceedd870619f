"""Mega and Mega-chunk (Ma et al. 2023, "Mega: Moving Average Equipped Gated Attention").

One Mega layer (paper eqs. 6–15), `X [length, d] -> Y [length, d]`:

    X' = EMA(X)                                   multi-dimensional damped EMA (lexjax.layers.ema)
    Z = SiLU(X' W_z + b_z) ∈ R^{L×z};  Q = κ_q ⊙ Z + μ_q;  K = κ_k ⊙ Z + μ_k
    V = SiLU(X W_v + b_v) ∈ R^{L×v}
    O = softmax(Q Kᵀ / √z + b_rel) V              one head; b_rel from the zoo's position scheme
    γ = SiLU(X' W_γ + b_γ) ∈ R^{L×v}  (reset);  φ = σ(X' W_φ + b_φ) ∈ R^{L×d}  (update)
    Ĥ = SiLU(X' W_h + (γ ⊙ O) U_h + b_h);   Y = φ ⊙ Ĥ + (1 − φ) ⊙ X

and one Mega block (eq. 17, post-norm, the gated residual replacing the usual one):
`Y = Norm(Mega(X))`, `Y' = Norm(FFN(Y) + Y)`. Mega-chunk (§3.4): the attention stays inside
non-overlapping chunks of `chunk_size` tokens (`MaskSpec(chunk=c)`, causal inside the chunk), so
time and memory are linear in the length; only the EMA carries information across chunks.
`chunk_size=None` is full causal Mega (quadratic).

Size macros: EMBED_DIM = d, MLP_DIM = the FFN width (paper 2d), CHUNK_SIZE = c; v = 2d, z = 128,
h = 16 (the paper's LM settings) are fields. NUM_HEADS is ignored: Mega's attention has one head
(its gate γ stands in for multiple heads, paper §3.5). Softmax attention (the paper's choice for
text); the relative bias / rotation is the zoo's position scheme (paper: T5, RoPE, TUPE or ALiBi
— the WT103 recipe uses rotary, the default here).

Incremental decoding: `init_cache(batch)` gives the "cache" collection (per layer the EMA state
`[batch, d, h]` and the keys and values of the current chunk — O(c) memory; full Mega keeps
`max_decode_length` of them), and

    logits, vars = model.apply({"params": p, "cache": cache}, token[:, None], decode=True,
                               mutable=["cache"])

returns the logits of the next position and the advanced cache.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from lexjax.attention import MaskSpec, RelativeBias, attend
from lexjax.attention.common import masked_softmax_attention
from lexjax.layers import MLP, compute_dtype, make_norm, with_activation_axes
from lexjax.layers.basic import Dtype
from lexjax.layers.ema import DampedEMA, ema_flops_per_token
from lexjax.models.lm import empty_cache
from lexjax.models.lm import check_remat, embed_tokens, output_logits
from lexjax.models.transformer import REMAT_POLICIES
from lexjax.positions import PositionScheme, RoPE


def biased_dense(features: int, axes: tuple[str, str], *, dtype: Dtype, name: str) -> nn.Dense:
    """`[..., in] -> [..., features]` with a bias (the paper's b terms), kernel annotated `axes`,
    bias `axes[1:]`; weights N(0, 0.02) and zero bias (the reference's init)."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


class MegaLayer(nn.Module):
    """The moving-average equipped gated attention sub-layer (eqs. 6–15):
    `x [batch, length, d]`, int32 `positions [length]` -> `[batch, length, d]`.

    With `decode=True`: one token `x [batch, 1, d]` at `positions [1]`, against the EMA state and
    key/value cache in the "cache" collection (`cache_length` slots; slot = position mod
    cache_length for Mega-chunk).
    """

    qk_dim: int
    value_dim: int
    ema_dim: int
    position: PositionScheme
    mask: MaskSpec
    cache_length: int
    attention_impl: str = "auto"
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
        d = x.shape[-1]
        ema = DampedEMA(d, self.ema_dim, name="ema")
        x_ema = (self.ema_step(ema, x) if self.decode else ema(x)).astype(self.dtype)

        z = nn.silu(biased_dense(self.qk_dim, ("embed", "kv"), dtype=self.dtype, name="wz")(x_ema))
        scale = self.param("qk_scale", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, "kv")), (2, self.qk_dim), jnp.float32)
        offset = self.param("qk_offset", nn.with_logical_partitioning(
            nn.initializers.zeros, (None, "kv")), (2, self.qk_dim), jnp.float32)
        q = (z * scale[0] + offset[0]).astype(self.dtype)[:, :, None, :]  # [b, n, 1, z]
        k = (z * scale[1] + offset[1]).astype(self.dtype)[:, :, None, :]
        v = nn.silu(biased_dense(self.value_dim, ("embed", "mlp"), dtype=self.dtype,
                                 name="wv")(x))[:, :, None, :]  # [b, n, 1, v]

        scheme = self.position.clone(parent=self, name="position_hooks")
        q, k = scheme.rotate(q, k, positions, positions)
        bias = scheme.relative_bias(1, self.qk_dim)
        if self.decode:
            out = self.attend_cached(q, k, v, positions, bias)
        else:
            out = attend(q, k, v, mask=self.mask, bias=bias, impl=self.attention_impl)
        out = nn.with_logical_constraint(out[:, :, 0], ("activation_batch", "activation_length",
                                                        "activation_mlp"))

        reset = nn.silu(biased_dense(self.value_dim, ("embed", "mlp"), dtype=self.dtype,
                                     name="w_reset")(x_ema))
        update = nn.sigmoid(biased_dense(d, ("embed", "mlp"), dtype=self.dtype,
                                         name="w_update")(x_ema))
        candidate = biased_dense(d, ("embed", "mlp"), dtype=self.dtype, name="wh")(x_ema)
        candidate = candidate + nn.DenseGeneral(
            d, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name="uh",
            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                     ("mlp", "embed")))(reset * out)
        candidate = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(
            nn.silu(candidate), deterministic=self.deterministic)
        return update * candidate + (1.0 - update) * x

    def ema_step(self, ema: DampedEMA, x: jnp.ndarray) -> jnp.ndarray:
        """`x [batch, 1, d]` -> float32 EMA output `[batch, 1, d]` from the cached EMA state."""
        if x.shape[1] != 1:
            raise ValueError(f"decode=True takes one token per call, got length {x.shape[1]}")
        initialized = self.has_variable("cache", "ema_state")
        state = self.variable("cache", "ema_state", ema.initial_state, x.shape[0])
        y, new_state = ema.step(x[:, 0], state.value)
        if initialized:
            state.value = new_state
        return y[:, None]

    def attend_cached(self, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                      positions: jnp.ndarray, bias: Optional[RelativeBias]) -> jnp.ndarray:
        """One query `q [b, 1, 1, z]` at `positions [1]` against the cached keys and values plus
        this token's `k [b, 1, 1, z]`, `v [b, 1, 1, v]` -> `[b, 1, 1, v]`."""
        b, slots = q.shape[0], self.cache_length
        initialized = self.has_variable("cache", "keys")
        keys = self.variable("cache", "keys", jnp.zeros, (b, slots, 1, q.shape[-1]), k.dtype)
        values = self.variable("cache", "values", jnp.zeros, (b, slots, 1, v.shape[-1]), v.dtype)
        position = positions[0]
        start = (position // slots) * slots if self.mask.chunk is not None else 0
        slot = position - start
        new_keys = jax.lax.dynamic_update_slice_in_dim(keys.value, k, slot, axis=1)
        new_values = jax.lax.dynamic_update_slice_in_dim(values.value, v, slot, axis=1)
        if initialized:
            keys.value, values.value = new_keys, new_values
        # Slots after `slot` hold older tokens (or zeros); their positions lie in the future of
        # `position`, so the causal mask hides them.
        k_pos = start + jnp.arange(slots, dtype=jnp.int32)
        out = masked_softmax_attention(q[:, :, :, None, :], new_keys, new_values, positions,
                                       k_pos, mask=self.mask, bias=bias)
        return out[:, :, :, 0, :]


class MegaBlock(nn.Module):
    """`Y = Norm(Mega(X))`, `Y' = Norm(FFN(Y) + Y)` (eq. 17): `[batch, length, d]` -> same."""

    mlp_dim: int
    qk_dim: int
    value_dim: int
    ema_dim: int
    position: PositionScheme
    mask: MaskSpec
    cache_length: int
    attention_impl: str = "auto"
    norm: str = "layernorm"
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
        y = MegaLayer(self.qk_dim, self.value_dim, self.ema_dim, self.position, self.mask,
                      self.cache_length, self.attention_impl, self.dropout_rate, self.dtype,
                      self.deterministic, self.decode, name="mega")(x, positions)
        y = make_norm(self.norm, dtype=self.dtype, name="mega_norm")(y)
        h = MLP(self.mlp_dim, "gelu", self.dropout_rate, self.dtype, name="ffn")(
            y, deterministic=self.deterministic)
        h = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(h, deterministic=self.deterministic)
        return with_activation_axes(make_norm(self.norm, dtype=self.dtype, name="ffn_norm")(h + y))


@gin.configurable(module="lexjax.models")
class Mega(nn.Module):
    """The Mega language model: int32 tokens `[batch, length]` -> float32 logits
    `[batch, length, vocab_size]`, causal, any length. Post-norm Mega blocks (no final norm: each
    block ends in one), tied logits.

    Attributes:
      mlp_dim: FFN width (paper 2d).
      chunk_size: Mega-chunk's chunk c (linear time), or None for full Mega (quadratic).
      qk_dim: z (paper 128). value_dim: v (default 2d). ema_dim: h (paper 16).
      position: the zoo position scheme giving b_rel (`relative_bias`) and/or rotating q, k.
      max_decode_length: key/value slots of the decoding cache of full Mega (Mega-chunk keeps
        `chunk_size`); positions beyond it are not supported.
      remat_policy: one of `REMAT_POLICIES` (training only).
    """

    vocab_size: int
    num_layers: int
    embed_dim: int
    mlp_dim: int
    chunk_size: Optional[int] = 1024
    qk_dim: int = 128
    value_dim: Optional[int] = None
    ema_dim: int = 16
    position: PositionScheme = RoPE()
    attention_impl: str = "auto"
    norm: str = "layernorm"
    tie_embeddings: bool = True
    dropout_rate: float = 0.0
    dtype: str = "float32"
    remat_policy: str = "none"
    max_decode_length: int = 4096

    @property
    def value_features(self) -> int:
        """v: `value_dim`, or 2·embed_dim (the paper's v = 2d)."""
        return self.value_dim if self.value_dim is not None else 2 * self.embed_dim

    @property
    def mask(self) -> MaskSpec:
        """Causal attention, inside chunks of `chunk_size` for Mega-chunk."""
        return MaskSpec(causal=True, chunk=self.chunk_size)

    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward FLOPs per token at `length` (2 per multiply-add): the EMA (kernel once per
        sequence, FFT convolution estimate), the projections W_z, W_v, W_γ, W_φ, W_h, U_h,
        scores and values over the keys a query sees (its chunk for Mega-chunk), the FFN and the
        logits."""
        d, z, v = self.embed_dim, self.qk_dim, self.value_features
        projections = 2.0 * (d * z + 3 * d * v + 2 * d * d)
        attention = 2.0 * (z + v) * self.mask.mean_keys_per_query(length)
        ffn = 4.0 * d * self.mlp_dim
        layer = ema_flops_per_token(d, self.ema_dim, length) + projections + attention + ffn
        return self.num_layers * layer + 2.0 * d * self.vocab_size

    @nn.nowrap
    def init_cache(self, batch_size: int) -> Any:
        """An empty decoding cache (the "cache" collection) for `batch_size` sequences."""
        return empty_cache(self, batch_size)

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, *, deterministic: bool = True,
                 decode: bool = False) -> jnp.ndarray:
        """`tokens [batch, length]` -> logits `[batch, length, vocab]`; with `decode=True`,
        `tokens [batch, 1]`, the next token after those the cache has seen."""
        check_remat(self.remat_policy)
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int)
                                            or self.chunk_size < 1):
            raise ValueError(f"Mega.chunk_size must be a positive int (Mega-chunk) or None "
                             f"(full Mega), got {self.chunk_size!r}")
        dtype = compute_dtype(self.dtype)
        if decode:
            initialized = self.has_variable("cache", "index")
            index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            positions = index.value[None]
            if initialized:
                index.value = index.value + 1
        else:
            positions = np.arange(tokens.shape[1], dtype=np.int32)
        embedding, x = embed_tokens(self, tokens, positions, self.position, deterministic)
        block_cls = MegaBlock
        if self.remat_policy != "none" and not decode:
            block_cls = nn.remat(MegaBlock, policy=REMAT_POLICIES[self.remat_policy])
        cache_length = self.chunk_size or self.max_decode_length
        for i in range(self.num_layers):
            x = block_cls(self.mlp_dim, self.qk_dim, self.value_features, self.ema_dim,
                          self.position, self.mask, cache_length, self.attention_impl, self.norm,
                          self.dropout_rate, dtype, deterministic, decode,
                          name=f"layer_{i}")(x, positions)
        return output_logits(self, embedding, x)
