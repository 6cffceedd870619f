"""KERPLE (Chi et al. 2022): kernelized relative positions, learnable per head and layer.

    log:    bias_h = -r1_h * log(1 + r2_h * |q - k|),   r1, r2 > 0
    power:  bias_h = -r1_h * |q - k| ^ r2_h,            r1 > 0, 0 < r2 <= 2

Constraints are reparameterisations, not clamps (the reference clamps `.data` in place):
r = softplus(raw) for positive parameters, r2 = 2 * sigmoid(raw) for the power exponent. The
initial values follow the reference: log r1 ~ U(0, 2), r2 ~ U(0, 1); power r1 ~ U(0, 1),
r2 ~ U(0, 2), floored at 0.01.
"""
from __future__ import annotations

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from lexjax.attention.kernels import HeadBias
from lexjax.positions.base import PositionScheme, per_head

MIN_INIT = 1e-2


def _inverse_softplus(y: jnp.ndarray) -> jnp.ndarray:
    return y + jnp.log(-jnp.expm1(-y))


def _uniform_raw(high: float, inverse):
    """Initializer: raw parameters whose transform is U(MIN_INIT, high)."""
    def init(key, shape, dtype=jnp.float32):
        value = jax.random.uniform(key, shape, jnp.float32, MIN_INIT, high)
        return inverse(value).astype(dtype)
    return init


def _inverse_two_sigmoid(y: jnp.ndarray) -> jnp.ndarray:
    """raw such that 2 * sigmoid(raw) = y (y in (0, 2))."""
    p = jnp.clip(y / 2.0, 1e-6, 1 - 1e-6)
    return jnp.log(p) - jnp.log1p(-p)


def kerple_log_bias(rel: jnp.ndarray, r1: jnp.ndarray, r2: jnp.ndarray) -> jnp.ndarray:
    """`rel [*S]`, per-head `r1, r2 [H]` -> `[H, *S]` = -r1 log(1 + r2 |rel|), in float32."""
    distance = jnp.abs(rel).astype(jnp.float32)
    return -per_head(r1, rel) * jnp.log1p(per_head(r2, rel) * distance)


def kerple_power_bias(rel: jnp.ndarray, r1: jnp.ndarray, r2: jnp.ndarray) -> jnp.ndarray:
    """`[H, *S]` = -r1 |rel|^r2, with a gradient-safe zero on the diagonal (0^r2 has an infinite
    derivative in r2 through log 0)."""
    distance = jnp.abs(rel).astype(jnp.float32)
    safe = jnp.maximum(distance, 1.0)
    powered = jnp.where(distance > 0, safe ** per_head(r2, rel), 0.0)
    return -per_head(r1, rel) * powered


@gin.register(module="lexjax.positions")
class Kerple(PositionScheme):
    """KERPLE bias; `variant` is "log" (the paper's best) or "power"."""

    variant: str = "log"

    @nn.compact
    def relative_bias(self, num_heads, head_dim):
        if self.variant == "log":
            r1_high, r2_high, r2_inverse = 2.0, 1.0, _inverse_softplus
        elif self.variant == "power":
            r1_high, r2_high, r2_inverse = 1.0, 2.0, _inverse_two_sigmoid
        else:
            raise ValueError(f"Kerple.variant must be 'log' or 'power', got {self.variant!r}")
        axes = ("heads",)
        raw_r1 = self.param("raw_r1", nn.with_logical_partitioning(
            _uniform_raw(r1_high, _inverse_softplus), axes), (num_heads,), jnp.float32)
        raw_r2 = self.param("raw_r2", nn.with_logical_partitioning(
            _uniform_raw(r2_high, r2_inverse), axes), (num_heads,), jnp.float32)
        r1 = jax.nn.softplus(raw_r1)
        if self.variant == "log":
            params = jnp.stack([r1, jax.nn.softplus(raw_r2)], axis=1)
            return HeadBias(fn=_log_head, params=params,
                            dense=lambda p, rel: kerple_log_bias(rel, p[:, 0], p[:, 1]))
        params = jnp.stack([r1, 2.0 * jax.nn.sigmoid(raw_r2)], axis=1)
        return HeadBias(fn=_power_head, params=params,
                        dense=lambda p, rel: kerple_power_bias(rel, p[:, 0], p[:, 1]))


def _log_head(theta, rel):
    """One head of `kerple_log_bias` (`HeadBias.fn`, theta = (r1, r2)), from ops every kernel
    lowering has (log(1 + x) for log1p: x = r2 |rel| is 0 or >= r2, so nothing is lost)."""
    distance = jnp.abs(rel.astype(jnp.float32))
    return -theta[0] * jnp.log(1.0 + theta[1] * distance)


def _power_head(theta, rel):
    """One head of `kerple_power_bias` (theta = (r1, r2)); d^r2 as exp(r2 log d)."""
    distance = jnp.abs(rel.astype(jnp.float32))
    powered = jnp.exp(theta[1] * jnp.log(jnp.maximum(distance, 1.0)))
    return -theta[0] * jnp.where(distance > 0, powered, 0.0)
