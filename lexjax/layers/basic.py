"""Small building blocks with logical axis names: dense projections, norms, token embeddings.

Weight axes: `vocab`, `embed`, `mlp`, `heads`, `kv_heads`, `kv` (per-head dim), `layers` (added by
scan). Activation axes are named apart (`activation_batch`, `activation_length`, ...) so sharding
rules can treat weights and activations differently (MaxText's convention).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from lexjax import partitioning

ACTIVATION_EMBED = ("activation_batch", "activation_length", "activation_embed")
ACTIVATION_HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_kv")

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
    """Sharding constraint of an activation by its logical `axes` (one per dimension of `x`)
    through the current logical-axis rules; a mesh axis that does not divide its dimension is
    dropped there (a batch of one on a data-parallel mesh, two heads on four tensor devices). A
    no-op outside a mesh (`partitioning.mesh_context`) and outside `jit` (an eager array is
    already where it is)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not isinstance(x, jax.core.Tracer):
        return x
    spec, _ = partitioning.fit_spec(nn.logical_to_mesh_axes(tuple(axes)), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


class Dense(nn.DenseGeneral):
    """`nn.DenseGeneral` over the trailing axes of `x`, computed as a 2-D matrix product: the
    leading (batch, length, ...) axes are merged into one first. Same parameters and result;
    XLA:CPU then takes the kernel gradient as one plain matrix product instead of a transposing
    copy plus a dot over two contracted axes (2.5x less CPU time for an MLP's forward and
    backward, see experiments/train_efficiency.py)."""

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        trailing = sorted(a % x.ndim for a in axes) == list(range(x.ndim - len(axes), x.ndim))
        leading = x.shape[:x.ndim - len(axes)]
        if not trailing or len(leading) < 2:
            return super().__call__(x)
        y = super().__call__(x.reshape((-1,) + x.shape[len(leading):]))
        return y.reshape(leading + y.shape[1:])


class _KernelAxes(nn.LogicallyPartitioned):
    """`nn.LogicallyPartitioned` that constrains only a value of its full rank: DenseGeneral
    builds a multi-axis kernel flat (2-D) and reshapes it, and flax checks each parameter's
    shape by running the init, which would constrain the flat kernel with the kernel's names."""

    def unbox(self, apply_constraint=True):
        return super().unbox(apply_constraint and jnp.ndim(self.value) == len(self.names))


def kernel_axes(init, axes: Sequence[str]):
    """`nn.with_logical_partitioning(init, axes)` for DenseGeneral kernels (`_KernelAxes`)."""
    return lambda *args, **kwargs: _KernelAxes(init(*args, **kwargs), tuple(axes))


def dense(features: int | Sequence[int], axes: Sequence[str], *, dtype: Dtype,
          contract: int | Sequence[int] = -1, name: str,
          init: Any = nn.initializers.lecun_normal(), use_bias: bool = False) -> Dense:
    """A projection whose kernel `[*in, *out]` is annotated with `axes` (and, with `use_bias`,
    a zero-initialised bias `[*out]` with the output axes)."""
    out_axes = tuple(axes)[-(len(features) if isinstance(features, Sequence) else 1):]
    return Dense(features=features, axis=contract, use_bias=use_bias, dtype=dtype,
                 param_dtype=jnp.float32, name=name,
                 kernel_init=kernel_axes(init, axes),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, out_axes))


class Layer(nn.Module, kw_only=True):
    """What every layer of a model's stack shares: the compute dtype, residual dropout, and the
    mode (training or evaluation; decoding against the "cache" collection, see
    `lexjax.layers.decoding`). Subclasses add their sizes (keyword arguments)."""

    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    deterministic: bool = True
    decode: bool = False

    def residual_dropout(self, h: jnp.ndarray) -> jnp.ndarray:
        """Dropout of a residual branch `[batch, length, features]`, one mask shared over the
        length axis; off when deterministic."""
        return nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(
            h, deterministic=self.deterministic)


NORM_KINDS = ("rmsnorm", "layernorm")


@gin.register(module="lexjax.layers")
@dataclasses.dataclass(frozen=True)
class Norm:
    """A normalisation layer's settings, where a model's `norm` field needs more than its kind
    (checkpoints of other libraries: `lexjax.convert`).

    Attributes:
      kind: "rmsnorm" or "layernorm".
      epsilon: added to the variance (flax's default 1e-6; GPT-2 and BLOOM use 1e-5).
      bias: a learned bias (layernorm only; MPT's norms have none).
    """

    kind: str = "rmsnorm"
    epsilon: float = 1e-6
    bias: bool = True

    def __post_init__(self):
        if self.kind not in NORM_KINDS:
            raise ValueError(f"unknown norm {self.kind!r}; use one of {NORM_KINDS}")
        if not self.epsilon > 0:
            raise ValueError(f"Norm.epsilon must be positive, got {self.epsilon!r}")


def projected_qkv(module: nn.Module, x: jnp.ndarray, positions: Optional[jnp.ndarray], *,
                  num_heads: int, head_dim: int, dtype: Dtype, use_bias: bool,
                  position: Optional[nn.Module] = None
                  ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """q, k, v `[batch, length, num_heads, head_dim]` of `x [batch, length, embed]` through
    `module`'s `query`, `key` and `value` projections (call it from `module`'s compact method),
    q and k turned at `positions [length]` by a rotary `position` scheme (cloned into `module`
    as `position`; other schemes leave them as they are): the kernel-attention layers' start."""
    projection = functools.partial(dense, (num_heads, head_dim), ("embed", "heads", "kv"),
                                   dtype=dtype, use_bias=use_bias)
    q, k, v = (projection(name=name)(x) for name in ("query", "key", "value"))
    if position is not None:
        q, k = position.clone(parent=module, name="position").rotate(q, k, positions, positions)
    return q, k, v


def make_norm(norm: Union[str, Norm], *, dtype: Dtype, name: str) -> nn.Module:
    """A norm over `embed`: "rmsnorm" (scale) or "layernorm" (scale and bias), or a `Norm`."""
    spec = norm if isinstance(norm, Norm) else Norm(kind=norm)
    ones = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
    if spec.kind == "rmsnorm":
        return nn.RMSNorm(epsilon=spec.epsilon, dtype=dtype, param_dtype=jnp.float32,
                          scale_init=ones, name=name)
    zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))
    return nn.LayerNorm(epsilon=spec.epsilon, use_bias=spec.bias, dtype=dtype,
                        param_dtype=jnp.float32, scale_init=ones, bias_init=zeros, name=name)


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
        """`[..., features]` -> float32 logits `[..., vocab]` (a 2-D product, as `Dense`)."""
        flat = x.reshape(-1, x.shape[-1])
        logits = jnp.einsum("nd,vd->nv", flat, self.table.astype(x.dtype),
                            preferred_element_type=jnp.float32)
        return logits.reshape(x.shape[:-1] + (self.vocab_size,))
