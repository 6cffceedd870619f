"""The position-wise feed-forward block: GELU or SwiGLU."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from lexjax.layers.basic import Dtype, dense


class MLP(nn.Module):
    """`[batch, length, embed]` -> same. "gelu": wo(gelu(wi x)); "swiglu": wo(silu(wg x) * wi x)."""

    hidden: int
    activation: str = "gelu"
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, deterministic: bool = True) -> jnp.ndarray:
        up = dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="wi")(x)
        if self.activation == "gelu":
            h = nn.gelu(up)
        elif self.activation == "swiglu":
            gate = dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="wi_gate")(x)
            h = nn.silu(gate) * up
        else:
            raise ValueError(f"unknown MLP activation {self.activation!r}; use 'gelu' or 'swiglu'")
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="wo")(h)
