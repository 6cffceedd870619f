"""DeBERTa (He et al., ICLR 2021; v2/v3 conventions): an encoder of disentangled-attention blocks
(`lexjax.layers.disentangled`) with the enhanced mask decoder.

    model(tokens)                 # float32 MLM logits [batch, length, vocab]
    model(tokens, segment_ids=s)  # with num_classes set: class logits [batch, num_classes]

No absolute positions enter the input: the attention sees relative positions only (shared,
layer-normed relative embeddings), and the *enhanced mask decoder* adds absolute positions just
before the MLM head, as the official code does: the last block runs twice more over the hidden
states H of the block before it, with queries H + P (P: a learned absolute table), the second
pass's queries being the first's output. The classifier reads the plain stack (all blocks once).
Blocks are pre-norm like the zoo's other encoders by default; the papers' models (post-norm,
biased projections, a normed embedding) are `norm_position="post"`, `use_bias`,
`embedding_norm` (what `lexjax.convert` sets for DeBERTa-v2/v3 checkpoints).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import gin
import jax.numpy as jnp

from lexjax.attention import MaskSpec
from lexjax.layers import make_norm
from lexjax.layers.disentangled import POSITION_TERMS, DisentangledLayer, RelativePositions
from lexjax.models.encoder import EncoderHeads
from lexjax.models.lm import AttentionLanguageModel, BlockLayout, segment_positions
from lexjax.positions import Learned, PositionScheme

#: Passes of the enhanced mask decoder over the last block (the official code's n = 2).
MASK_DECODER_PASSES = 2


@gin.register(module="lexjax.models")
class DeBERTa(EncoderHeads, BlockLayout, AttentionLanguageModel, kw_only=True):
    """DeBERTa: int32 tokens `[batch, length]` -> MLM logits `[batch, length, vocab]` (or class
    logits `[batch, num_classes]`).

    Attributes:
      position_buckets: log buckets of relative distance (256; 0: plain clipped distances, v1).
      max_relative_positions: the farthest distance told apart (512).
      position_terms: the disentangled terms, a subset of ("c2p", "p2c").
      share_position_projections: the relative embeddings go through each layer's content
        query / key projections (v2/v3), else through their own (v1).
      enhanced_mask_decoder: absolute positions before the MLM head (the last block rerun with
        queries H + P); False: the plain stack.
      max_positions: the length of the mask decoder's absolute table (learned; 512 in the
        paper): MLM inputs may not be longer; classifiers and the plain stack read any length.
      mask: the attention mask (bidirectional; windows, blocks and global tokens work too).
      norm_position, use_bias: see `BlockLayout` ("post" and True for the official models).
    """

    position: Optional[PositionScheme] = None
    mask: MaskSpec = MaskSpec(causal=False)
    norm: str = "layernorm"
    position_buckets: int = 256
    max_relative_positions: int = 512
    position_terms: tuple[str, ...] = POSITION_TERMS
    share_position_projections: bool = True
    enhanced_mask_decoder: bool = True
    max_positions: int = 512

    @nn.nowrap
    def check(self) -> None:
        super().check()
        if self.position is not None:
            raise ValueError("DeBERTa reads relative positions through its disentangled "
                             "attention (position_buckets, max_relative_positions): leave "
                             "DeBERTa.position None")
        if self.mask.causal:
            raise ValueError(f"DeBERTa.mask must be bidirectional (causal=False), got {self.mask}")
        unknown = set(self.position_terms) - set(POSITION_TERMS)
        if unknown:
            raise ValueError(f"DeBERTa.position_terms must be drawn from {POSITION_TERMS}, got "
                             f"{self.position_terms}")
        if self.key_value_heads != self.num_heads:
            raise ValueError("DeBERTa attends with as many key/value heads as query heads; "
                             "leave num_kv_heads None")
        try:
            RelativePositions(self.position_buckets, self.max_relative_positions)
        except ValueError as e:
            raise ValueError(f"DeBERTa (POSITION_BUCKETS, MAX_RELATIVE_POSITIONS): {e}") from None

    @property
    def relative_positions(self) -> RelativePositions:
        return RelativePositions(self.position_buckets, self.max_relative_positions)

    @property
    def uses_mask_decoder(self) -> bool:
        """Whether the MLM path runs the enhanced mask decoder."""
        return self.enhanced_mask_decoder and self.num_classes is None

    def relative_embeddings(self) -> jnp.ndarray:
        """The shared relative embeddings `[2 span, embed]`, normed (`norm`)."""
        span = self.relative_positions.span
        table = self.param("relative_embeddings",
                           nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        ("relpos_buckets", "embed")),
                           (2 * span, self.embed_dim), jnp.float32)
        return make_norm(self.norm, dtype=jnp.float32, name="relative_norm")(table)

    def backbone(self, x: jnp.ndarray, positions: jnp.ndarray, *,
                 segment_ids: Optional[jnp.ndarray], deterministic: bool,
                 decode: bool) -> jnp.ndarray:
        del positions, decode  # relative positions are the block's own; encoders never decode
        relative = self.relative_embeddings()
        layers = [self.remat(DisentangledLayer)(
            **self.decoder_layer_fields(self.mask, deterministic, decode=False),
            relative=self.relative_positions, terms=tuple(self.position_terms),
            share_projections=self.share_position_projections, name=f"layer_{i}")
            for i in range(self.num_layers)]
        last = len(layers) - 1 if self.uses_mask_decoder else len(layers)
        for layer in layers[:last]:
            x = layer(x, relative, segment_ids)
        if not self.uses_mask_decoder:
            return x
        queries = x + self.absolute_positions(x.shape[1], segment_ids).astype(x.dtype)
        for _ in range(MASK_DECODER_PASSES):
            queries = layers[-1](x, relative, segment_ids, queries)
        return queries

    def absolute_positions(self, length: int, segment_ids: Optional[jnp.ndarray]
                           ) -> jnp.ndarray:
        """The mask decoder's absolute position embeddings `[1 or batch, length, embed]` (each
        token's position within its document when `segment_ids` are given)."""
        if length > self.max_positions:
            raise ValueError(
                f"DeBERTa's enhanced mask decoder has {self.max_positions} absolute positions "
                f"but the input has {length}: raise MAX_POSITIONS (DeBERTa.max_positions), or "
                "pre-train without it (DeBERTa.enhanced_mask_decoder = False)")
        where = (jnp.arange(length, dtype=jnp.int32)[None] if segment_ids is None
                 else segment_positions(segment_ids))
        return Learned(max_length=self.max_positions, name="mask_decoder_position").embed(
            where, self.embed_dim)

    @nn.nowrap
    def decoder_layer_fields(self, mask: MaskSpec, deterministic: bool, decode: bool) -> dict:
        return dict(super().decoder_layer_fields(mask, deterministic, decode), position=None)

    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward matmul FLOPs per token (2 per multiply-add): each block pass (projections,
        MLP, scores and values over the keys the mask allows, and the c2p / p2c scores of every
        token against all 2 span relative embeddings, whose per-layer projections are shared by
        the tokens), the mask decoder's extra pass, and the MLM head."""
        span = self.relative_positions.span
        inner = self.num_heads * self.head_features
        terms = len(self.position_terms)
        position = terms * (inner * 2 * span + 2 * span * self.embed_dim * inner / length)
        passes = self.num_layers + (MASK_DECODER_PASSES - 1 if self.uses_mask_decoder else 0)
        block = self.block_macs(self.mask.mean_keys_per_query(length)) + position
        head = 0 if self.num_classes else self.embed_dim * (self.embed_dim + self.vocab_size)
        return 2.0 * (passes * block + head)
