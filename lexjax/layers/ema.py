"""Mega's multi-dimensional damped EMA (Ma et al. 2023, "Mega", §3.1, eqs. 3–5).

Each of the d channels j is expanded into h dimensions and smoothed by a damped EMA:

    u_t = β_j x_{t,j},   h_t = α_j ⊙ u_t + (1 − α_j ⊙ δ_j) ⊙ h_{t−1},   y_{t,j} = η_jᵀ h_t

with α, δ ∈ (0, 1)^{d×h} (sigmoids of free parameters), β, η ∈ R^{d×h}. Unrolled, y is a causal
convolution of x with `K_j[t] = Σ_k η_jk β_jk α_jk q_jk^t`, q = 1 − α ⊙ δ: training convolves by
FFT (O(L log L)), decoding runs the recurrence (O(d·h) per token).

Names follow the paper. The reference code (facebookresearch/mega, `MultiHeadEMA`) swaps them:
its `delta` parameter is the paper's α and its `alpha` parameter the paper's δ
(`p = σ(delta)`, `q = 1 − p·σ(alpha)`). Its output is also `silu(EMA(x) + ω ⊙ x)` with a learned
ω; the paper's EMA (eq. 5, used in eq. 6 as X' = EMA(X)) has neither, and neither has this layer.
Initialisation follows the reference: α, δ logits ~ N(0, 0.2); β ~ N(±1 alternating, 0.02)
("seems more stable"); η = η̃ / √h with η̃ ~ N(0, 1) (the reference's `gamma · scale`).

Numerics: log q = log1p(−α δ) and every power q^t = exp(t log q) in float32, as is the FFT.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lexjax.layers.ssm import SSM_STATE, causal_fft_conv, fft_conv_flops, power_kernel


def _alternating_signs(key, shape, dtype=jnp.float32):
    """N(±1, 0.02) with the sign alternating along the last axis: +1, −1, +1, ..."""
    signs = jnp.where(jnp.arange(shape[-1]) % 2 == 0, 1.0, -1.0).astype(dtype)
    return signs + 0.02 * jax.random.normal(key, shape, dtype)


class DampedEMA(nn.Module):
    """`x [batch, length, features] -> EMA(x)` (same shape, float32), `ema_dim` = h."""

    features: int
    ema_dim: int = 16

    def setup(self):
        axes = ("embed", SSM_STATE)
        shape = (self.features, self.ema_dim)
        logits = nn.with_logical_partitioning(nn.initializers.normal(0.2), axes)
        self.alpha_logit = self.param("alpha_logit", logits, shape, jnp.float32)
        self.delta_logit = self.param("delta_logit", logits, shape, jnp.float32)
        self.beta = self.param("beta", nn.with_logical_partitioning(_alternating_signs, axes),
                               shape, jnp.float32)
        self.eta = self.param("eta", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                  axes), shape, jnp.float32)

    def coefficients(self) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """float32 `(α [d, h], log q [d, h], η [d, h])` with q = 1 − α δ, η = η̃ / √h."""
        alpha = jax.nn.sigmoid(self.alpha_logit)
        delta = jax.nn.sigmoid(self.delta_logit)
        log_q = jnp.log1p(-alpha * delta)
        return alpha, log_q, self.eta * self.ema_dim ** -0.5

    def kernel(self, length: int) -> jnp.ndarray:
        """float32 `[features, length]`: `K_j[t] = Σ_k η_jk β_jk α_jk q_jk^t`."""
        alpha, log_q, eta = self.coefficients()
        return power_kernel(eta * self.beta * alpha, log_q, length)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """`x [batch, length, features]` -> float32 `[batch, length, features]`, by FFT."""
        return causal_fft_conv(x, self.kernel(x.shape[1]))

    @nn.nowrap
    def initial_state(self, batch: int) -> jnp.ndarray:
        """The zero EMA state: float32 `[batch, features, ema_dim]`."""
        return jnp.zeros((batch, self.features, self.ema_dim), jnp.float32)

    def step(self, x: jnp.ndarray, state: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """One step of eq. 5: `x [batch, features]`, `state [batch, features, h]` ->
        (float32 `y [batch, features]`, the next state)."""
        alpha, log_q, eta = self.coefficients()
        u = self.beta * x.astype(jnp.float32)[..., None]
        state = alpha * u + jnp.exp(log_q) * state
        return jnp.sum(eta * state, axis=-1), state


def ema_flops_per_token(features: int, ema_dim: int, length: int) -> float:
    """Forward FLOPs per token of `DampedEMA` at `length`: the real kernel (one matmul of
    features·h·length multiply-adds per sequence) and the FFT convolution."""
    return 2.0 * features * ema_dim + features * fft_conv_flops(length)
