"""The Ripple ViT (Zheng, Pan, Kong, ICML 2022): a `ViT` whose blocks attend with ripple attention
(`lexjax.layers.ripple`): linear attention over the patch grid in which every key is weighted by a
learned per-head weight of its ring (Chebyshev distance) around the query, rings from
`ring_threshold` on sharing one weight; linear in the number of patches for a fixed threshold.
`shared_rings=True` gives every ring one weight: plain linear attention (the linear-attention
ViT of the study, `configs/models/vit_linear.gin`).

    model(images)    # float32 [batch, height, width, channels] -> logits [batch, num_classes]

Positions: the rings are relative 2-D positions; a rotary scheme (the ViT's default 2-D RoPE)
also turns q and k before the feature map. A relative bias has no place in kernel attention and
is refused.
"""
from __future__ import annotations

import flax.linen as nn
import gin

from lexjax.attention import MaskSpec
from lexjax.layers.ripple import RippleLayer
from lexjax.models.vit import ViT
from lexjax.positions import PositionScheme


@gin.register(module="lexjax.models")
class RippleViT(ViT, kw_only=True):
    """`ViT` with ripple attention in every block.

    Attributes:
      ring_threshold: r_hat (RING_THRESHOLD): rings 0 .. r_hat - 1 get a weight each, every
        farther key shares one.
      shared_rings: one weight for all rings (plain linear attention, SHARED_RINGS).
      Other fields: see `ViT` (the mask must be the full bidirectional one).
    """

    ring_threshold: int = 4
    shared_rings: bool = False

    layer_class = RippleLayer

    @nn.nowrap
    def check(self) -> None:
        super().check()
        name = type(self).__name__
        if self.mask != MaskSpec(causal=False) or self.inference_mask is not None:
            raise ValueError(f"{name} attends over the whole patch grid: leave its mask the "
                             "full bidirectional MaskSpec(causal=False)")
        scheme = type(self.position) if self.position is not None else PositionScheme
        if scheme.relative_bias is not PositionScheme.relative_bias:
            raise ValueError(f"{name}: a relative bias ({scheme.__name__}) has no place in "
                             "kernel attention; the rings are its relative positions (use "
                             "RoPE2D, an absolute scheme or none)")

    @nn.nowrap
    def decoder_layer_fields(self, mask: MaskSpec, deterministic: bool, decode: bool) -> dict:
        height, width = self.grid_shape
        return dict(super().decoder_layer_fields(mask, deterministic, decode),
                    grid_height=height, grid_width=width, ring_threshold=self.ring_threshold,
                    shared_rings=self.shared_rings)

    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward FLOPs per patch (2 per multiply-add): the patch projection and, per layer,
        the projections and the MLP (`block_macs` without softmax attention) and ripple's
        mixing per head: the summed-area table's outer product phi(k) (v, 1), one weighted
        square sum per ring up to the threshold (four table entries each) and phi(q)'s
        contraction, each m (d + 1) with m = d = head_features."""
        d = self.head_features
        rings = 1 if self.shared_rings else min(self.ring_threshold, max(self.grid_shape)) + 1
        mixing = self.num_heads * d * (d + 1) * (2 + 4 * rings)
        return (2.0 * self.patch_features * self.embed_dim
                + 2.0 * self.num_layers * (self.block_macs(0) + mixing))
