"""The YOSO encoder (Zeng et al., ICML 2021): a bidirectional Transformer encoder whose attention
is YOSO's Bernoulli sampling with LSH (`lexjax.layers.yoso`), linear in the length.

    model(tokens)                  # MLM logits [batch, length, vocab]
    model(tokens, segment_ids=s)   # with num_classes: class logits [batch, num_classes]

Packed documents stay apart (hash buckets are per document). Positions: absolute schemes, or a
rotary one (RoPE, xPos), which turns q and k before they are hashed; a relative bias has no place
in hashed attention and is refused. YOSO has no causal form, so there is no YOSO LM.
"""
from __future__ import annotations

import flax.linen as nn
import gin

from lexjax.attention import MaskSpec
from lexjax.layers.yoso import YosoLayer, check_hashing
from lexjax.models.encoder import Encoder
from lexjax.positions import PositionScheme


@gin.register(module="lexjax.models")
class YosoEncoder(Encoder, kw_only=True):
    """`Encoder` with YOSO attention in every block.

    Attributes:
      hash_bits: tau, bits of each SimHash code (HASH_BITS; the reference uses 8 to 12);
        collisions happen with probability (1 - angle/pi)^tau.
      num_hashes: m, independent hashes averaged (NUM_HASHES; 32 in the reference).
      Other fields: see `Encoder` (the mask must be the full bidirectional one).
    """

    hash_bits: int = 8
    num_hashes: int = 32

    layer_class = YosoLayer

    @nn.nowrap
    def check(self) -> None:
        super().check()
        try:
            check_hashing(self.hash_bits, self.num_hashes)
        except ValueError as e:
            raise ValueError(f"YosoEncoder (HASH_BITS, NUM_HASHES): {e}") from None
        if self.mask != MaskSpec(causal=False) or self.inference_mask is not None:
            raise ValueError("YosoEncoder hashes every key of the row: leave its mask the full "
                             "bidirectional MaskSpec(causal=False)")
        scheme = type(self.position) if self.position is not None else PositionScheme
        if scheme.relative_bias is not PositionScheme.relative_bias:
            raise ValueError(f"YosoEncoder samples attention by hashing q and k, so a relative "
                             f"bias ({scheme.__name__}) has no place in it: use RoPE or an "
                             "absolute scheme")

    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward FLOPs per token (2 per multiply-add): per layer the projections and the MLP
        (`block_macs` without softmax attention) and, per hash, the SimHash codes of q and k
        (2 tau D) and the scatter and gather of the values (2 D); the MLM head."""
        d = self.embed_dim
        inner = self.num_heads * self.head_features
        mixing = self.num_hashes * (2 * self.hash_bits * inner + 2 * inner)
        head = 0 if self.num_classes else d * (d + self.vocab_size)
        return 2.0 * (self.num_layers * (self.block_macs(0) + mixing) + head)

    @nn.nowrap
    def decoder_layer_fields(self, mask: MaskSpec, deterministic: bool, decode: bool) -> dict:
        return dict(super().decoder_layer_fields(mask, deterministic, decode),
                    hash_bits=self.hash_bits, num_hashes=self.num_hashes)
