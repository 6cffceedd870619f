"""GSS and GSS-Transformer (Mehta, Gupta, Cutkosky, Neyshabur 2022, "Long Range Language
Modeling via Gated State Spaces"): attention-free LMs of gated state-space layers, and the hybrid
that interleaves Transformer blocks with chunked local attention.

One GSS layer (the paper's pseudocode, Fig. 1), `X [length, E] -> [length, E]`:

    X̃ = LN(X);  U = GELU(X̃ W_1) ∈ R^{L×F};  V = GELU(X̃ W_2) ∈ R^{L×H}
    Y = DSS(LN(V)) = K * LN(V) + D ⊙ LN(V)          (simplified DSS kernel, N modes)
    U_c = Y W_3 ∈ R^{L×F};  O = (U_c ⊙ U) W_4 + X

Size macros: EMBED_DIM = E, MLP_DIM = F (paper 4E), `ssm_dim` = H (default E / 4, the paper's
4x down-projection: H = 256 at E = 1024), `state_dim` = N (paper 512). GSS ignores NUM_HEADS;
GSS-Transformer uses it for its attention blocks. Projections are bias-free (the zoo's `dense`).

Decoding (`LanguageModel.prefill` / `decode_step`): each GSS layer keeps its SSM state (complex64
`[batch, H, N]`: O(1) memory in the length) and steps one token at a time; the hybrid's attention
blocks keep the keys and values of their current chunk. Neither model keeps packed documents
apart: the SSM's FFT convolution runs over the whole row.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import gin
import jax.numpy as jnp

from lexjax.layers import Layer, dense, make_norm, with_activation_axes
from lexjax.layers.basic import Dtype
from lexjax.layers.decoding import cached_recurrence
from lexjax.layers.ssm import SSM_CHANNELS, DiagonalSSM, ssm_flops_per_token
from lexjax.models.lm import AttentionLanguageModel, ChunkedAttention, LanguageModel
from lexjax.positions import PositionScheme, RoPE


def channel_layernorm(*, dtype: Dtype, name: str) -> nn.LayerNorm:
    """LayerNorm over SSM channels (scale and bias on the `ssm_channels` axis)."""
    return nn.LayerNorm(
        dtype=dtype, param_dtype=jnp.float32, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (SSM_CHANNELS,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (SSM_CHANNELS,)))


class GSSLayer(Layer, kw_only=True):
    """One gated state-space layer: `[batch, length, embed]` -> same (see the module docstring).

    With `decode=True` it takes one token `x [batch, 1, embed]` and advances the SSM state held in
    the "cache" collection (see `lexjax.layers.decoding`).
    """

    expansion_dim: int
    ssm_dim: int
    state_dim: int = 512
    ssm_variant: str = "gss"
    norm: str = "layernorm"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        h = make_norm(self.norm, dtype=self.dtype, name="norm")(x)
        u = nn.gelu(dense(self.expansion_dim, ("embed", "mlp"), dtype=self.dtype, name="wu")(h))
        u = with_activation_axes(u, ("activation_batch", "activation_length", "activation_mlp"))
        v = nn.gelu(dense(self.ssm_dim, ("embed", SSM_CHANNELS), dtype=self.dtype, name="wv")(h))
        v = channel_layernorm(dtype=self.dtype, name="ssm_norm")(v)
        ssm = DiagonalSSM(self.ssm_dim, self.state_dim, variant=self.ssm_variant, name="ssm")
        y = (cached_recurrence(self, v, name="ssm_state", forward=ssm,
                               initial_state=ssm.initial_state, step=ssm.step)
             if self.decode else ssm(v))
        uc = dense(self.expansion_dim, (SSM_CHANNELS, "mlp"), dtype=self.dtype,
                   name="wy")(y.astype(self.dtype))
        out = dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="wo")(uc * u)
        return with_activation_axes(x + self.residual_dropout(out))


def gss_layer_flops(embed_dim: int, expansion_dim: int, ssm_dim: int, state_dim: int,
                    length: int) -> float:
    """Forward FLOPs per token of one GSS layer: four projections and the SSM."""
    projections = 2.0 * (2 * embed_dim * expansion_dim + embed_dim * ssm_dim
                         + ssm_dim * expansion_dim)
    return projections + ssm_flops_per_token(ssm_dim, state_dim, length)


@gin.register(module="lexjax.models")
class GSS(LanguageModel, kw_only=True):
    """The GSS language model: int32 tokens `[batch, length]` -> float32 logits
    `[batch, length, vocab_size]`, causal, any length (no position scheme: the SSMs carry
    order). Pre-norm residual GSS layers, a final norm, tied logits.

    Attributes:
      mlp_dim: F, the gated width (paper 4E).
      ssm_dim: H, the SSM width (default embed_dim // 4).
      state_dim: N, complex modes per SSM channel (paper 512).
      ssm_variant: "gss" (the paper's simplified kernel and N(0, 1) init), "dss_exp",
        "s4d_lin" or "dss" (DSS_softmax: trains and scores, does not decode; see
        `lexjax.layers.ssm.DiagonalSSM`).
    """

    ssm_dim: Optional[int] = None
    state_dim: int = 512
    ssm_variant: str = "gss"
    norm: str = "layernorm"

    mixes_segments = "its state-space layers convolve over the whole row (an FFT convolution)"

    @property
    def ssm_channels(self) -> int:
        """H: `ssm_dim`, or embed_dim / 4 (the paper's H = 256 at E = 1024)."""
        return self.ssm_dim if self.ssm_dim is not None else max(1, self.embed_dim // 4)

    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward FLOPs per token at `length` (2 per multiply-add): projections, the SSM kernel
        (counted once per sequence), the FFT convolution estimate, the logits."""
        return (self.num_layers * self.gss_layer_flops(length)
                + 2.0 * self.embed_dim * self.vocab_size)

    @nn.nowrap
    def gss_layer_flops(self, length: int) -> float:
        return gss_layer_flops(self.embed_dim, self.mlp_dim, self.ssm_channels, self.state_dim,
                               length)

    def gss_layer(self, *, deterministic: bool, decode: bool, name: str) -> GSSLayer:
        """One GSS layer of this model's sizes (rematerialized in training)."""
        return self.remat(GSSLayer, decode)(
            expansion_dim=self.mlp_dim, ssm_dim=self.ssm_channels, state_dim=self.state_dim,
            ssm_variant=self.ssm_variant, norm=self.norm, dropout_rate=self.dropout_rate,
            dtype=self.compute_dtype, deterministic=deterministic, decode=decode, name=name)

    def backbone(self, x: jnp.ndarray, positions: jnp.ndarray, *,
                 segment_ids: Optional[jnp.ndarray], deterministic: bool,
                 decode: bool) -> jnp.ndarray:
        for i in range(self.num_layers):
            x = self.gss_layer(deterministic=deterministic, decode=decode, name=f"layer_{i}")(x)
        return x


@gin.register(module="lexjax.models")
class GSSTransformer(ChunkedAttention, GSS, AttentionLanguageModel, kw_only=True):
    """GSS-Transformer-Hybrid: GSS layers interleaved with Transformer blocks (pre-norm
    attention + MLP, `lexjax.layers.DecoderLayer`) whose causal attention stays inside
    non-overlapping chunks of `chunk_size` tokens (paper 512) — linear in the length.

    Layer i is a Transformer block iff `i % attention_every == 1 % attention_every` (default 4:
    layers 1, 5, 9, ... — a sparse interleaving; every=1 makes every layer attention); all others
    are GSS layers. The attention blocks use `num_heads` heads and `position` (a zoo scheme;
    its `embed` hook, if any, is added at the bottom). Other attributes as `GSS`.
    """

    chunk_size: int = 512
    attention_every: int = 4
    position: PositionScheme = RoPE()

    @nn.nowrap
    def check(self) -> None:
        super().check()
        self.check_chunk_size(none_means=None)
        if self.attention_every < 1:
            raise ValueError(f"attention_every must be >= 1, got {self.attention_every}")

    @nn.nowrap
    def is_attention_layer(self, i: int) -> bool:
        """Whether layer i is a (chunked-attention) Transformer block."""
        return i % self.attention_every == 1 % self.attention_every

    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward FLOPs per token at `length`: GSS layers as `GSS.flops_per_token`, attention
        blocks as the Transformer's (projections, MLP, scores and values over the keys a query
        sees in its chunk)."""
        attention = 2.0 * self.block_macs(self.mask.mean_keys_per_query(length))
        total = sum(attention if self.is_attention_layer(i) else self.gss_layer_flops(length)
                    for i in range(self.num_layers))
        return total + 2.0 * self.embed_dim * self.vocab_size

    def backbone(self, x: jnp.ndarray, positions: jnp.ndarray, *,
                 segment_ids: Optional[jnp.ndarray], deterministic: bool,
                 decode: bool) -> jnp.ndarray:
        for i in range(self.num_layers):
            if self.is_attention_layer(i):
                x, _ = self.decoder_layer(self.mask, deterministic=deterministic, decode=decode,
                                          name=f"layer_{i}")(x, positions)
            else:
                x = self.gss_layer(deterministic=deterministic, decode=decode,
                                   name=f"layer_{i}")(x)
        return x
