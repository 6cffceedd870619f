"""Luna (Ma et al., NeurIPS 2021): linear unified nested attention (`lexjax.layers.luna`), as a
causal LM and as a bidirectional encoder.

    Luna:        int32 tokens [batch, length] -> logits [batch, length, vocab], causal
    LunaEncoder: -> MLM logits [batch, length, vocab] (or class logits with num_classes)

A learned extra sequence P of `extra_length` rows (the paper's l: 16 to 256) enters the first
layer; the encoder's layers update it with their packed context (P <- P + C), the causal LM's read
the same P in every layer (packing a whole row would leak later tokens). Attention between
tokens and slots carries no positions, so positions are absolute (sinusoidal by default, as in the
reference's fairseq models). The causal form decodes one token at a time from running sums: O(1)
per token.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import gin
import jax.numpy as jnp

from lexjax.layers.luna import LunaLayer
from lexjax.models.encoder import EncoderHeads
from lexjax.models.lm import AttentionLanguageModel
from lexjax.positions import PositionScheme, Sinusoidal


def is_absolute(position: Optional[PositionScheme]) -> bool:
    """Whether a position scheme acts only through the embedding (no rotation, no bias)."""
    scheme = type(position) if position is not None else PositionScheme
    return (scheme.rotate is PositionScheme.rotate
            and scheme.relative_bias is PositionScheme.relative_bias)


@gin.register(module="lexjax.models")
class Luna(AttentionLanguageModel, kw_only=True):
    """The causal Luna LM (see the module docstring).

    Attributes:
      extra_length: rows of the extra sequence P (EXTRA_LENGTH).
      chunk_size: tokens per scan step of the causal prefix sums (CHUNK_SIZE; a cost knob, the
        result does not depend on it).
      position: an absolute scheme (sinusoidal, learned) or NoPE.
    """

    position: Optional[PositionScheme] = Sinusoidal()
    extra_length: int = 16
    chunk_size: int = 64

    mixes_segments = "its packed context (prefix sums in the causal form) spans the whole row"

    @nn.nowrap
    def check(self) -> None:
        super().check()
        if self.chunk_size < 1:
            raise ValueError(f"{type(self).__name__}.chunk_size (CHUNK_SIZE) must be positive, "
                             f"got {self.chunk_size}")
        if self.extra_length < 1:
            raise ValueError(f"{type(self).__name__}.extra_length (EXTRA_LENGTH) must be "
                             f"positive, got {self.extra_length}")
        if self.head_features * self.num_heads != self.embed_dim:
            raise ValueError(f"{type(self).__name__}: heads x head_dim must equal embed_dim (the "
                             "packed context is added to P); leave head_dim None")
        if not is_absolute(self.position):
            raise ValueError(f"{type(self).__name__} attends between tokens and the extra "
                             f"sequence's slots, which have no positions: use an absolute scheme "
                             "(configs/positions/sinusoidal.gin, learned.gin), not "
                             f"{type(self.position).__name__}")

    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward matmul FLOPs per token (2 per multiply-add). Per layer: the token projections,
        the extra sequence's projections shared by the `length` tokens, the MLP, and the nested
        attention: bidirectional, packing and unpacking over l slots (4 l D); causal, the two
        prefix-sum passes with `chunk_size` tokens per scan step (T (D + l H) + 5 l D)."""
        d, slots = self.embed_dim, self.extra_length
        mlp = d * self.mlp_dim * (3 if self.mlp_activation == "swiglu" else 2)
        if self.bidirectional:
            mixing = 3 * d * d + 2 * slots * d * d / length + 4 * slots * d
        else:
            chunk = min(self.chunk_size, length)
            mixing = (4 * d * d + slots * d * d / length
                      + chunk * (d + slots * self.num_heads) + 5 * slots * d)
        head = self.embed_dim * self.vocab_size
        if self.bidirectional and getattr(self, "num_classes", None) is None:
            head += d * d
        return 2.0 * (self.num_layers * (mixing + mlp) + head)

    def backbone(self, x: jnp.ndarray, positions: jnp.ndarray, *,
                 segment_ids: Optional[jnp.ndarray], deterministic: bool,
                 decode: bool) -> jnp.ndarray:
        del positions, segment_ids  # positions are in x; segment ids are refused (mixes_segments)
        extra = self.param("extra_sequence",
                           nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        ("abs_positions", "embed")),
                           (self.extra_length, self.embed_dim), jnp.float32)
        p = jnp.broadcast_to(extra.astype(x.dtype)[None], (x.shape[0],) + extra.shape)
        layer = self.remat(LunaLayer, decode)
        for i in range(self.num_layers):
            x, p = layer(num_heads=self.num_heads, head_dim=self.head_features,
                         mlp_dim=self.mlp_dim, causal=not self.bidirectional,
                         chunk_size=self.chunk_size, norm=self.norm,
                         mlp_activation=self.mlp_activation, dropout_rate=self.dropout_rate,
                         dtype=self.compute_dtype, deterministic=deterministic, decode=decode,
                         name=f"layer_{i}")(x, p)
        return x


@gin.register(module="lexjax.models")
class LunaEncoder(EncoderHeads, Luna, kw_only=True):
    """The bidirectional Luna encoder: MLM logits `[batch, length, vocab]` or class logits
    `[batch, num_classes]`; every layer packs the tokens into P and updates it (P <- P + C)."""

    mixes_segments = "its packed context reads the whole row"
