"""The one interface every position scheme implements: three hooks, each optional.

(a) `embed(positions, features)`: an additive embedding of absolute positions (sinusoidal,
    learned), added to the token embeddings once at the bottom of the model;
(b) `rotate(q, k, q_positions, k_positions)`: a transform of queries and keys (RoPE, xPos);
(c) `relative_bias(num_heads, head_dim)`: a callable mapping relative distance
    `q_pos - k_pos` (int32, any shape S) to additive attention logits `[num_heads, *S]`
    (ALiBi, Sandwich, KERPLE, T5). It is a function, not a matrix, so blocked attention and
    kernels evaluate it block by block.

The model calls the embedding hook on one instance at the bottom of the stack and the attention
hooks on a separate instance in each attention layer, so learned relative-bias parameters are
per layer (unless the model shares one table: `PrebuiltBias`). Positions are int32 `[length]`
(shared by the batch) or `[batch, length]`.
A scheme with none of the hooks is NoPE. Position arithmetic runs in float32 (bfloat16 angles lose
positions past a few hundred).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from lexjax.attention import RelativeBias


class PositionScheme(nn.Module):
    """Base class; every hook defaults to "no position information"."""

    @property
    def max_positions(self) -> Optional[int]:
        """The most positions the scheme encodes (None: any number)."""
        return None

    @property
    def rotates_keys_alone(self) -> bool:
        """Whether `rotate` transforms each key by its own position only (RoPE), so a decoding
        cache may keep keys rotated; False where a key's transform depends on the other
        positions in view (xPos centres its scales on them) or there is none."""
        return False

    @property
    def rotates_per_block(self) -> bool:
        """Whether `rotate` must see positions near its origin: its factors grow with the
        absolute position (xPos's exponential scales leave float32 past ~72K tokens), so
        attention applies it per block of a local mask, with positions relative to the query
        block (`attend(..., rotation=...)`; exact, since its scores depend on q_pos - k_pos
        only)."""
        return False

    def embed(self, positions: jnp.ndarray, features: int) -> Optional[jnp.ndarray]:
        """`positions [..., length]` -> float32 `[..., length, features]`, or None."""
        return None

    def rotate(self, q: jnp.ndarray, k: jnp.ndarray, q_positions: jnp.ndarray,
               k_positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """`q [batch, q_len, heads, head_dim]`, `k [batch, k_len, kv_heads, head_dim]` -> same."""
        return q, k

    def relative_bias(self, num_heads: int, head_dim: int) -> Optional[RelativeBias]:
        """A callable `rel [*S] int32 -> [num_heads, *S] float32`, or None."""
        return None


def heads_first(values: jnp.ndarray) -> jnp.ndarray:
    """`[*S, heads]` -> `[heads, *S]`."""
    return jnp.moveaxis(values, -1, 0)


def per_head(values: jnp.ndarray, rel: jnp.ndarray) -> jnp.ndarray:
    """Reshapes per-head parameters `[heads]` to broadcast against `rel [*S]`: `[heads, 1, ...]`."""
    return values.reshape(values.shape + (1,) * rel.ndim)


class PrebuiltBias(PositionScheme):
    """`scheme`'s hooks with its relative bias replaced by `bias`, a `RelativeBias` built once
    above the layers: one table shared by every layer (T5's, and SPADE's reference, where layer
    0's position bias is handed up the stack), instead of one per layer. Rotations and
    embeddings are `scheme`'s."""

    scheme: PositionScheme
    bias: Any = None

    def setup(self):
        self.inner = self.scheme.clone()

    @property
    def max_positions(self) -> Optional[int]:
        return self.scheme.max_positions

    @property
    def rotates_keys_alone(self) -> bool:
        return self.scheme.rotates_keys_alone

    @property
    def rotates_per_block(self) -> bool:
        return self.scheme.rotates_per_block

    def embed(self, positions, features):
        return self.inner.embed(positions, features)

    def rotate(self, q, k, q_positions, k_positions):
        return self.inner.rotate(q, k, q_positions, k_positions)

    def relative_bias(self, num_heads, head_dim):
        heads = getattr(self.bias, "num_heads", num_heads)
        if heads != num_heads:
            raise ValueError(f"the shared relative bias has {heads} heads, this attention "
                             f"{num_heads}: share_relative_bias needs every attention layer to "
                             f"have the model's head count")
        return self.bias
