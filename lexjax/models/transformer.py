"""The decoder-only Transformer LM: pre-norm blocks of self-attention and an MLP, any position
scheme, any mask (full causal, window, chunks, BCA), optional scan over layers and remat."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from lexjax.attention import MaskSpec
from lexjax.layers import (MLP, Embedding, SelfAttention, compute_dtype, dense, make_norm,
                           with_activation_axes)
from lexjax.layers.basic import Dtype
from lexjax.positions import PositionScheme, RoPE

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderLayer(nn.Module):
    """x + Attn(Norm(x)), then x + MLP(Norm(x)); `[batch, length, embed]` -> same."""

    num_heads: int
    head_dim: int
    mlp_dim: int
    position: PositionScheme
    mask: MaskSpec
    num_kv_heads: Optional[int] = None
    norm: str = "rmsnorm"
    mlp_activation: str = "gelu"
    dropout_rate: float = 0.0
    attention_impl: str = "auto"
    attention_block_size: Optional[int] = None
    dtype: Dtype = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray):
        drop = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))
        h = make_norm(self.norm, dtype=self.dtype, name="pre_attention_norm")(x)
        h = SelfAttention(num_heads=self.num_heads, head_dim=self.head_dim, position=self.position,
                          mask=self.mask, num_kv_heads=self.num_kv_heads, impl=self.attention_impl,
                          block_size=self.attention_block_size, dtype=self.dtype,
                          name="attention")(h, positions)
        x = x + drop(h, deterministic=self.deterministic)
        h = make_norm(self.norm, dtype=self.dtype, name="pre_mlp_norm")(x)
        h = MLP(self.mlp_dim, self.mlp_activation, self.dropout_rate, self.dtype, name="mlp")(
            h, deterministic=self.deterministic)
        x = with_activation_axes(x + drop(h, deterministic=self.deterministic))
        return x, None  # (carry, per-layer output) so the layer can be scanned


@gin.configurable(module="lexjax.models")
class Transformer(nn.Module):
    """Decoder-only language model: int32 tokens `[batch, length]` -> float32 logits
    `[batch, length, vocab_size]`, causal under the default mask.

    Attributes:
      position: the position scheme (a `PositionScheme` instance; see lexjax.positions).
      mask: the attention mask used in training (default full causal).
      inference_mask: if set, used when `deterministic=True` (e.g. xPos with blockwise causal
        attention at evaluation: `MaskSpec(blockwise=train_length // 2)`).
      dtype: compute dtype name ("float32" or "bfloat16"); parameters are always float32 and
        logits are float32.
      scan_layers: `nn.scan` over layers (compile time flat in depth; params get a leading
        `layers` axis).
      remat_policy: one of REMAT_POLICIES ("none", "full", "dots", "dots_no_batch").
    """

    vocab_size: int
    num_layers: int
    embed_dim: int
    num_heads: int
    mlp_dim: int
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    position: PositionScheme = RoPE()
    mask: MaskSpec = MaskSpec()
    inference_mask: Optional[MaskSpec] = None
    attention_impl: str = "auto"
    attention_block_size: Optional[int] = None
    norm: str = "rmsnorm"
    mlp_activation: str = "gelu"
    tie_embeddings: bool = True
    dropout_rate: float = 0.0
    dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"

    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward matmul FLOPs per token at sequence `length` (2 per multiply-add; attention
        over the keys the training mask allows)."""
        head_dim = self.head_dim or self.embed_dim // self.num_heads
        kv_heads = self.num_kv_heads or self.num_heads
        projections = self.embed_dim * head_dim * 2 * (self.num_heads + kv_heads)
        mlp = self.embed_dim * self.mlp_dim * (3 if self.mlp_activation == "swiglu" else 2)
        attention = 2 * self.num_heads * head_dim * self.mask.mean_keys_per_query(length)
        layer = projections + mlp + attention
        return 2.0 * (self.num_layers * layer + self.embed_dim * self.vocab_size)

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, *, deterministic: bool = True) -> jnp.ndarray:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be int32 [batch, length], got shape {tokens.shape}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; use one of "
                             f"{sorted(REMAT_POLICIES)}")
        dtype = compute_dtype(self.dtype)
        positions = np.arange(tokens.shape[1], dtype=np.int32)
        embedding = Embedding(self.vocab_size, self.embed_dim, dtype=dtype, name="token_embedding")

        x = embedding(tokens)
        absolute = self.position.embed(positions, self.embed_dim)
        if absolute is not None:
            x = x + absolute.astype(dtype)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        x = with_activation_axes(x)

        mask = self.inference_mask if (deterministic and self.inference_mask) else self.mask
        layer_kwargs = dict(
            num_heads=self.num_heads, head_dim=self.head_dim or self.embed_dim // self.num_heads,
            mlp_dim=self.mlp_dim, position=self.position, mask=mask, num_kv_heads=self.num_kv_heads,
            norm=self.norm, mlp_activation=self.mlp_activation, dropout_rate=self.dropout_rate,
            attention_impl=self.attention_impl, attention_block_size=self.attention_block_size,
            dtype=dtype, deterministic=deterministic)
        layer_cls = DecoderLayer
        policy = REMAT_POLICIES[self.remat_policy]
        if self.remat_policy != "none":
            layer_cls = nn.remat(layer_cls, policy=policy, prevent_cse=not self.scan_layers)
        if self.scan_layers:
            stack = nn.scan(layer_cls, variable_axes={"params": 0, "intermediates": 0},
                            split_rngs={"params": True, "dropout": True},
                            in_axes=nn.broadcast, length=self.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(**layer_kwargs, name="layers")(x, positions)
        else:
            for i in range(self.num_layers):
                x, _ = layer_cls(**layer_kwargs, name=f"layer_{i}")(x, positions)

        x = make_norm(self.norm, dtype=dtype, name="final_norm")(x)
        if self.tie_embeddings:
            return embedding.attend(x) * (self.embed_dim ** -0.5)
        logits = dense(self.vocab_size, ("embed", "vocab"), dtype=dtype, name="logits")(x)
        return logits.astype(jnp.float32)
