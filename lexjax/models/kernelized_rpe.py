"""Kernelized attention with relative positions by FFT (Luo et al., NeurIPS 2021; the layer is
`lexjax.layers.kernelized`): a causal LM and a bidirectional encoder whose blocks replace
softmax attention by positive random features, with a learned relative bias c_{i-j} = e^{b_{i-j}}
applied to the whole row as a Toeplitz product by FFT: O(n log n) in the length.

    KernelizedRPE:        int32 tokens [batch, length] -> logits [batch, length, vocab], causal
    KernelizedRPEEncoder: -> MLM logits (or class logits with num_classes)

The learned bias is the position encoding (`position` None by default; a rotary scheme may be
added, a relative-bias scheme is refused). The causal LM decodes one token at a time from the
last `max_distance` keys' features and one running sum (the bias is constant past R).
"""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import gin

from lexjax.attention import MaskSpec
from lexjax.layers.kernelized import REDRAW_MODES, KernelizedRPELayer
from lexjax.models.encoder import EncoderHeads
from lexjax.models.transformer import Transformer
from lexjax.positions import PositionScheme


@gin.register(module="lexjax.models")
class KernelizedRPE(Transformer, kw_only=True):
    """`Transformer` with kernelized RPE attention in every block.

    Attributes:
      num_features: m, positive random features per head (NUM_FEATURES).
      max_distance: R, the farthest offset with its own learned bias (MAX_DISTANCE).
      redraw: "fixed" random features, or "per_step" (redrawn at every training step).
      position: None (the learned bias), or a rotary scheme on top.
      mask: the full causal mask (the encoder: bidirectional); no windows.
    """

    position: Optional[PositionScheme] = None
    num_features: int = 64
    max_distance: int = 128
    redraw: str = "fixed"

    layer_class = KernelizedRPELayer
    decodes_chunks = False  # decoding steps one token at a time through the running sums
    mixes_segments = "its FFT runs over the whole row"

    @nn.nowrap
    def check(self) -> None:
        super().check()
        name = type(self).__name__
        if self.num_features < 1 or self.max_distance < 1:
            raise ValueError(f"{name}.num_features (NUM_FEATURES) and max_distance "
                             f"(MAX_DISTANCE) must be positive, got {self.num_features}, "
                             f"{self.max_distance}")
        if self.redraw not in REDRAW_MODES:
            raise ValueError(f"{name}.redraw must be one of {REDRAW_MODES}, got {self.redraw!r}")
        if self.mask != MaskSpec(causal=self.mask.causal) or self.inference_mask is not None:
            raise ValueError(f"{name} attends over the whole row by FFT: leave its mask the full "
                             "MaskSpec (no window, chunk or BCA)")
        scheme = type(self.position) if self.position is not None else PositionScheme
        if scheme.relative_bias is not PositionScheme.relative_bias:
            raise ValueError(f"{name} learns its own relative bias: leave position None (or a "
                             f"rotary scheme), not {scheme.__name__}")

    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward FLOPs per token (2 per multiply-add), an estimate: per layer the projections
        and the MLP (`block_macs` without softmax attention), the random features of q and k
        (2 m D), the m (D + H) channels phi(k) (x) (v, 1) built and read back, and their Toeplitz
        product: causal, block-banded (2 R per channel); bidirectional, by FFT (estimated at
        5 log2(2 length) per channel and token for the forward and inverse real transforms)."""
        d, heads, m = self.embed_dim, self.num_heads, self.num_features
        channels = m * (heads * self.head_features + heads)
        toeplitz = (2 * min(self.max_distance, length) if self.mask.causal
                    else 5 * math.log2(2 * length))
        mixing = 2 * m * heads * self.head_features + channels * (2 + toeplitz)
        block = self.block_macs(0) + mixing
        head = d * self.vocab_size + (d * d if self.bidirectional and self.num_classes is None
                                      else 0)
        return 2.0 * (self.num_layers * block + head)

    @nn.nowrap
    def decoder_layer_fields(self, mask: MaskSpec, deterministic: bool, decode: bool) -> dict:
        return dict(super().decoder_layer_fields(mask, deterministic, decode),
                    num_features=self.num_features, max_distance=self.max_distance,
                    redraw=self.redraw)


@gin.register(module="lexjax.models")
class KernelizedRPEEncoder(EncoderHeads, KernelizedRPE, kw_only=True):
    """The bidirectional form: MLM logits `[batch, length, vocab]` (or class logits)."""

    mask: MaskSpec = MaskSpec(causal=False)

    @nn.nowrap
    def check(self) -> None:
        super().check()
        if self.mask.causal:
            raise ValueError("KernelizedRPEEncoder.mask must be bidirectional (causal=False)")
