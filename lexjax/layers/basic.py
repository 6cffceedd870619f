"""Small building blocks with logical axis names: dense projections, norms, token embeddings.

Weight axes: `vocab`, `embed`, `mlp`, `heads`, `kv_heads`, `kv` (per-head dim), `layers` (added by
scan). Activation axes are named apart (`activation_batch`, `activation_length`, ...) so sharding
rules can treat weights and activations differently (MaxText's convention).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

ACTIVATION_EMBED = ("activation_batch", "activation_length", "activation_embed")

Dtype = Any


def compute_dtype(name: str | Dtype) -> jnp.dtype:
    """"float32" / "bfloat16" (or a dtype) -> a jnp dtype, with a clear error otherwise."""
    try:
        dtype = jnp.dtype(name)
    except TypeError:
        raise ValueError(f"unknown dtype {name!r}; use 'float32' or 'bfloat16'") from None
    if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"compute dtype must be a float type, got {name!r}")
    return dtype


def with_activation_axes(x: jnp.ndarray, axes: Sequence[str] = ACTIVATION_EMBED) -> jnp.ndarray:
    """Sharding hint for an activation; a no-op outside a mesh with logical-axis rules."""
    return nn.with_logical_constraint(x, tuple(axes))


def dense(features: int | Sequence[int], axes: Sequence[str], *, dtype: Dtype,
          contract: int | Sequence[int] = -1, name: str,
          init: Any = nn.initializers.lecun_normal()) -> nn.DenseGeneral:
    """A bias-free projection whose kernel `[*in, *out]` is annotated with `axes`."""
    return nn.DenseGeneral(features=features, axis=contract, use_bias=False, dtype=dtype,
                           param_dtype=jnp.float32, name=name,
                           kernel_init=nn.with_logical_partitioning(init, tuple(axes)))


def make_norm(kind: str, *, dtype: Dtype, name: str) -> nn.Module:
    """Pre-norm layer: "rmsnorm" or "layernorm", scale (and bias) over `embed`."""
    ones = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
    if kind == "rmsnorm":
        return nn.RMSNorm(dtype=dtype, param_dtype=jnp.float32, scale_init=ones, name=name)
    if kind == "layernorm":
        zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))
        return nn.LayerNorm(dtype=dtype, param_dtype=jnp.float32, scale_init=ones,
                            bias_init=zeros, name=name)
    raise ValueError(f"unknown norm {kind!r}; use 'rmsnorm' or 'layernorm'")


class Embedding(nn.Module):
    """Token embedding table `[vocab, embed]`; `attend` gives logits against it (tied output)."""

    vocab_size: int
    features: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.table = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                      ("vocab", "embed")),
            (self.vocab_size, self.features), jnp.float32)

    def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """int32 `[batch, length]` -> `[batch, length, features]`."""
        return jnp.take(self.table, tokens, axis=0).astype(self.dtype)

    def attend(self, x: jnp.ndarray) -> jnp.ndarray:
        """`[batch, length, features]` -> float32 logits `[batch, length, vocab]`."""
        return jnp.einsum("bld,vd->blv", x, self.table.astype(x.dtype),
                          preferred_element_type=jnp.float32)
