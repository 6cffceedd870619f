"""Mega's two learned relative biases (Ma et al. 2023; reference `facebookresearch/mega` @aeaa4b4,
`fairseq/modules/relative_positional_bias.py`), as functions of `rel = q_pos - k_pos`:

    simple:  b(rel) = w[M - 1 - rel],      one learned scalar per offset, |rel| < M
    rotary:  b(rel) = rot(α, i) · rot(β, j),   i - j = rel, α, β ∈ R^z learned

The reference builds the simple bias as an `[n, n]` matrix whose entry (i, j) is
`w[M - 1 + j - i]`; offsets beyond M - 1 raise there and read the table's edge entry here (as
T5's last bucket does), so a model trained at M positions still runs past them. The rotary bias
rotates α at the query's position and β at the key's (RoPE's half-split pairs, frequencies
`10000^(-i / (z/2))`); the product depends on the offset only:

    b(rel) = Σ_i (α_i β_i + α'_i β'_i) cos(θ_i rel) − (α'_i β_i − α_i β'_i) sin(θ_i rel)

with `(α_i, α'_i)` the i-th pair (first and second half). Both are additive logits, unlike RoPE,
which rotates q and k. Each attention layer owns its parameters (one set per head).
"""
from __future__ import annotations

import flax.linen as nn
import gin
import jax.numpy as jnp
import numpy as np

from lexjax.attention.kernels import HeadBias
from lexjax.positions.base import PositionScheme

BIAS_INIT_STD = 0.02  # the reference's normal init of w, α and β


def simple_offset_index(rel: jnp.ndarray, max_positions: int) -> jnp.ndarray:
    """`rel [*S]` int32 -> the table entry `M - 1 - rel`, offsets clipped to |rel| < M."""
    return max_positions - 1 - jnp.clip(rel, 1 - max_positions, max_positions - 1)


def rotary_bias_frequencies(dim: int) -> np.ndarray:
    """θ_i = 10000^(-i / (dim/2)), i < dim/2 (the reference's sinusoid table), float64."""
    half = dim // 2
    return np.exp(-np.log(10000.0) / half * np.arange(half))


def rotary_bias_coefficients(alpha: jnp.ndarray, beta: jnp.ndarray) -> jnp.ndarray:
    """`alpha, beta [..., dim]` -> `[..., dim]`: the cosine coefficients `α_i β_i + α'_i β'_i`
    then the sine coefficients `α_i β'_i − α'_i β_i` of `b(rel)` (see the module doc)."""
    a1, a2 = jnp.split(alpha, 2, axis=-1)
    b1, b2 = jnp.split(beta, 2, axis=-1)
    return jnp.concatenate([a1 * b1 + a2 * b2, a1 * b2 - a2 * b1], axis=-1)


def rotary_bias(rel: jnp.ndarray, coefficients: jnp.ndarray) -> jnp.ndarray:
    """`rel [*S]` int32, per-head `coefficients [heads, dim]` -> float32 `[heads, *S]`, summed
    over frequencies inside one fusion (no `[*S, dim / 2]` intermediate is kept)."""
    half = coefficients.shape[-1] // 2
    freq = jnp.asarray(rotary_bias_frequencies(2 * half), jnp.float32)
    angles = rel.astype(jnp.float32)[None, ..., None] * freq  # [1, *S, half]
    expand = (slice(None),) + (None,) * rel.ndim
    cos = coefficients[:, :half][expand]
    sin = coefficients[:, half:][expand]
    return jnp.sum(cos * jnp.cos(angles) + sin * jnp.sin(angles), axis=-1)


@gin.register(module="lexjax.positions")
class SimpleRelativeBias(PositionScheme):
    """Mega's "simple" bias: a learned scalar per (offset, head) for offsets |rel| < `max_distance`
    (the reference's M: the chunk size, or `max_positions` = 1024 without chunks); farther
    offsets read the edge entries."""

    max_distance: int = 1024

    @nn.compact
    def relative_bias(self, num_heads, head_dim):
        m = self.max_distance
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"SimpleRelativeBias.max_distance must be a positive int (the "
                             f"offsets it learns, e.g. the chunk size), got {m!r}")
        table = self.param("rel_pos_bias", nn.with_logical_partitioning(
            nn.initializers.normal(BIAS_INIT_STD), ("heads", None)), (num_heads, 2 * m - 1),
            jnp.float32)

        def head(theta, rel):
            """One head (`HeadBias.fn`): the entry as a sum of one-hot terms (O(M) per score,
            so the kernels accept it but the gather of the XLA paths is the practical form)."""
            index = simple_offset_index(rel, m)
            return sum(theta[i] * (index == i).astype(jnp.float32) for i in range(2 * m - 1))

        return HeadBias(fn=head, params=table,
                        dense=lambda params, rel: jnp.take(params, simple_offset_index(rel, m),
                                                           axis=1))


@gin.register(module="lexjax.positions")
class RotaryRelativeBias(PositionScheme):
    """Mega's "rotary" bias `rot(α, i) · rot(β, j)` (the reference's
    `RotaryRelativePositionalBias`), α, β of the attention's head dim (Mega: z), any length."""

    @nn.compact
    def relative_bias(self, num_heads, head_dim):
        if head_dim % 2:
            raise ValueError(f"RotaryRelativeBias needs an even head dim, got {head_dim}")
        init = nn.with_logical_partitioning(nn.initializers.normal(BIAS_INIT_STD),
                                            ("heads", "kv"))
        alpha = self.param("alpha", init, (num_heads, head_dim), jnp.float32)
        beta = self.param("beta", init, (num_heads, head_dim), jnp.float32)
        half = head_dim // 2
        freq = [float(f) for f in rotary_bias_frequencies(head_dim)]

        def head(theta, rel):
            """One head (`HeadBias.fn`): the cosine and sine series term by term."""
            angle = rel.astype(jnp.float32)
            return sum(theta[i] * jnp.cos(freq[i] * angle) + theta[half + i] * jnp.sin(
                freq[i] * angle) for i in range(half))

        return HeadBias(fn=head, params=rotary_bias_coefficients(alpha, beta),
                        dense=lambda params, rel: rotary_bias(rel, params))
