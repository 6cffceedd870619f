"""SPADE (Zuo et al. 2022, "Efficient Long Sequence Modeling via State Space Augmented
Transformer"): a Transformer whose attention is local everywhere, with a state-space branch added
to the bottom layer for global information.

Bottom layer (the reference's `SpadeDecoderLayerBase` with an S4 module, `concat` combine):

    x̃ = LN(x);  g = GELU(SSM(x̃)) W_g  (global);  l = LocalAttn(x̃)  (local)
    x = x + W_c [LN_g(g); LN_l(l)];  x = x + FFN(LN(x))

All other layers: pre-norm Transformer blocks with local attention only (`DecoderLayer`). The
reference's `run_lm.sh` puts the S4 branch on layer 0 only (`s4_every_n_layers` = 100); so does
this model. Local attention is a causal sliding window of `chunk_size` tokens (the reference's
radius 511 = window 512) or, with `local_attention="chunk"`, non-overlapping chunks; either way
the cost is linear in the length.

The SSM is S4's diagonal counterpart (PAPERS.md §11: JAX has no Cauchy kernel, so a DSS/S4D
Vandermonde kernel): `DiagonalSSM` with `ssm_variant="dss"` (skew-HiPPO eigenvalues = S4D-LegS,
the diagonal part of S4's HiPPO-LegS), N = 64 modes, one SSM per channel, Δ ∈ [1e-3, 1e-1].

Size macros: NUM_LAYERS, EMBED_DIM, NUM_HEADS (the attention heads of every layer), MLP_DIM,
CHUNK_SIZE (the local window / chunk); position scheme POSITION (default T5 buckets, as the
reference: 32 buckets, max distance 128).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import gin
import jax.numpy as jnp
import numpy as np

from lexjax.attention import MaskSpec
from lexjax.layers import (MLP, SelfAttention, compute_dtype, dense, make_norm,
                           with_activation_axes)
from lexjax.layers.basic import Dtype
from lexjax.layers.ssm import SSM_CHANNELS, DiagonalSSM, ssm_flops_per_token
from lexjax.models.lm import check_remat, embed_tokens, output_logits
from lexjax.models.transformer import REMAT_POLICIES, DecoderLayer
from lexjax.positions import PositionScheme, T5Buckets

LOCAL_KINDS = ("window", "chunk")


class SpadeBottomLayer(nn.Module):
    """The SSM-augmented layer: `x [batch, length, embed]`, `positions [length]` -> same."""

    num_heads: int
    head_dim: int
    mlp_dim: int
    position: PositionScheme
    mask: MaskSpec
    state_dim: int = 64
    ssm_variant: str = "dss"
    num_kv_heads: Optional[int] = None
    norm: str = "layernorm"
    mlp_activation: str = "gelu"
    dropout_rate: float = 0.0
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray):
        d = x.shape[-1]
        drop = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))
        h = make_norm(self.norm, dtype=self.dtype, name="pre_attention_norm")(x)
        ssm = DiagonalSSM(d, self.state_dim, variant=self.ssm_variant, name="ssm")
        g = nn.gelu(ssm(h)).astype(self.dtype)
        g = dense(d, (SSM_CHANNELS, "embed"), dtype=self.dtype, name="ssm_out")(g)
        local = SelfAttention(num_heads=self.num_heads, head_dim=self.head_dim,
                              position=self.position, mask=self.mask,
                              num_kv_heads=self.num_kv_heads, impl=self.attention_impl,
                              dtype=self.dtype, name="attention")(h, positions)
        both = jnp.concatenate([make_norm(self.norm, dtype=self.dtype, name="global_norm")(g),
                                make_norm(self.norm, dtype=self.dtype, name="local_norm")(local)],
                               axis=-1)
        combined = dense(d, ("mlp", "embed"), dtype=self.dtype, name="combine")(both)
        x = x + drop(combined, deterministic=self.deterministic)
        h = make_norm(self.norm, dtype=self.dtype, name="pre_mlp_norm")(x)
        h = MLP(self.mlp_dim, self.mlp_activation, self.dropout_rate, self.dtype, name="mlp")(
            h, deterministic=self.deterministic)
        return with_activation_axes(x + drop(h, deterministic=self.deterministic)), None


@gin.configurable(module="lexjax.models")
class Spade(nn.Module):
    """The SPADE language model: int32 tokens `[batch, length]` -> float32 logits
    `[batch, length, vocab_size]`, causal, any length, linear time.

    Attributes:
      chunk_size: the local attention's window (or chunk) in tokens.
      local_attention: "window" (sliding, the reference's) or "chunk" (non-overlapping).
      state_dim: complex modes per SSM channel (the reference's S4 state 64).
      ssm_variant: see `lexjax.layers.ssm.DiagonalSSM` ("dss" = S4D-LegS).
      position: the zoo scheme of every attention layer (default T5 buckets).
      remat_policy: one of `REMAT_POLICIES`.
    """

    vocab_size: int
    num_layers: int
    embed_dim: int
    num_heads: int
    mlp_dim: int
    chunk_size: int = 512
    local_attention: str = "window"
    state_dim: int = 64
    ssm_variant: str = "dss"
    position: PositionScheme = T5Buckets()
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    attention_impl: str = "auto"
    norm: str = "layernorm"
    mlp_activation: str = "gelu"
    tie_embeddings: bool = True
    dropout_rate: float = 0.0
    dtype: str = "float32"
    remat_policy: str = "none"

    @property
    def mask(self) -> MaskSpec:
        """Causal local attention: a window of `chunk_size` tokens, or chunks of that size."""
        if self.local_attention not in LOCAL_KINDS:
            raise ValueError(f"Spade.local_attention must be one of {LOCAL_KINDS}, got "
                             f"{self.local_attention!r}")
        return MaskSpec(causal=True, **{self.local_attention: self.chunk_size})

    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward FLOPs per token at `length` (2 per multiply-add): every layer's attention
        projections, scores and values over its window, MLP; the bottom layer's SSM (kernel once
        per sequence, FFT convolution estimate), its output and the 2d -> d combination."""
        d = self.embed_dim
        head_dim = self.head_dim or d // self.num_heads
        kv_heads = self.num_kv_heads or self.num_heads
        mlp_factor = 3 if self.mlp_activation == "swiglu" else 2
        layer = 2.0 * (d * head_dim * 2 * (self.num_heads + kv_heads)
                       + mlp_factor * d * self.mlp_dim
                       + 2 * self.num_heads * head_dim * self.mask.mean_keys_per_query(length))
        bottom_extra = ssm_flops_per_token(d, self.state_dim, length) + 2.0 * 3 * d * d
        return self.num_layers * layer + bottom_extra + 2.0 * d * self.vocab_size

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, *, deterministic: bool = True) -> jnp.ndarray:
        """`tokens [batch, length]` -> float32 logits `[batch, length, vocab]`."""
        check_remat(self.remat_policy)
        dtype = compute_dtype(self.dtype)
        positions = np.arange(tokens.shape[1], dtype=np.int32)
        embedding, x = embed_tokens(self, tokens, positions, self.position, deterministic)
        common = dict(num_heads=self.num_heads,
                      head_dim=self.head_dim or self.embed_dim // self.num_heads,
                      mlp_dim=self.mlp_dim, position=self.position, mask=self.mask,
                      num_kv_heads=self.num_kv_heads, norm=self.norm,
                      mlp_activation=self.mlp_activation, dropout_rate=self.dropout_rate,
                      attention_impl=self.attention_impl, dtype=dtype,
                      deterministic=deterministic)
        bottom_cls, layer_cls = SpadeBottomLayer, DecoderLayer
        if self.remat_policy != "none":
            policy = REMAT_POLICIES[self.remat_policy]
            bottom_cls = nn.remat(SpadeBottomLayer, policy=policy)
            layer_cls = nn.remat(DecoderLayer, policy=policy)
        for i in range(self.num_layers):
            if i == 0:
                x, _ = bottom_cls(state_dim=self.state_dim, ssm_variant=self.ssm_variant,
                                  name="layer_0", **common)(x, positions)
            else:
                x, _ = layer_cls(name=f"layer_{i}", **common)(x, positions)
        x = make_norm(self.norm, dtype=dtype, name="final_norm")(x)
        return output_logits(self, embedding, x)
