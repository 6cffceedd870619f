"""Multi-head (and grouped-query) self-attention with a pluggable position scheme."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from lexjax.attention import MaskSpec, attend
from lexjax.layers.basic import Dtype, dense
from lexjax.positions import PositionScheme


class SelfAttention(nn.Module):
    """Projects to q `[b, n, heads, head_dim]` and k, v `[b, n, kv_heads, head_dim]`, applies the
    position scheme's rotation and relative bias, attends under `mask`, projects back.

    `position` is a template: each attention layer clones it, so learned relative biases are per
    layer.
    """

    num_heads: int
    head_dim: int
    position: PositionScheme
    mask: MaskSpec = MaskSpec()
    num_kv_heads: Optional[int] = None
    impl: str = "auto"
    block_size: Optional[int] = None
    dtype: Dtype = jnp.float32

    def sow_attention_inputs(self, q, k, bias, length: int) -> None:
        """Records the position-transformed q `[b, n, heads, d]`, k `[b, n, kv_heads, d]` and
        the relative bias by distance `[heads, n]` in the "intermediates" collection (only when
        it is mutable), for the attention-resolution metric (lexjax.evaluation.resolution)."""
        if not self.is_mutable_collection("intermediates"):
            return
        distances = jnp.arange(length, dtype=jnp.int32)
        by_distance = (bias(distances) if bias is not None
                       else jnp.zeros((self.num_heads, length), jnp.float32))
        self.sow("intermediates", "attention_inputs", {"q": q, "k": k, "bias": by_distance})

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
        """`x [batch, length, embed]`, int32 `positions [length]` -> `[batch, length, embed]`."""
        kv_heads = self.num_kv_heads or self.num_heads
        q = dense((self.num_heads, self.head_dim), ("embed", "heads", "kv"), dtype=self.dtype,
                  name="query")(x)
        k = dense((kv_heads, self.head_dim), ("embed", "kv_heads", "kv"), dtype=self.dtype,
                  name="key")(x)
        v = dense((kv_heads, self.head_dim), ("embed", "kv_heads", "kv"), dtype=self.dtype,
                  name="value")(x)
        scheme = self.position.clone(parent=self, name="position")
        q, k = scheme.rotate(q, k, positions, positions)
        bias = scheme.relative_bias(self.num_heads, self.head_dim)
        self.sow_attention_inputs(q, k, bias, x.shape[1])
        q = nn.with_logical_constraint(
            q, ("activation_batch", "activation_length", "activation_heads", "activation_kv"))
        out = attend(q, k, v, mask=self.mask, bias=bias, impl=self.impl,
                     block_size=self.block_size)
        return dense(x.shape[-1], ("heads", "kv", "embed"), dtype=self.dtype, contract=(-2, -1),
                     name="out")(out)
