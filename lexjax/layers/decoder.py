"""The Transformer block: self-attention and an MLP, each in a residual branch, pre-norm (the
default), post-norm (BERT) or in parallel (GPT-NeoX); and the block that also cross-attends to a
memory."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from lexjax.attention import MaskSpec
from lexjax.layers.attention import CrossAttention, SelfAttention
from lexjax.layers.basic import Layer, make_norm, with_activation_axes
from lexjax.layers.mlp import MLP
from lexjax.positions import PositionScheme


NORM_POSITIONS = ("pre", "post")


class DecoderLayer(Layer, kw_only=True):
    """x + Attn(Norm(x)), then x + MLP(Norm(x)); `[batch, length, embed]` -> same.

    `norm_position="post"`: Norm(x + Attn(x)), then Norm(x + MLP(x)) (BERT, RoFormer).
    `parallel`: x + Attn(Norm(x)) + MLP(Norm'(x)), two norms (GPT-NeoX, GPT-J-style blocks).
    `use_bias`: the attention and MLP projections have biases.

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
    norm_position: str = "pre"
    parallel: bool = False
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray,
                 segment_ids: Optional[jnp.ndarray] = None):
        if self.norm_position == "post":
            h = x + self.residual_dropout(self.attention(x, positions, segment_ids))
            x = make_norm(self.norm, dtype=self.dtype, name="post_attention_norm")(h)
            return self.feed_forward(x), None
        h = make_norm(self.norm, dtype=self.dtype, name="pre_attention_norm")(x)
        attention = self.residual_dropout(self.attention(h, positions, segment_ids))
        if self.parallel:
            return with_activation_axes(x + attention + self.mlp_branch(x)), None
        return self.feed_forward(x + attention), None

    def __post_init__(self):
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(f"norm_position must be one of {NORM_POSITIONS}, got "
                             f"{self.norm_position!r}")
        if self.parallel and self.norm_position != "pre":
            raise ValueError("parallel attention and MLP branches need norm_position='pre'")
        super().__post_init__()

    def attention(self, h: jnp.ndarray, positions: jnp.ndarray,
                  segment_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        """The self-attention branch on normalized `h [batch, length, embed]`."""
        return SelfAttention(num_heads=self.num_heads, head_dim=self.head_dim,
                             position=self.position, mask=self.mask,
                             num_kv_heads=self.num_kv_heads, attention_impl=self.attention_impl,
                             block_size=self.attention_block_size, dtype=self.dtype,
                             decode=self.decode, use_bias=self.use_bias,
                             name="attention")(h, positions, segment_ids)

    def mlp(self, h: jnp.ndarray) -> jnp.ndarray:
        """The MLP on `h [batch, length, embed]`, before its residual dropout."""
        return MLP(self.mlp_dim, self.mlp_activation, self.dropout_rate, self.dtype,
                   use_bias=self.use_bias, name="mlp")(h, deterministic=self.deterministic)

    def mlp_branch(self, x: jnp.ndarray) -> jnp.ndarray:
        """`MLP(Norm(x))` after dropout: the pre-norm second branch, without its residual."""
        h = make_norm(self.norm, dtype=self.dtype, name="pre_mlp_norm")(x)
        return self.residual_dropout(self.mlp(h))

    def feed_forward(self, x: jnp.ndarray) -> jnp.ndarray:
        """The block's second residual branch: `x + MLP(Norm(x))`, or post-norm
        `Norm(x + MLP(x))`."""
        if self.norm_position == "post":
            h = x + self.residual_dropout(self.mlp(x))
            return with_activation_axes(
                make_norm(self.norm, dtype=self.dtype, name="post_mlp_norm")(h))
        return with_activation_axes(x + self.mlp_branch(x))


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
