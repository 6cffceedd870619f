"""The position-wise feed-forward block: GELU (tanh-approximated or exact), squared ReLU
(Perceiver AR's `sq_relu`), SiLU (Mega's FFN) or SwiGLU."""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from lexjax.layers.basic import Dtype, dense, with_activation_axes

def squared_relu(x: jnp.ndarray) -> jnp.ndarray:
    """relu(x)² (Perceiver AR's `sq_relu`, the gated attention unit's kernel)."""
    return jnp.square(nn.relu(x))


#: Element-wise activations by name; "swiglu" is the gated one (two input projections).
ELEMENTWISE_ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "gelu": nn.gelu,
    "gelu_exact": lambda x: nn.gelu(x, approximate=False),
    "squared_relu": squared_relu,
    "silu": nn.silu,
}
MLP_ACTIVATIONS = (*ELEMENTWISE_ACTIVATIONS, "swiglu")


def gelu_function(activation: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """The GELU an MLP activation name implies: exact (erf) for "gelu_exact", else the tanh
    approximation ("gelu": GPT-2's and BERT-TF's; other activations' models use it in heads)."""
    return ELEMENTWISE_ACTIVATIONS["gelu_exact" if activation == "gelu_exact" else "gelu"]


class MLP(nn.Module):
    """`[batch, length, embed]` -> same. An element-wise activation f ("gelu", "gelu_exact",
    "squared_relu": relu(x)², "silu"): wo(f(wi x)); "swiglu": wo(silu(wi_gate x) * wi x).
    `use_bias`: every projection has a bias."""

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
            h = ELEMENTWISE_ACTIVATIONS[self.activation](up)
        h = with_activation_axes(
            h, ("activation_batch", "activation_length", "activation_mlp"))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, use_bias=self.use_bias,
                     name="wo")(h)
