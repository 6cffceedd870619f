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

Incremental decoding (GSS): `init_cache(batch)` gives the "cache" collection (per layer the SSM
state, complex64 `[batch, H, N]`: O(1) memory in the length), and

    logits, vars = model.apply({"params": p, "cache": cache}, token[:, None], decode=True,
                               mutable=["cache"])

returns the logits of the next position and the advanced cache (`vars["cache"]`).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import gin
import jax.numpy as jnp
import numpy as np

from lexjax.attention import MaskSpec
from lexjax.layers import compute_dtype, dense, make_norm, with_activation_axes
from lexjax.layers.basic import Dtype
from lexjax.layers.ssm import SSM_CHANNELS, DiagonalSSM, ssm_flops_per_token
from lexjax.models.lm import check_remat, embed_tokens, empty_cache, output_logits
from lexjax.models.transformer import REMAT_POLICIES, DecoderLayer
from lexjax.positions import PositionScheme, RoPE


def channel_layernorm(*, dtype: Dtype, name: str) -> nn.LayerNorm:
    """LayerNorm over SSM channels (scale and bias on the `ssm_channels` axis)."""
    return nn.LayerNorm(
        dtype=dtype, param_dtype=jnp.float32, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (SSM_CHANNELS,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (SSM_CHANNELS,)))


class GSSLayer(nn.Module):
    """One gated state-space layer: `[batch, length, embed]` -> same (see the module docstring).

    With `decode=True` it takes one token `x [batch, 1, embed]` and advances the SSM state held in
    the "cache" collection (created, not advanced, by the call that creates the collection).
    """

    expansion_dim: int
    ssm_dim: int
    state_dim: int = 512
    ssm_variant: str = "gss"
    norm: str = "layernorm"
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        h = make_norm(self.norm, dtype=self.dtype, name="norm")(x)
        u = nn.gelu(dense(self.expansion_dim, ("embed", "mlp"), dtype=self.dtype, name="wu")(h))
        u = nn.with_logical_constraint(u, ("activation_batch", "activation_length",
                                           "activation_mlp"))
        v = nn.gelu(dense(self.ssm_dim, ("embed", SSM_CHANNELS), dtype=self.dtype, name="wv")(h))
        v = channel_layernorm(dtype=self.dtype, name="ssm_norm")(v)
        ssm = DiagonalSSM(self.ssm_dim, self.state_dim, variant=self.ssm_variant, name="ssm")
        y = self.recurrent_step(ssm, v) if self.decode else ssm(v)
        uc = dense(self.expansion_dim, (SSM_CHANNELS, "mlp"), dtype=self.dtype,
                   name="wy")(y.astype(self.dtype))
        out = dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="wo")(uc * u)
        out = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(
            out, deterministic=self.deterministic)
        return with_activation_axes(x + out)

    def recurrent_step(self, ssm: DiagonalSSM, v: jnp.ndarray) -> jnp.ndarray:
        """`v [batch, 1, H]` -> float32 `[batch, 1, H]` from the cached SSM state."""
        if v.shape[1] != 1:
            raise ValueError(f"decode=True takes one token per call, got length {v.shape[1]}")
        initialized = self.has_variable("cache", "ssm_state")
        state = self.variable("cache", "ssm_state", ssm.initial_state, v.shape[0])
        y, new_state = ssm.step(v[:, 0], state.value)
        if initialized:
            state.value = new_state
        return y[:, None]


def gss_layer_flops(embed_dim: int, expansion_dim: int, ssm_dim: int, state_dim: int,
                    length: int) -> float:
    """Forward FLOPs per token of one GSS layer: four projections and the SSM."""
    projections = 2.0 * (2 * embed_dim * expansion_dim + embed_dim * ssm_dim
                         + ssm_dim * expansion_dim)
    return projections + ssm_flops_per_token(ssm_dim, state_dim, length)


