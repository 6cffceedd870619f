"""Bidirectional encoders: the masked-LM and classification heads every encoder shares, and the
Transformer encoder (BERT/RoBERTa-style, pre-norm).

    model(tokens)                  # float32 MLM logits [batch, length, vocab] (num_classes None)
    model(tokens, segment_ids=s)   # a classifier: float32 logits [batch, num_classes]

An encoder attends over the whole input (`MaskSpec(causal=False)`, or its windows, disjoint
blocks and global tokens); `segment_ids` (packed documents, 0 for padding) keep documents apart
and padding out of attention and pooling. Encoders do not decode.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import flax.linen as nn
import gin
import jax.numpy as jnp
import numpy as np

from lexjax.attention import MaskSpec
from lexjax.layers import Embedding, dense, make_norm
from lexjax.layers.mlp import gelu_function
from lexjax.models.transformer import Transformer
from lexjax.positions import PositionScheme

POOLING = ("mean", "first")


class EncoderHeads(nn.Module, kw_only=True):
    """The heads of a bidirectional encoder; mix in before the `LanguageModel` it extends
    (`class MyEncoder(EncoderHeads, MyBase)`): it replaces `head`, extends `check`, and refuses
    decoding. Both heads read the backbone's output after `final_norm`, so `--init_from` moves
    the encoder (and that norm) between them.

    Attributes:
      num_classes: None: masked-LM logits `[batch, length, vocab]` through BERT's transform
        (`mlm_dense`, the MLP's GELU (exact for "gelu_exact", else tanh-approximated),
        `mlm_norm`) and the tied embedding; else class logits
        `[batch, num_classes]` from the pooled hidden states (a tanh `pooler`, `classifier`).
      pooling: "mean" over the non-padding positions, or the "first" position.
    """

    num_classes: Optional[int] = None
    pooling: str = "mean"

    bidirectional: ClassVar[bool] = True
    #: The head's parameters: they start fresh when `--init_from` holds them in another shape.
    head_parameters: ClassVar[tuple[str, ...]] = ("mlm_dense", "mlm_norm", "pooler",
                                                  "classifier")

    @nn.nowrap
    def check(self) -> None:
        super().check()
        if self.num_classes is not None and (not isinstance(self.num_classes, (int, np.integer))
                                             or self.num_classes < 2):
            raise ValueError(f"{type(self).__name__}.num_classes (NUM_CLASSES) must be an int "
                             f">= 2 or None (masked-LM logits), got {self.num_classes!r}")
        if self.pooling not in POOLING:
            raise ValueError(f"{type(self).__name__}.pooling must be one of {POOLING}, got "
                             f"{self.pooling!r}")

    @nn.nowrap
    def check_inputs(self, tokens, segment_ids, decode) -> None:
        if decode:
            raise ValueError(f"{type(self).__name__} is a bidirectional encoder: it reads whole "
                             "inputs and does not decode token by token")
        super().check_inputs(tokens, segment_ids, decode)

    def head(self, embedding: Embedding, x: jnp.ndarray, *, segment_ids: Optional[jnp.ndarray],
             deterministic: bool) -> jnp.ndarray:
        if self.has_final_norm:
            x = self.final_normalization(x)
        if self.num_classes is None:
            gelu = gelu_function(getattr(self, "mlp_activation", "gelu"))
            h = gelu(dense(self.embed_dim, ("embed", "mlp"), dtype=self.compute_dtype,
                           use_bias=self.projections_have_bias, name="mlm_dense")(x))
            h = make_norm(self.norm, dtype=self.compute_dtype, name="mlm_norm")(h)
            return self.vocab_logits(embedding, h)
        pooled = self.pool(x, segment_ids).astype(self.compute_dtype)
        pooled = jnp.tanh(dense(self.embed_dim, ("embed", "mlp"), dtype=self.compute_dtype,
                                name="pooler")(pooled))
        pooled = nn.Dropout(self.dropout_rate)(pooled, deterministic=deterministic)
        logits = dense(self.num_classes, ("mlp", "classes"), dtype=self.compute_dtype,
                       name="classifier")(pooled)
        return logits.astype(jnp.float32)

    @nn.nowrap
    def pool(self, x: jnp.ndarray, segment_ids: Optional[jnp.ndarray]) -> jnp.ndarray:
        """`[batch, length, embed]` -> float32 `[batch, embed]`: the first position, or the mean
        over positions whose segment id is not 0 (all positions without segment ids)."""
        x = x.astype(jnp.float32)
        if self.pooling == "first":
            return x[:, 0]
        if segment_ids is None:
            return jnp.mean(x, axis=1)
        weights = (segment_ids > 0).astype(jnp.float32)[..., None]
        return jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


@gin.register(module="lexjax.models")
class Encoder(EncoderHeads, Transformer, kw_only=True):
    """The bidirectional pre-norm Transformer encoder: int32 tokens `[batch, length]` -> MLM
    logits `[batch, length, vocab]`, or class logits `[batch, num_classes]`.

    Every position scheme works in its bidirectional form: a scheme with a `bidirectional`
    field (T5 buckets) gets it set; ALiBi, KERPLE and Sandwich use |q - k|; RoPE and xPos rotate
    as they do in the decoder (xPos's scale then decays with distance for keys before a query
    and grows for keys after it: finite at training lengths, centred on the keys, but not a
    decay on both sides). The mask (default `MaskSpec(causal=False)`) may be a sliding
    window, disjoint blocks (`chunk`) and global tokens (configs/features/local_*.gin,
    global_tokens.gin).
    """

    position: PositionScheme = Transformer.position
    mask: MaskSpec = MaskSpec(causal=False)

    decodes_chunks = False

    @nn.nowrap
    def check(self) -> None:
        super().check()
        for name in ("mask", "inference_mask"):
            mask = getattr(self, name)
            if mask is not None and mask.causal:
                raise ValueError(f"Encoder.{name} must be bidirectional (causal=False), got "
                                 f"{mask}; causal models are lexjax.models.Transformer")

    @property
    def packs_documents(self) -> bool:
        """Global tokens are a row's first positions, which later documents of a packed row
        could not see: with global tokens, encoders train on one document (piece) per row."""
        return not self.mask.global_tokens

    @property
    def position_template(self) -> Optional[PositionScheme]:
        template = super().position_template
        if template is not None and hasattr(template, "bidirectional"):
            template = template.clone(bidirectional=True)
        return template

    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward matmul FLOPs per token (2 per multiply-add): the blocks over the keys the
        mask allows, and the head (MLM transform and logits, or none per token)."""
        blocks = self.num_layers * self.block_macs(self.mask.mean_keys_per_query(length))
        head = 0 if self.num_classes else self.embed_dim * (self.embed_dim + self.vocab_size)
        return 2.0 * (blocks + head)
