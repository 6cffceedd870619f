"""The pre-norm Transformer block: self-attention and an MLP, each in a residual branch (and the
block that also cross-attends to a memory)."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from lexjax.attention import MaskSpec
from lexjax.layers.attention import CrossAttention, SelfAttention
from lexjax.layers.basic import Layer, make_norm, with_activation_axes
from lexjax.layers.mlp import MLP
from lexjax.positions import PositionScheme


class DecoderLayer(Layer, kw_only=True):
    """x + Attn(Norm(x)), then x + MLP(Norm(x)); `[batch, length, embed]` -> same.

    Returns `(x, None)`: a (carry, per-layer output) pair, so a stack can be `nn.scan`ned.
    """

    num_heads: int
    head_dim: int
    mlp_dim: int
    position: PositionScheme
    mask: MaskSpec
    num_kv_heads: Optional[int] = None
    norm: str = "rmsnorm"
    mlp_activation: str = "gelu"
    attention_impl: str = "auto"
    attention_block_size: Optional[int] = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray,
                 segment_ids: Optional[jnp.ndarray] = None):
        h = make_norm(self.norm, dtype=self.dtype, name="pre_attention_norm")(x)
        x = x + self.residual_dropout(self.attention(h, positions, segment_ids))
        return self.feed_forward(x), None

    def attention(self, h: jnp.ndarray, positions: jnp.ndarray,
                  segment_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        """The self-attention branch on normalized `h [batch, length, embed]`."""
        return SelfAttention(num_heads=self.num_heads, head_dim=self.head_dim,
                             position=self.position, mask=self.mask,
                             num_kv_heads=self.num_kv_heads, attention_impl=self.attention_impl,
                             block_size=self.attention_block_size, dtype=self.dtype,
                             decode=self.decode, name="attention")(h, positions, segment_ids)

    def feed_forward(self, x: jnp.ndarray) -> jnp.ndarray:
        """`x + MLP(Norm(x))`, the block's second residual branch."""
        h = make_norm(self.norm, dtype=self.dtype, name="pre_mlp_norm")(x)
        h = MLP(self.mlp_dim, self.mlp_activation, self.dropout_rate, self.dtype, name="mlp")(
            h, deterministic=self.deterministic)
        return with_activation_axes(x + self.residual_dropout(h))


class CrossDecoderLayer(DecoderLayer, kw_only=True):
    """A block that also reads a memory: x + SelfAttn(Norm(x)), x + CrossAttn(Norm(x), memory),
    then the MLP branch; `[batch, length, embed]` -> same (a pre-norm Transformer decoder
    block, bidirectional)."""

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray, segment_ids: jnp.ndarray,
                 memory: jnp.ndarray, memory_segments: jnp.ndarray) -> jnp.ndarray:
        """`segment_ids [batch, length]` and `memory_segments [batch, memory_length]` (int32,
        0 for padding) keep documents apart in both attentions."""
        h = make_norm(self.norm, dtype=self.dtype, name="pre_attention_norm")(x)
        x = x + self.residual_dropout(self.attention(h, positions, segment_ids))
        h = make_norm(self.norm, dtype=self.dtype, name="pre_cross_attention_norm")(x)
        cross = CrossAttention(num_heads=self.num_heads, head_dim=self.head_dim,
                               dtype=self.dtype, name="cross_attention")
        x = x + self.residual_dropout(cross(h, memory, segment_ids, memory_segments))
        return self.feed_forward(x)