@gin.configurable(module="lexjax.models")
class GSS(nn.Module):
    """The GSS language model: int32 tokens `[batch, length]` -> float32 logits
    `[batch, length, vocab_size]`, causal, any length (no position embedding: the SSMs carry
    order). Pre-norm residual GSS layers, a final norm, tied logits.

    Attributes:
      mlp_dim: F, the gated width (paper 4E).
      ssm_dim: H, the SSM width (default embed_dim // 4).
      state_dim: N, complex modes per SSM channel (paper 512).
      ssm_variant: "gss" (the paper's simplified kernel and N(0, 1) init), "dss" or "s4d_lin"
        (see `lexjax.layers.ssm.DiagonalSSM`).
      remat_policy: one of `REMAT_POLICIES` (training only).
    """

    vocab_size: int
    num_layers: int
    embed_dim: int
    mlp_dim: int
    ssm_dim: Optional[int] = None
    state_dim: int = 512
    ssm_variant: str = "gss"
    norm: str = "layernorm"
    tie_embeddings: bool = True
    dropout_rate: float = 0.0
    dtype: str = "float32"
    remat_policy: str = "none"

    @property
    def ssm_channels(self) -> int:
        """H: `ssm_dim`, or embed_dim / 4 (the paper's H = 256 at E = 1024)."""
        return self.ssm_dim if self.ssm_dim is not None else max(1, self.embed_dim // 4)

    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward FLOPs per token at `length` (2 per multiply-add): projections, the SSM kernel
        (counted once per sequence), the FFT convolution estimate, the logits."""
        layer = gss_layer_flops(self.embed_dim, self.mlp_dim, self.ssm_channels, self.state_dim,
                                length)
        return self.num_layers * layer + 2.0 * self.embed_dim * self.vocab_size

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
        dtype = compute_dtype(self.dtype)
        positions = np.arange(tokens.shape[1], dtype=np.int32)
        embedding, x = embed_tokens(self, tokens, positions, None, deterministic)
        layer_cls = GSSLayer
        if self.remat_policy != "none" and not decode:
            layer_cls = nn.remat(GSSLayer, policy=REMAT_POLICIES[self.remat_policy])
        for i in range(self.num_layers):
            x = layer_cls(self.mlp_dim, self.ssm_channels, self.state_dim, self.ssm_variant,
                          self.norm, self.dropout_rate, dtype, deterministic, decode,
                          name=f"layer_{i}")(x)
        x = make_norm(self.norm, dtype=dtype, name="final_norm")(x)
        return output_logits(self, embedding, x)


@gin.configurable(module="lexjax.models")
class GSSTransformer(nn.Module):
    """GSS-Transformer-Hybrid: GSS layers interleaved with Transformer blocks (pre-norm
    attention + MLP, `lexjax.models.DecoderLayer`) whose causal attention stays inside
    non-overlapping chunks of `chunk_size` tokens (paper 512) — linear in the length.

    Layer i is a Transformer block iff `i % attention_every == 1 % attention_every` (default 4:
    layers 1, 5, 9, ... — a sparse interleaving; every=1 makes every layer attention); all others
    are GSS layers. The attention blocks use `num_heads` heads and `position` (a zoo scheme;
    its `embed` hook, if any, is added at the bottom). Other attributes as `GSS`.
    """

    vocab_size: int
    num_layers: int
    embed_dim: int
    num_heads: int
    mlp_dim: int
    chunk_size: int = 512
    attention_every: int = 4
    position: PositionScheme = RoPE()
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    attention_impl: str = "auto"
    ssm_dim: Optional[int] = None
    state_dim: int = 512
    ssm_variant: str = "gss"
    norm: str = "layernorm"
    tie_embeddings: bool = True
    dropout_rate: float = 0.0
    dtype: str = "float32"
    remat_policy: str = "none"

    @property
    def ssm_channels(self) -> int:
        """H: `ssm_dim`, or embed_dim / 4."""
        return self.ssm_dim if self.ssm_dim is not None else max(1, self.embed_dim // 4)

    @property
    def mask(self) -> MaskSpec:
        """The attention blocks' mask: causal within chunks of `chunk_size`."""
        return MaskSpec(causal=True, chunk=self.chunk_size)

    @nn.nowrap
    def is_attention_layer(self, i: int) -> bool:
        """Whether layer i is a (chunked-attention) Transformer block."""
        if self.attention_every < 1:
            raise ValueError(f"attention_every must be >= 1, got {self.attention_every}")
        return i % self.attention_every == 1 % self.attention_every

    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward FLOPs per token at `length`: GSS layers as `GSS.flops_per_token`, attention
        blocks as the Transformer's (projections, MLP, scores and values over the keys a query
        sees in its chunk)."""
        head_dim = self.head_dim or self.embed_dim // self.num_heads
        kv_heads = self.num_kv_heads or self.num_heads
        attention = 2.0 * (self.embed_dim * head_dim * 2 * (self.num_heads + kv_heads)
                           + 2 * self.embed_dim * self.mlp_dim
                           + 2 * self.num_heads * head_dim * self.mask.mean_keys_per_query(length))
        gss = gss_layer_flops(self.embed_dim, self.mlp_dim, self.ssm_channels, self.state_dim,
                              length)
        total = sum(attention if self.is_attention_layer(i) else gss
                    for i in range(self.num_layers))
        return total + 2.0 * self.embed_dim * self.vocab_size

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, *, deterministic: bool = True) -> jnp.ndarray:
        """`tokens [batch, length]` -> float32 logits `[batch, length, vocab]`."""
        check_remat(self.remat_policy)
        dtype = compute_dtype(self.dtype)
        positions = np.arange(tokens.shape[1], dtype=np.int32)
        embedding, x = embed_tokens(self, tokens, positions, self.position, deterministic)
        gss_cls, attention_cls = GSSLayer, DecoderLayer
        if self.remat_policy != "none":
            policy = REMAT_POLICIES[self.remat_policy]
            gss_cls = nn.remat(GSSLayer, policy=policy)
            attention_cls = nn.remat(DecoderLayer, policy=policy)
        for i in range(self.num_layers):
            if self.is_attention_layer(i):
                x, _ = attention_cls(
                    num_heads=self.num_heads,
                    head_dim=self.head_dim or self.embed_dim // self.num_heads,
                    mlp_dim=self.mlp_dim, position=self.position, mask=self.mask,
                    num_kv_heads=self.num_kv_heads, norm=self.norm,
                    dropout_rate=self.dropout_rate, attention_impl=self.attention_impl,
                    dtype=dtype, deterministic=deterministic, name=f"layer_{i}")(x, positions)
            else:
                x = gss_cls(self.mlp_dim, self.ssm_channels, self.state_dim, self.ssm_variant,
                            self.norm, self.dropout_rate, dtype, deterministic,
                            name=f"layer_{i}")(x)
        x = make_norm(self.norm, dtype=dtype, name="final_norm")(x)
        return output_logits(self, embedding, x)
