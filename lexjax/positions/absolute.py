"""Absolute position embeddings added to the token embeddings: NoPE, sinusoidal, learned."""
from __future__ import annotations

import flax.linen as nn
import gin
import jax.numpy as jnp
import numpy as np

from lexjax.positions.base import PositionScheme


@gin.register(module="lexjax.positions")
class NoPE(PositionScheme):
    """No positional information at all (Haviv et al. 2022): a causal mask alone lets the model
    infer positions."""


def sinusoidal_table(positions: jnp.ndarray, features: int,
                     base: float = 10000.0) -> jnp.ndarray:
    """Vaswani et al.'s encoding: PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(same).

    `positions [..., length]` -> float32 `[..., length, features]` (features even).
    """
    if features % 2:
        raise ValueError(f"sinusoidal embeddings need an even width, got {features}")
    inv_freq = base ** (-np.arange(0, features, 2, dtype=np.float32) / features)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., length, d/2]
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(
        positions.shape + (features,))


@gin.register(module="lexjax.positions")
class Sinusoidal(PositionScheme):
    """Fixed sinusoidal absolute embeddings (interleaved sin/cos, as in the original paper)."""

    base: float = 10000.0

    def embed(self, positions, features):
        return sinusoidal_table(positions, features, self.base)


@gin.register(module="lexjax.positions")
class Learned(PositionScheme):
    """A learned table of `max_length` absolute position embeddings (GPT-2 style).

    Cannot run past `max_length` positions: asking for more raises a ValueError that says so.
    """

    max_length: int = 1024
    init_stddev: float = 0.02

    @property
    def max_positions(self) -> int:
        return self.max_length

    @nn.compact
    def embed(self, positions, features):
        length = positions.shape[-1]
        if length > self.max_length:
            raise ValueError(
                f"learned position embeddings have {self.max_length} positions but the input has "
                f"{length}; a learned table cannot extrapolate. Use a relative scheme "
                "(configs/positions/*.gin) or raise lexjax.positions.Learned.max_length.")
        table = self.param("embedding",
                           nn.with_logical_partitioning(nn.initializers.normal(self.init_stddev),
                                                        ("abs_positions", "embed")),
                           (self.max_length, features), jnp.float32)
        return jnp.take(table, positions, axis=0)
