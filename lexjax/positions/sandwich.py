"""Sandwich (Chi et al. 2023): a parameter-free bias, the inner product of two sinusoidal
position embeddings, compressed per head."""
from __future__ import annotations

from typing import Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np

from lexjax.attention.kernels import HeadBias
from lexjax.positions.base import PositionScheme, per_head


def sandwich_frequencies(dim: int, base: float = 10000.0) -> np.ndarray:
    """1 / base^(2i/d') for i = 1 .. d'/2 (the index starts at 1, as in the paper's formula)."""
    if dim % 2:
        raise ValueError(f"Sandwich needs an even dimension d', got {dim}")
    return base ** (-2.0 * np.arange(1, dim // 2 + 1, dtype=np.float64) / dim)


@gin.register(module="lexjax.positions")
class Sandwich(PositionScheme):
    """bias_h(q, k) = (sum_{i=1}^{d'/2} cos((q - k) / base^(2i/d')) - d'/2) / (8h / H), h = 1..H.

    Zero on the diagonal and non-positive elsewhere; head 1 decays fastest. `dim` (d') defaults to
    the head dimension, and `compression` (8 in the paper) sets the per-head division 8h/H.
    """

    dim: Optional[int] = None
    base: float = 10000.0
    compression: float = 8.0

    def relative_bias(self, num_heads, head_dim):
        dim = self.dim or head_dim
        freqs = jnp.asarray(sandwich_frequencies(dim, self.base), jnp.float32)
        divisors = jnp.asarray(self.compression * np.arange(1, num_heads + 1) / num_heads,
                               jnp.float32)

        def dense(params, rel):
            angles = rel.astype(jnp.float32)[..., None] * freqs
            inner = jnp.sum(jnp.cos(angles), axis=-1) - dim / 2
            return inner[None] / per_head(params[:, 0], rel)

        ratio = self.base ** (-2.0 / dim)  # consecutive frequencies: f_i = ratio^i

        def head(theta, rel):
            """One head (`HeadBias.fn`, theta = (divisor,)): a loop over the frequencies, so a
            kernel holds one tile of partial sums rather than d'/2 tiles of cosines."""
            distance = rel.astype(jnp.float32)

            def term(_, carry):
                total, freq = carry
                return total + jnp.cos(distance * freq), freq * ratio
            # `0 * distance` keeps the distances' register layout in a Mosaic GPU loop carry.
            inner, _ = jax.lax.fori_loop(0, dim // 2, term, (0.0 * distance, jnp.float32(ratio)))
            return (inner - dim / 2) / theta[0]

        return HeadBias(fn=head, params=divisors[:, None], dense=dense)
