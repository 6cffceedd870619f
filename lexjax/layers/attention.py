"""Multi-head (and grouped-query) self-attention with a pluggable position scheme."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from lexjax.attention import MaskSpec, RelativeBias, Rotation, attend
from lexjax.attention.reference import attend_at_positions
from lexjax.layers.basic import ACTIVATION_HEADS, Dtype, dense, with_activation_axes
from lexjax.layers.decoding import KeyValueCache
from lexjax.positions import PositionScheme


class SelfAttention(nn.Module):
    """Projects to q `[b, n, heads, head_dim]` and k, v `[b, n, kv_heads, head_dim]`, applies the
    position scheme's rotation and relative bias, attends under `mask`, projects back.

    `position` is a template: each attention layer clones it, so learned relative biases are per
    layer. `use_bias`: the four projections have biases (GPT-2, BLOOM, BERT). With `decode`,
    the tokens attend to the earlier ones through a `KeyValueCache` (see
    `lexjax.layers.decoding`).
    """

    num_heads: int
    head_dim: int
    position: PositionScheme
    mask: MaskSpec = MaskSpec()
    num_kv_heads: Optional[int] = None
    attention_impl: str = "auto"
    block_size: Optional[int] = None
    dtype: Dtype = jnp.float32
    decode: bool = False
    use_bias: bool = False

    def sow_attention_inputs(self, q, k, bias, length: int) -> None:
        """Records the position-transformed q `[b, n, heads, d]`, k `[b, n, kv_heads, d]` and
        the relative bias by distance `[heads, n]` in the "intermediates" collection, for the
        attention-resolution metric (lexjax.evaluation.resolution)."""
        distances = jnp.arange(length, dtype=jnp.int32)
        by_distance = (bias(distances) if bias is not None
                       else jnp.zeros((self.num_heads, length), jnp.float32))
        self.sow("intermediates", "attention_inputs", {"q": q, "k": k, "bias": by_distance})

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray,
                 segment_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        """`x [batch, length, embed]`, int32 `positions [length]`, optional int32 `segment_ids
        [batch, length]` (a token sees only tokens of its own segment) -> `[batch, length,
        embed]`."""
        kv_heads = self.num_kv_heads or self.num_heads
        q = dense((self.num_heads, self.head_dim), ("embed", "heads", "kv"), dtype=self.dtype,
                  use_bias=self.use_bias, name="query")(x)
        k = dense((kv_heads, self.head_dim), ("embed", "kv_heads", "kv"), dtype=self.dtype,
                  use_bias=self.use_bias, name="key")(x)
        v = dense((kv_heads, self.head_dim), ("embed", "kv_heads", "kv"), dtype=self.dtype,
                  use_bias=self.use_bias, name="value")(x)
        scheme = self.position.clone(parent=self, name="position")
        bias = scheme.relative_bias(self.num_heads, self.head_dim)
        if self.decode:
            out = self.attend_cached(scheme, q, k, v, positions, bias)
        else:
            q, k, rotation = self.rotate_or_defer(scheme, q, k, positions)
            if self.is_mutable_collection("intermediates"):
                rotated = (q, k) if rotation is None else rotation(q, k, positions, positions)
                self.sow_attention_inputs(*rotated, bias, x.shape[1])
            q = with_activation_axes(q, ACTIVATION_HEADS)
            out = attend(q, k, v, mask=self.mask, bias=bias, impl=self.attention_impl,
                         block_size=self.block_size, segment_ids=segment_ids,
                         rotation=rotation)
        return dense(x.shape[-1], ("heads", "kv", "embed"), dtype=self.dtype, contract=(-2, -1),
                     use_bias=self.use_bias, name="out")(out)

    @staticmethod
    def rotate_or_defer(scheme: PositionScheme, q: jnp.ndarray, k: jnp.ndarray,
                        positions: jnp.ndarray
                        ) -> tuple[jnp.ndarray, jnp.ndarray, Optional[Rotation]]:
        """q and k rotated at `positions`, or, for a scheme that `rotates_per_block` (xPos),
        left as they are with the rotation handed to `attend` (which applies it block by block
        at relative positions: the same scores, since they depend on q_pos - k_pos only)."""
        if scheme.rotates_per_block:
            return q, k, scheme.rotate
        return (*scheme.rotate(q, k, positions, positions), None)

    def attend_cached(self, scheme: PositionScheme, q: jnp.ndarray, k: jnp.ndarray,
                      v: jnp.ndarray, positions: jnp.ndarray,
                      bias: Optional[RelativeBias]) -> jnp.ndarray:
        """Decoding: the queries at `positions` attend to the cached keys and their own. Keys are
        cached rotated where the scheme `rotates_keys_alone` (RoPE: each step rotates only its
        own key), else as projected and rotated at every step (xPos). Several tokens at once
        are a prefill (`LanguageModel.prefill`: the cache held nothing), which attends like the
        forward pass, through the attention implementation."""
        if scheme.rotates_keys_alone:
            q, k = scheme.rotate(q, k, positions, positions)
        keys, values, key_positions, key_valid = KeyValueCache(self.mask, name="kv_cache")(
            k, v, positions)
        if q.shape[1] > 1:
            rotation = None
            if not scheme.rotates_keys_alone:
                q, k, rotation = self.rotate_or_defer(scheme, q, k, positions)
            return attend(q, k, v, mask=self.mask, bias=bias, impl=self.attention_impl,
                          block_size=self.block_size, rotation=rotation)
        if not scheme.rotates_keys_alone:
            q, keys = scheme.rotate(q, keys, positions, key_positions)
        return attend_at_positions(q, keys, values, positions, key_positions, mask=self.mask,
                                   bias=bias, k_valid=key_valid)


class CrossAttention(nn.Module):
    """Bidirectional cross-attention without positions: queries from `x [batch, q_len, embed]`,
    keys and values from `memory [batch, k_len, embed]`; segment ids keep documents apart (a
    query sees only memory slots of its own segment; slots of segment 0 are padding)."""

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, memory: jnp.ndarray, q_segments: jnp.ndarray,
                 k_segments: jnp.ndarray) -> jnp.ndarray:
        """int32 `q_segments [batch, q_len]`, `k_segments [batch, k_len]` -> `[batch, q_len,
        embed]`."""
        heads = (self.num_heads, self.head_dim)
        q = dense(heads, ("embed", "heads", "kv"), dtype=self.dtype, name="query")(x)
        k = dense(heads, ("embed", "heads", "kv"), dtype=self.dtype, name="key")(memory)
        v = dense(heads, ("embed", "heads", "kv"), dtype=self.dtype, name="value")(memory)
        out = attend_at_positions(
            q, k, v, jnp.arange(x.shape[1], dtype=jnp.int32),
            jnp.arange(memory.shape[1], dtype=jnp.int32), mask=MaskSpec(causal=False),
            k_valid=k_segments > 0, q_segments=q_segments, k_segments=k_segments)
        return dense(x.shape[-1], ("heads", "kv", "embed"), dtype=self.dtype, contract=(-2, -1),
                     name="out")(out)
