"""`attend`: one entry point, several implementations chosen by name.

Implementations live in `IMPLEMENTATIONS`; the Pallas kernels (`lexjax.attention.kernels`) are
registered below as `"pallas"` (lowering picked from `jax.default_backend()`, interpret mode on
CPU) and the forced lowerings `"pallas_tpu"` / `"pallas_gpu"`. `"auto"` is `"xla"` on every
backend: the kernels are verified in interpret mode and by ahead-of-time compilation, not yet
timed on TPU/GPU hardware, so they stay opt-in until a hardware benchmark says otherwise. Models
choose the implementation through their own `attention_impl` field (gin:
`Transformer.attention_impl = "pallas"`), so nothing here reads gin at trace time.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax.numpy as jnp

from lexjax.attention.blocked import blocked_attention
from lexjax.attention.common import (RelativeBias, group_query_heads,
                                     masked_softmax_attention)
from lexjax.attention.kernels.impl import PALLAS_IMPLEMENTATIONS
from lexjax.attention.masks import MaskSpec
from lexjax.attention.reference import reference_attention

IMPLEMENTATIONS: dict[str, Callable[..., jnp.ndarray]] = {
    "reference": reference_attention,
    "xla": blocked_attention,
}


# Implementations that take `segment_ids` (packed sequences).
SEGMENT_ID_IMPLEMENTATIONS: set[str] = {"reference"}


def register_implementation(name: str, fn: Callable[..., jnp.ndarray], *,
                            segment_ids: bool = False) -> None:
    """Makes `attend(..., impl=name)` call `fn(q, k, v, *, mask, bias, block_size)`, plus
    `segment_ids=...` when given and `segment_ids=True` here."""
    IMPLEMENTATIONS[name] = fn
    if segment_ids:
        SEGMENT_ID_IMPLEMENTATIONS.add(name)
    else:
        SEGMENT_ID_IMPLEMENTATIONS.discard(name)


for _name, _fn in PALLAS_IMPLEMENTATIONS.items():
    register_implementation(_name, _fn, segment_ids=True)


def reference_with_segments(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, mask: MaskSpec,
                            bias: Optional[RelativeBias], segment_ids: jnp.ndarray
                            ) -> jnp.ndarray:
    """Materialized attention where query i also needs `segment_ids[b, i] == segment_ids[b, j]`.

    Each query is its own one-row span (leading dims `[b, n]`), so the per-query segment test
    is the span's key-validity mask of `masked_softmax_attention`.
    """
    b, n, h, _ = q.shape
    pos = jnp.arange(n, dtype=jnp.int32)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [b, n(q), n(k)]
    out = masked_softmax_attention(group_query_heads(q, k.shape[2])[:, :, None], k[:, None],
                                   v[:, None], pos[:, None], pos[None, :], mask=mask, bias=bias,
                                   k_valid=same)
    return out.reshape(b, n, h, v.shape[-1])


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
           block_size: Optional[int] = None,
           segment_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
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
      segment_ids: optional int32 `[batch, length]` for packed sequences: a query sees only keys
        of its own segment (implementations in `SEGMENT_ID_IMPLEMENTATIONS`).
    Returns:
      `[batch, length, heads, head_dim]` in v's dtype.
    """
    _check_shapes(q, k, v)
    name = "xla" if impl == "auto" else impl
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention impl {impl!r}; available: "
                         f"{sorted(IMPLEMENTATIONS) + ['auto']}")
    if segment_ids is not None:
        if name not in SEGMENT_ID_IMPLEMENTATIONS:
            raise ValueError(f"attention impl {name!r} does not take segment_ids; use one of "
                             f"{sorted(SEGMENT_ID_IMPLEMENTATIONS)}")
        if segment_ids.shape != q.shape[:2]:
            raise ValueError(f"segment_ids must be [batch, length] = {q.shape[:2]}, got "
                             f"{segment_ids.shape}")
        if name == "reference":
            return reference_with_segments(q, k, v, mask=mask, bias=bias,
                                           segment_ids=segment_ids)
        return IMPLEMENTATIONS[name](q, k, v, mask=mask, bias=bias, block_size=block_size,
                                     segment_ids=segment_ids)
    if name == "reference":
        return reference_attention(q, k, v, mask=mask, bias=bias)
    return IMPLEMENTATIONS[name](q, k, v, mask=mask, bias=bias, block_size=block_size)
