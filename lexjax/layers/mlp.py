"""The position-wise feed-forward block: GELU (tanh-approximated or exact) or SwiGLU."""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from lexjax.layers.basic import Dtype, dense

MLP_ACTIVATIONS = ("gelu", "gelu_exact", "swiglu")


def gelu_function(activation: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """The GELU an MLP activation name implies: exact (erf) for "gelu_exact", else the tanh
    approximation ("gelu": GPT-2's and BERT-TF's; "swiglu" models use it in heads)."""
    if activation == "gelu_exact":
        return lambda x: nn.gelu(x, approximate=False)
    return nn.gelu


class MLP(nn.Module):
    """`[batch, length, embed]` -> same. "gelu" / "gelu_exact": wo(gelu(wi x)); "swiglu":
    wo(silu(wi_gate x) * wi x). `use_bias`: every projection has a bias."""

    hidden: int
    activation: str = "gelu"
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, deterministic: bool = True) -> jnp.ndarray:
        if self.activation not in MLP_ACTIVATIONS:
            raise ValueError(f"unknown MLP activation {self.activation!r}; use one of "
                             f"{MLP_ACTIVATIONS}")
        up = dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, use_bias=self.use_bias,
                   name="wi")(x)
        if self.activation == "swiglu":
            gate = dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, use_bias=self.use_bias,
                         name="wi_gate")(x)
            h = nn.silu(gate) * up
        else:
            h = gelu_function(self.activation)(up)
        h = nn.with_logical_constraint(
            h, ("activation_batch", "activation_length", "activation_mlp"))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, use_bias=self.use_bias,
                     name="wo")(h)
