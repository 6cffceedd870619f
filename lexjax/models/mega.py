"""Mega and Mega-chunk (Ma et al. 2023, "Mega: Moving Average Equipped Gated Attention").

One Mega layer (paper eqs. 6–15), `X [length, d] -> Y [length, d]`:

    X' = EMA(X)                                   multi-dimensional damped EMA (lexjax.layers.ema)
    Z = SiLU(X' W_z + b_z) ∈ R^{L×z};  Q = κ_q ⊙ Z + μ_q;  K = κ_k ⊙ Z + μ_k
    V = SiLU(X W_v + b_v) ∈ R^{L×v}
    O = f(Q Kᵀ / τ + b_rel) V                     one head; b_rel from the zoo's position scheme
    γ = SiLU(X' W_γ + b_γ) ∈ R^{L×v}  (reset);  φ = σ(X' W_φ + b_φ) ∈ R^{L×d}  (update)
    Ĥ = SiLU(X' W_h + (γ ⊙ O) U_h + b_h);   Y = φ ⊙ Ĥ + (1 − φ) ⊙ X

and one Mega block (eq. 17, post-norm, the gated residual replacing the usual one):
`Y = Norm(Mega(X))`, `Y' = Norm(FFN(Y) + Y)` (a SiLU FFN, as the reference LM's). Mega-chunk
(§3.4): the attention stays inside non-overlapping chunks of `chunk_size` tokens
(`MaskSpec(chunk=c)`, causal inside the chunk), so time and memory are linear in the length;
only the EMA carries information across chunks. `chunk_size=None` is full causal Mega
(quadratic).

Size macros: EMBED_DIM = d, MLP_DIM = the FFN width (paper 2d), CHUNK_SIZE = c; v = 2d,
z = d/4 (the reference LMs: 128 at d = 512, 256 at d = 1024), h = 16 are fields. NUM_HEADS is
ignored: Mega's attention has one head (its gate γ stands in for multiple heads, paper §3.5).
The attention function f: softmax with τ = √z (the paper's choice for text), or the reference's
element-wise "relu2" / "laplace" with τ = the number of keys the query sees (t + 1 in its chunk:
the reference's `element_attention`), unnormalised. b_rel is the zoo's position scheme; the
default is the reference's `RotaryRelativeBias` (its WT103 recipe, `--rel-pos-bias rotary`), a
learned bias rot(α, i)·rot(β, j); its "simple" bias is `SimpleRelativeBias` (both in
lexjax.positions.learned_offsets). Any other scheme works too (RoPE rotates q and k instead).

Decoding (`LanguageModel.prefill` / `decode_step`): per layer the EMA state `[batch, d, h]` and
the keys and values of the current chunk (O(c) memory; full Mega keeps every key, up to the length
the cache was made for), one token per call. Mega cannot keep packed documents apart: its EMA is
a convolution over the whole row.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import gin
import jax.numpy as jnp

from lexjax.attention import MaskSpec, attend
from lexjax.attention.reference import attend_at_positions
from lexjax.layers import MLP, Layer, make_norm, with_activation_axes
from lexjax.layers.basic import Dtype
from lexjax.layers.decoding import KeyValueCache, cached_recurrence
from lexjax.layers.ema import DampedEMA, ema_flops_per_token
from lexjax.layers.mixed_chunk import (ELEMENTWISE_ATTENTION, quadratic_attention,
                                       quadratic_attention_at)
from lexjax.layers.mlp import ELEMENTWISE_ACTIVATIONS
from lexjax.models.lm import ChunkedAttention, LanguageModel
from lexjax.positions import PositionScheme, RotaryRelativeBias

ATTENTION_FUNCTIONS = ("softmax",) + tuple(ELEMENTWISE_ATTENTION)
ELEMENTWISE_BLOCK = 512  # query block of full Mega's element-wise attention (memory O(block·n))


def biased_dense(features: int, axes: tuple[str, str], *, dtype: Dtype, name: str) -> nn.Dense:
    """`[..., in] -> [..., features]` with a bias (the paper's b terms), kernel annotated `axes`,
    bias `axes[1:]`; weights N(0, 0.02) and zero bias (the reference's init)."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


def chunked_elementwise_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
                                  chunk: Optional[int], bias, function) -> jnp.ndarray:
    """Causal `f(q kᵀ / (t + 1) + b) v` inside chunks of `chunk` tokens (None: the whole row,
    in query blocks): `q, k [batch, length, z]`, `v [batch, length, e]` -> `[batch, length, e]`.
    Chunks become batch rows at chunk-local positions (the last one zero-padded: its padding
    keys lie in every real query's future), so time and memory are O(length · chunk)."""
    b, n, _ = q.shape
    if chunk is None or chunk >= n:
        return quadratic_attention(q, k, v, causal=True, bias=bias, function=function,
                                   block_size=ELEMENTWISE_BLOCK)
    pad = -n % chunk

    def to_chunks(x):  # [b, n, f] -> [b * chunks, chunk, f]
        x = jnp.pad(x, [(0, 0), (0, pad), (0, 0)])
        return x.reshape(b * (n + pad) // chunk, chunk, x.shape[-1])

    out = quadratic_attention(to_chunks(q), to_chunks(k), to_chunks(v), causal=True, bias=bias,
                              function=function)
    return out.reshape(b, n + pad, -1)[:, :n]


class MegaLayer(Layer, kw_only=True):
    """The moving-average equipped gated attention sub-layer (eqs. 6–15):
    `x [batch, length, d]`, int32 `positions [length]` -> `[batch, length, d]`.

    With `decode=True`: one token `x [batch, 1, d]` at `positions [1]`, against the EMA state and
    the `KeyValueCache` in the "cache" collection.
    """

    qk_dim: int
    value_dim: int
    ema_dim: int
    position: PositionScheme
    mask: MaskSpec
    attention_impl: str = "auto"
    attention_function: str = "softmax"

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
        d = x.shape[-1]
        ema = DampedEMA(d, self.ema_dim, name="ema")
        x_ema = (cached_recurrence(self, x, name="ema_state", forward=ema,
                                   initial_state=ema.initial_state, step=ema.step)
                 if self.decode else ema(x)).astype(self.dtype)

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
        bias = scheme.relative_bias(1, self.qk_dim)
        if self.attention_function != "softmax":
            out = self.elementwise_attention(scheme, bias, q, k, v, positions)
        elif self.decode:
            keys, values, key_positions, key_valid = KeyValueCache(self.mask, name="kv_cache")(
                k, v, positions)
            q, keys = scheme.rotate(q, keys, positions, key_positions)
            out = attend_at_positions(q, keys, values, positions, key_positions, mask=self.mask,
                                      bias=bias, k_valid=key_valid)
        else:
            q, k = scheme.rotate(q, k, positions, positions)
            out = attend(q, k, v, mask=self.mask, bias=bias, impl=self.attention_impl)
        out = with_activation_axes(out[:, :, 0], ("activation_batch", "activation_length",
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
        candidate = self.residual_dropout(nn.silu(candidate))
        return update * candidate + (1.0 - update) * x

    def elementwise_attention(self, scheme: PositionScheme, bias, q: jnp.ndarray,
                              k: jnp.ndarray, v: jnp.ndarray,
                              positions: jnp.ndarray) -> jnp.ndarray:
        """The "relu2" / "laplace" attention: `q, k [b, n, 1, z]`, `v [b, n, 1, v]` ->
        `[b, n, 1, v]` (with `decode`, against the cached keys of the query's chunk)."""
        function = ELEMENTWISE_ATTENTION[self.attention_function]
        if self.decode:
            keys, values, key_positions, key_valid = KeyValueCache(self.mask, name="kv_cache")(
                k, v, positions)
            q, keys = scheme.rotate(q, keys, positions, key_positions)
            out = quadratic_attention_at(q[:, :, 0], keys[:, :, 0], values[:, :, 0], positions,
                                         key_positions, causal=True, bias=bias,
                                         k_valid=key_valid, function=function,
                                         chunk=self.mask.chunk)
            return out.astype(v.dtype)[:, :, None]
        q, k = scheme.rotate(q, k, positions, positions)
        return chunked_elementwise_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0],
                                             chunk=self.mask.chunk, bias=bias,
                                             function=function)[:, :, None]


class MegaBlock(Layer, kw_only=True):
    """`Y = Norm(Mega(X))`, `Y' = Norm(FFN(Y) + Y)` (eq. 17): `[batch, length, d]` -> same;
    `layer` is the template of its Mega layer."""

    layer: MegaLayer
    mlp_dim: int
    norm: str = "layernorm"
    mlp_activation: str = "silu"

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
        y = self.layer.clone(parent=self, name="mega")(x, positions)
        y = make_norm(self.norm, dtype=self.dtype, name="mega_norm")(y)
        h = MLP(self.mlp_dim, self.mlp_activation, self.dropout_rate, self.dtype, name="ffn")(
            y, deterministic=self.deterministic)
        h = self.residual_dropout(h)
        return with_activation_axes(make_norm(self.norm, dtype=self.dtype, name="ffn_norm")(h + y))


@gin.register(module="lexjax.models")
class Mega(ChunkedAttention, LanguageModel, kw_only=True):
    """The Mega language model: int32 tokens `[batch, length]` -> float32 logits
    `[batch, length, vocab_size]`, causal, any length. Post-norm Mega blocks (no final norm: each
    block ends in one), tied logits.

    Attributes:
      mlp_dim: FFN width (paper 2d).
      mlp_activation: the FFN's activation (SiLU, the reference LM's `activation_fn`; any
        element-wise one of `lexjax.layers.mlp.ELEMENTWISE_ACTIVATIONS`).
      chunk_size: Mega-chunk's chunk c (linear time), or None for full Mega (quadratic).
      qk_dim: z (default d/4, the reference LMs' 128 at d = 512 and 256 at d = 1024).
      value_dim: v (default 2d). ema_dim: h (paper 16).
      position: the zoo position scheme giving b_rel (`relative_bias`) and/or rotating q, k
        (default the reference's learned rotary bias).
      attention_function: "softmax" (τ = √z, the paper's choice for text), "relu2" or
        "laplace" (element-wise, τ = the keys the query sees; the reference's
        `attention_activation`).
      attention_impl: the `attend` implementation of the softmax attention.
    """

    chunk_size: Optional[int] = 1024
    qk_dim: Optional[int] = None
    value_dim: Optional[int] = None
    ema_dim: int = 16
    position: PositionScheme = RotaryRelativeBias()
    attention_function: str = "softmax"
    attention_impl: str = "auto"
    norm: str = "layernorm"
    mlp_activation: str = "silu"

    final_norm = False
    mixes_segments = "its damped EMA is a convolution over the whole row"

    @property
    def qk_features(self) -> int:
        """z: `qk_dim`, or embed_dim / 4."""
        return self.qk_dim if self.qk_dim is not None else max(1, self.embed_dim // 4)

    @property
    def value_features(self) -> int:
        """v: `value_dim`, or 2·embed_dim (the paper's v = 2d)."""
        return self.value_dim if self.value_dim is not None else 2 * self.embed_dim

    @nn.nowrap
    def check(self) -> None:
        super().check()
        self.check_chunk_size(none_means="full Mega")
        if self.mlp_activation not in ELEMENTWISE_ACTIVATIONS:
            raise ValueError(f"{self.field_name('mlp_activation')} must be one of "
                             f"{tuple(ELEMENTWISE_ACTIVATIONS)}, got {self.mlp_activation!r}")
        if self.qk_features % 2 and isinstance(self.position, RotaryRelativeBias):
            raise ValueError(f"the rotary relative bias needs an even z: set "
                             f"{self.field_name('qk_dim')} (z = embed_dim / 4 = "
                             f"{self.qk_features} here)")
        if self.attention_function not in ATTENTION_FUNCTIONS:
            raise ValueError(f"{self.field_name('attention_function')} must be one of "
                             f"{ATTENTION_FUNCTIONS}, got {self.attention_function!r}")

    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward FLOPs per token at `length` (2 per multiply-add): the EMA (kernel once per
        sequence, FFT convolution estimate), the projections W_z, W_v, W_γ, W_φ, W_h, U_h,
        scores and values over the keys a query sees (its chunk for Mega-chunk), the FFN and the
        logits."""
        d, z, v = self.embed_dim, self.qk_features, self.value_features
        projections = 2.0 * (d * z + 3 * d * v + 2 * d * d)
        attention = 2.0 * (z + v) * self.mask.mean_keys_per_query(length)
        ffn = 4.0 * d * self.mlp_dim
        layer = ema_flops_per_token(d, self.ema_dim, length) + projections + attention + ffn
        return self.num_layers * layer + 2.0 * d * self.vocab_size

    def backbone(self, x: jnp.ndarray, positions: jnp.ndarray, *,
                 segment_ids: Optional[jnp.ndarray], deterministic: bool,
                 decode: bool) -> jnp.ndarray:
        mode = dict(dropout_rate=self.dropout_rate, dtype=self.compute_dtype,
                    deterministic=deterministic, decode=decode)
        layer = MegaLayer(qk_dim=self.qk_features, value_dim=self.value_features,
                          ema_dim=self.ema_dim, position=self.position_template, mask=self.mask,
                          attention_impl=self.attention_impl,
                          attention_function=self.attention_function, parent=None, **mode)
        block_cls = self.remat(MegaBlock, decode)
        for i in range(self.num_layers):
            x = block_cls(layer=layer, mlp_dim=self.mlp_dim, norm=self.norm,
                          mlp_activation=self.mlp_activation, name=f"layer_{i}",
                          **mode)(x, positions)
        return x
