"""FLASH and FLASH-Quad (Hua et al. 2022): language models built from gated attention units.

One GAU (`lexjax.layers.GatedAttentionUnit`) replaces a Transformer block's attention *and* MLP
with about half its parameters, so a FLASH model of a Transformer's size stacks twice as many
layers. The size macros keep that accounting: with NUM_LAYERS = L, EMBED_DIM = d and MLP_DIM = m
the model stacks 2L GAUs of expansion e = m / 2 (the paper's e = 2d at the usual m = 4d) and
s = 128: 2L · (3dm/2 + ds) parameters against the Transformer's L · (4d² + 2dm); equal up to
the small Z projection (2Lds) when m = 4d. NUM_HEADS is ignored (a GAU has one head).
`chunk_size` picks the attention: C for FLASH (mixed chunk attention, linear in length), None
for FLASH-Quad (full quadratic attention).

Decoding (`LanguageModel.prefill` / `decode_step`): FLASH keeps per unit the current chunk's keys
and values and the cross-chunk state (O(C) memory at any length) and steps one token at a time;
FLASH-Quad keeps every key and value. FLASH-Quad keeps packed documents apart (a query sees, and
its normaliser counts, the keys of its own document); FLASH cannot: mixed chunk attention's
linear part sums states over all earlier chunks of the row.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import gin
import jax.numpy as jnp

from lexjax.layers import Layer, make_norm, with_activation_axes
from lexjax.layers.gau import GatedAttentionUnit
from lexjax.models.lm import ChunkedAttention, LanguageModel
from lexjax.positions import PositionScheme, RoPE


class FlashLayer(Layer, kw_only=True):
    """Pre-norm residual GAU: x + GAU(Norm(x)); `[batch, length, embed]` -> same."""

    expansion_dim: int
    qk_dim: int
    position: PositionScheme
    chunk_size: Optional[int]
    quadratic_block_size: Optional[int] = None
    norm: str = "rmsnorm"
    score_bias: Optional[PositionScheme] = None
    quadratic_length: Optional[int] = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray,
                 segment_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        h = make_norm(self.norm, dtype=self.dtype, name="pre_norm")(x)
        h = GatedAttentionUnit(expansion_dim=self.expansion_dim, qk_dim=self.qk_dim,
                               position=self.position, chunk_size=self.chunk_size, causal=True,
                               quadratic_block_size=self.quadratic_block_size,
                               decode=self.decode, score_bias=self.score_bias,
                               quadratic_length=self.quadratic_length,
                               dtype=self.dtype, name="gau")(h, positions, segment_ids)
        return with_activation_axes(x + self.residual_dropout(h))


@gin.register(module="lexjax.models")
class Flash(ChunkedAttention, LanguageModel, kw_only=True):
    """Decoder-only GAU language model: int32 tokens `[batch, length]` -> float32 logits
    `[batch, length, vocab_size]`, causal.

    Attributes:
      num_layers: Transformer-equivalent depth L; the model stacks `units_per_layer * L` GAUs.
      embed_dim: d.
      mlp_dim: the Transformer MLP width m these layers stand in for; each GAU's expansion is
        e = m / units_per_layer (m / 2 by default: the paper's e = 2d at m = 4d).
      chunk_size: C of mixed chunk attention (FLASH; paper 256), or None for FLASH-Quad.
      qk_dim: s, the shared query/key width (paper 128).
      units_per_layer: GAUs per Transformer-equivalent layer (2, paper).
      position: the position scheme (RoPE by default, as in the paper).
      score_bias: a second scheme whose relative bias is added as the paper's learned b (the gin
        configs: one-head T5 buckets); None leaves only `position`'s hooks.
      attention_block_size: FLASH-Quad's query block length (memory O(block · length)).
      quadratic_length: FLASH-Quad's T in relu²(q kᵀ / T + b): a constant, the paper's
        (padded) training length (512), or None: the keys a query sees (t + 1; the scores keep
        their scale at any length, as Mega's element attention).
    """

    chunk_size: Optional[int] = 256
    qk_dim: int = 128
    units_per_layer: int = 2
    position: PositionScheme = RoPE()
    score_bias: Optional[PositionScheme] = None
    attention_block_size: Optional[int] = 512
    quadratic_length: Optional[int] = 512

    @property
    def mixes_segments(self) -> Optional[str]:
        """FLASH-Quad keeps packed documents apart; FLASH cannot."""
        if self.chunk_size is None:
            return None
        return ("mixed chunk attention's linear part sums key-value states over all earlier "
                "chunks of the row (FLASH-Quad, CHUNK_SIZE=None, keeps documents apart)")

    @property
    def decodes_chunks(self) -> bool:
        """FLASH-Quad decodes (and prefills) many tokens per call; FLASH one."""
        return self.chunk_size is None

    @property
    def num_units(self) -> int:
        """The number of GAUs stacked."""
        return self.num_layers * self.units_per_layer

    @property
    def expansion_dim(self) -> int:
        """e of every GAU: the MLP width shared among the units of one layer (m / 2 by default)."""
        return self.mlp_dim // self.units_per_layer

    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward matmul FLOPs per token at sequence `length` (2 per multiply-add): projections
        d(3e + s); scores and A·V (s + e) per visible key (within the chunk for FLASH); FLASH's
        linear part 2se (the chunk state K_lin,gᵀ V_g and the query against it); logits."""
        d, e, s = self.embed_dim, self.expansion_dim, self.qk_dim
        linear = 0 if self.chunk_size is None else 2 * s * e
        unit = d * (3 * e + s) + (s + e) * self.mask.mean_keys_per_query(length) + linear
        return 2.0 * (self.num_units * unit + d * self.vocab_size)

    @nn.nowrap
    def check(self) -> None:
        super().check()
        if self.units_per_layer < 1 or self.mlp_dim < self.units_per_layer:
            raise ValueError(f"need units_per_layer >= 1 and mlp_dim >= units_per_layer, got "
                             f"{self.units_per_layer} and {self.mlp_dim}")
        self.check_chunk_size(none_means="FLASH-Quad")
        if self.quadratic_length is not None and not (
                isinstance(self.quadratic_length, int) and self.quadratic_length > 0):
            raise ValueError(f"{self.field_name('quadratic_length')} must be a positive int "
                             f"(T, the training length) or None (the keys in view), got "
                             f"{self.quadratic_length!r}")

    def backbone(self, x: jnp.ndarray, positions: jnp.ndarray, *,
                 segment_ids: Optional[jnp.ndarray], deterministic: bool,
                 decode: bool) -> jnp.ndarray:
        layer_cls = self.remat(FlashLayer, decode)
        for i in range(self.num_units):
            x = layer_cls(expansion_dim=self.expansion_dim, qk_dim=self.qk_dim,
                          position=self.position_template, chunk_size=self.chunk_size,
                          quadratic_block_size=self.attention_block_size, norm=self.norm,
                          dropout_rate=self.dropout_rate, decode=decode,
                          deterministic=deterministic, score_bias=self.score_bias,
                          quadratic_length=self.quadratic_length,
                          dtype=self.compute_dtype, name=f"unit_{i}")(x, positions,
                                                                      segment_ids)
        return x
