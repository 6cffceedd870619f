"""The decoder-only Transformer LM: blocks of self-attention and an MLP (pre-norm by default;
post-norm or parallel branches, projection biases as options), any position scheme, any mask
(full causal, window, chunks, BCA), optional scan over layers and remat."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import gin
import jax.numpy as jnp

from lexjax.attention import MaskSpec
from lexjax.models.lm import AttentionLanguageModel, BlockLayout
from lexjax.positions import PositionScheme, RoPE


@gin.register(module="lexjax.models")
class Transformer(BlockLayout, AttentionLanguageModel, kw_only=True):
    """Decoder-only language model: int32 tokens `[batch, length]` -> float32 logits
    `[batch, length, vocab_size]`, causal under the default mask. Packed documents are kept
    apart exactly (`segment_ids`); decoding keeps a key/value cache per layer (a ring of the
    mask's span for local masks).

    Attributes:
      position: the position scheme (a `PositionScheme` instance; see lexjax.positions).
      mask: the attention mask used in training (default full causal).
      inference_mask: if set, used when `deterministic=True` (e.g. xPos with blockwise causal
        attention at evaluation: `MaskSpec(blockwise=train_length // 2)`).
      scan_layers: `nn.scan` over layers (compile time flat in depth; params get a leading
        `layers` axis).
      parallel_block: attention and MLP side by side on the same input, `x + Attn(Norm(x)) +
        MLP(Norm'(x))` (GPT-NeoX); pre-norm only.
      Other fields: see `BlockLayout` (norm_position, use_bias) and `AttentionLanguageModel`.
    """

    position: PositionScheme = RoPE()
    mask: MaskSpec = MaskSpec()
    inference_mask: Optional[MaskSpec] = None
    scan_layers: bool = False
    parallel_block: bool = False

    decodes_chunks = True

    @nn.nowrap
    def check(self) -> None:
        super().check()
        if self.parallel_block and self.norm_position != "pre":
            raise ValueError(f"{type(self).__name__}.parallel_block needs norm_position='pre'")

    @nn.nowrap
    def decoder_layer_fields(self, mask: MaskSpec, deterministic: bool, decode: bool) -> dict:
        return dict(super().decoder_layer_fields(mask, deterministic, decode),
                    parallel=self.parallel_block)

    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward matmul FLOPs per token at sequence `length` (2 per multiply-add; attention
        over the keys the training mask allows)."""
        block = self.block_macs(self.mask.mean_keys_per_query(length))
        return 2.0 * (self.num_layers * block + self.embed_dim * self.vocab_size)

    def backbone(self, x: jnp.ndarray, positions: jnp.ndarray, *,
                 segment_ids: Optional[jnp.ndarray], deterministic: bool,
                 decode: bool) -> jnp.ndarray:
        mask = self.inference_mask if (deterministic and self.inference_mask) else self.mask
        if not self.scan_layers:
            for i in range(self.num_layers):
                x, _ = self.decoder_layer(mask, deterministic=deterministic, decode=decode,
                                          name=f"layer_{i}")(x, positions, segment_ids)
            return x
        stack = nn.scan(self.remat(self.layer_class, decode, scanned=True),
                        variable_axes={"params": 0, "intermediates": 0, "cache": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=nn.broadcast, length=self.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = stack(**self.decoder_layer_fields(mask, deterministic, decode),
                     name="layers")(x, positions, segment_ids)
        return x
