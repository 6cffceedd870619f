"""`attend`: one entry point, several implementations chosen by name.

Implementations register themselves in `IMPLEMENTATIONS`; `"auto"` picks the best available for
the mask and backend. The Pallas kernels add `"pallas"` (and forced lowerings) by calling
`register_implementation` when their module is imported. Models choose the implementation through
their own `attention_impl` field (gin: `Transformer.attention_impl = "xla"`), so nothing here reads
gin at trace time.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax.numpy as jnp

from lexjax.attention.blocked import blocked_attention
from lexjax.attention.common import RelativeBias
from lexjax.attention.masks import MaskSpec
from lexjax.attention.reference import reference_attention

IMPLEMENTATIONS: dict[str, Callable[..., jnp.ndarray]] = {
    "reference": reference_attention,
    "xla": blocked_attention,
}


def register_implementation(name: str, fn: Callable[..., jnp.ndarray]) -> None:
    """Makes `attend(..., impl=name)` call `fn(q, k, v, *, mask, bias, **options)`."""
    IMPLEMENTATIONS[name] = fn


def _check_shapes(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> None:
    if not (q.ndim == k.ndim == v.ndim == 4):
        raise ValueError("attend expects q, k, v as [batch, length, heads, head_dim]; got shapes "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible q {q.shape}, k {k.shape}, v {v.shape}: k and v need the "
                         "same [batch, length, kv_heads], q and k the same batch and head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads "
                         f"({k.shape[2]})")


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, mask: MaskSpec = MaskSpec(),
           bias: Optional[RelativeBias] = None, impl: str = "auto",
           block_size: Optional[int] = None) -> jnp.ndarray:
    """Scaled dot-product attention under a `MaskSpec`, with an optional relative bias.

    Args:
      q: `[batch, length, heads, head_dim]` queries (positions 0..length-1).
      k, v: `[batch, length, kv_heads, head_dim]`; `heads` must be a multiple of `kv_heads`
        (grouped-query attention).
      mask: which keys each query sees (`MaskSpec`).
      bias: callable mapping relative distance `q_pos - k_pos` (int32, any shape S) to additive
        logits `[heads, *S]`; evaluated block by block, never as a materialized `[N, N]` input.
      impl: "reference" (materialized, O(N^2)), "xla" (blocked, O(N * span) for local masks),
        any registered kernel, or "auto".
      block_size: block length for blocked implementations.
    Returns:
      `[batch, length, heads, head_dim]` in v's dtype.
    """
    _check_shapes(q, k, v)
    name = "xla" if impl == "auto" else impl
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention impl {impl!r}; available: "
                         f"{sorted(IMPLEMENTATIONS) + ['auto']}")
    if name == "reference":
        return reference_attention(q, k, v, mask=mask, bias=bias)
    return IMPLEMENTATIONS[name](q, k, v, mask=mask, bias=bias, block_size=block_size)
