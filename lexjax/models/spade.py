"""SPADE (Zuo et al. 2022, "Efficient Long Sequence Modeling via State Space Augmented
Transformer"): a Transformer whose attention is local everywhere, with a state-space branch added
to the bottom layer for global information.

Bottom layer (the reference's `SpadeDecoderLayerBase` with an S4 module, `concat` combine):

    x̃ = LN(x);  g = SSM(x̃) = K ∗ x̃ + D ⊙ x̃  (global);  l = LocalAttn(x̃)  (local)
    x = x + W_c [LN_g(g); LN_l(l)];  x = x + FFN(LN(x))

The SSM output goes to its norm as it is: the reference builds its S4 module with
`use_pointwise=False` (`spade-modules/s4.py` @0819294), so no activation or output projection
follows the convolution.

All other layers: pre-norm Transformer blocks with local attention only (`DecoderLayer`). The
reference's `run_lm.sh` puts the S4 branch on layer 0 only (`s4_every_n_layers` = 100); so does
this model. Local attention is a causal sliding window of `chunk_size` tokens (the reference's
radius 511 = window 512) or, with `local_attention="chunk"`, non-overlapping chunks; either way
the cost is linear in the length.

The SSM is S4's diagonal counterpart (JAX has no Cauchy kernel, so a DSS/S4D
Vandermonde kernel): `DiagonalSSM` with `ssm_variant="dss_exp"` (skew-HiPPO eigenvalues =
S4D-LegS, the diagonal part of S4's HiPPO-LegS), 32 complex modes (the reference's `d_state`
64: S4 keeps N/2 modes of each conjugate pair), one SSM per channel, Δ ∈ [1e-3, 1e-1]. The
reference's eigenvalues are learned per channel (`n_ssm` = the width); here they are shared by the channels
and only Δ, C and D are per channel.

Size macros: NUM_LAYERS, EMBED_DIM, NUM_HEADS (the attention heads of every layer), MLP_DIM,
CHUNK_SIZE (the local window / chunk); position scheme POSITION (default T5 buckets, as the
reference: 32 buckets, max distance 128, one table shared by all layers).

Decoding (`LanguageModel.prefill` / `decode_step`): the bottom layer's SSM state and every
layer's keys and values of the last `chunk_size` tokens, one token per call. SPADE cannot keep
packed documents apart: the bottom layer's SSM convolves over the whole row.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import gin
import jax.numpy as jnp

from lexjax.attention import MaskSpec
from lexjax.layers import dense, make_norm
from lexjax.layers.decoder import DecoderLayer
from lexjax.layers.decoding import cached_recurrence
from lexjax.layers.ssm import DiagonalSSM, ssm_flops_per_token
from lexjax.models.lm import AttentionLanguageModel
from lexjax.positions import PositionScheme, T5Buckets

LOCAL_KINDS = ("window", "chunk")


class SpadeBottomLayer(DecoderLayer, kw_only=True):
    """The SSM-augmented layer: `x [batch, length, embed]`, `positions [length]` -> same; the
    fields of a `DecoderLayer` plus its state-space model's."""

    state_dim: int = 32
    ssm_variant: str = "dss_exp"

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray,
                 segment_ids: Optional[jnp.ndarray] = None):
        d = x.shape[-1]
        h = make_norm(self.norm, dtype=self.dtype, name="pre_attention_norm")(x)
        ssm = DiagonalSSM(d, self.state_dim, variant=self.ssm_variant, name="ssm")
        g = (cached_recurrence(self, h, name="ssm_state", forward=ssm,
                               initial_state=ssm.initial_state, step=ssm.step)
             if self.decode else ssm(h)).astype(self.dtype)
        local = self.attention(h, positions, segment_ids)
        both = jnp.concatenate([make_norm(self.norm, dtype=self.dtype, name="global_norm")(g),
                                make_norm(self.norm, dtype=self.dtype, name="local_norm")(local)],
                               axis=-1)
        combined = dense(d, ("mlp", "embed"), dtype=self.dtype, name="combine")(both)
        return self.feed_forward(x + self.residual_dropout(combined)), None


@gin.register(module="lexjax.models")
class Spade(AttentionLanguageModel, kw_only=True):
    """The SPADE language model: int32 tokens `[batch, length]` -> float32 logits
    `[batch, length, vocab_size]`, causal, any length, linear time.

    Attributes:
      chunk_size: the local attention's window (or chunk) in tokens.
      local_attention: "window" (sliding, the reference's) or "chunk" (non-overlapping).
      state_dim: complex modes per SSM channel (32: the reference's S4 `d_state` 64 counts
        both members of each conjugate pair).
      ssm_variant: see `lexjax.layers.ssm.DiagonalSSM` ("dss_exp" = S4D-LegS).
      position: the zoo scheme of every attention layer (default T5 buckets).
      share_relative_bias: one relative-bias table for all layers (default True: the reference
        computes layer 0's T5 bias and hands it up the stack).
    """

    chunk_size: int = 512
    local_attention: str = "window"
    state_dim: int = 32
    ssm_variant: str = "dss_exp"
    position: PositionScheme = T5Buckets()
    share_relative_bias: bool = True
    norm: str = "layernorm"

    mixes_segments = "its bottom layer's state-space model convolves over the whole row"

    @property
    def mask(self) -> MaskSpec:
        """Causal local attention: a window of `chunk_size` tokens, or chunks of that size."""
        return MaskSpec(causal=True, **{self.local_attention: self.chunk_size})

    @nn.nowrap
    def check(self) -> None:
        super().check()
        if self.local_attention not in LOCAL_KINDS:
            raise ValueError(f"Spade.local_attention must be one of {LOCAL_KINDS}, got "
                             f"{self.local_attention!r}")

    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward FLOPs per token at `length` (2 per multiply-add): every layer's attention
        projections, scores and values over its window, MLP; the bottom layer's SSM (kernel once
        per sequence, FFT convolution estimate) and the 2d -> d combination."""
        d = self.embed_dim
        layer = 2.0 * self.block_macs(self.mask.mean_keys_per_query(length))
        bottom_extra = ssm_flops_per_token(d, self.state_dim, length) + 2.0 * 2 * d * d
        return self.num_layers * layer + bottom_extra + 2.0 * d * self.vocab_size

    def backbone(self, x: jnp.ndarray, positions: jnp.ndarray, *,
                 segment_ids: Optional[jnp.ndarray], deterministic: bool,
                 decode: bool) -> jnp.ndarray:
        bottom = self.remat(SpadeBottomLayer, decode)(
            state_dim=self.state_dim, ssm_variant=self.ssm_variant, name="layer_0",
            **self.decoder_layer_fields(self.mask, deterministic, decode))
        x, _ = bottom(x, positions)
        for i in range(1, self.num_layers):
            x, _ = self.decoder_layer(self.mask, deterministic=deterministic, decode=decode,
                                      name=f"layer_{i}")(x, positions)
        return x
