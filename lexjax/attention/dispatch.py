"""`attend`: one entry point, several implementations chosen by name.

Implementations live in `IMPLEMENTATIONS`; the Pallas kernels (`lexjax.attention.kernels`) are
registered below as `"pallas"` (kernels picked from `jax.default_backend()`, interpret mode on
CPU) and the forced lowerings `"pallas_tpu"` / `"pallas_gpu"`. `"auto"` is `"xla"` on every
backend: the kernels are verified in interpret mode and by ahead-of-time compilation, not yet
timed on TPU/GPU hardware, so they stay opt-in until a hardware benchmark says otherwise. Models
choose the implementation through their own `attention_impl` field (gin:
`Transformer.attention_impl = "pallas"`), so nothing here reads gin at trace time. Every
implementation honours `segment_ids` (packed documents).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np

from lexjax.attention.blocked import blocked_attention
from lexjax.attention.common import ContentBias, RelativeBias, Rotation
from lexjax.attention.kernels.impl import PALLAS_IMPLEMENTATIONS
from lexjax.attention.masks import MaskSpec
from lexjax.attention.reference import reference_attention

IMPLEMENTATIONS: dict[str, Callable[..., jnp.ndarray]] = {}
#: The implementations that take a `content_bias` (a bias of the queries' and keys' content).
CONTENT_BIAS_IMPLEMENTATIONS = {"reference", "xla"}
#: The implementations that apply a `rotation` themselves (block by block); the others get q and
#: k rotated over the whole sequence first.
ROTATION_IMPLEMENTATIONS = {"xla"}


def register_implementation(name: str, fn: Callable[..., jnp.ndarray]) -> None:
    """Makes `attend(..., impl=name)` call `fn(q, k, v, *, mask, bias, block_size,
    segment_ids)`; `segment_ids` (None or int32 `[batch, length]`) must be honoured."""
    IMPLEMENTATIONS[name] = fn


def _reference(q, k, v, *, mask, bias, block_size, segment_ids, content_bias=None):
    del block_size  # one block: everything materialized
    return reference_attention(q, k, v, mask=mask, bias=bias, segment_ids=segment_ids,
                               content_bias=content_bias)


register_implementation("reference", _reference)
register_implementation("xla", blocked_attention)
for _name, _fn in PALLAS_IMPLEMENTATIONS.items():
    register_implementation(_name, _fn)


def _check_shapes(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                  segment_ids: Optional[jnp.ndarray]) -> None:
    if not (q.ndim == k.ndim == v.ndim == 4):
        raise ValueError("attend expects q, k, v as [batch, length, heads, head_dim]; got shapes "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible q {q.shape}, k {k.shape}, v {v.shape}: k and v need the "
                         "same [batch, length, kv_heads], q and k the same batch and head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads "
                         f"({k.shape[2]})")
    if segment_ids is not None and segment_ids.shape != q.shape[:2]:
        raise ValueError(f"segment_ids must be [batch, length] = {q.shape[:2]}, got "
                         f"{segment_ids.shape}")


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, mask: MaskSpec = MaskSpec(),
           bias: Optional[RelativeBias] = None, impl: str = "auto",
           block_size: Optional[int] = None,
           segment_ids: Optional[jnp.ndarray] = None,
           content_bias: Optional[ContentBias] = None,
           rotation: Optional[Rotation] = None) -> jnp.ndarray:
    """Scaled dot-product self-attention under a `MaskSpec`, with an optional relative bias.

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
        of its own segment.
      content_bias: optional `ContentBias`: logits of the queries' and keys' content by
        position (DeBERTa's disentangled terms), evaluated block by block; "reference" and
        "xla" only (the Pallas kernels read a bias of distance from a per-head table).
      rotation: optional `Rotation` (a position scheme's `rotate`) of the un-rotated q and k.
        "xla" applies it per block of a local mask, at positions relative to the query block
        (exact for schemes whose scores depend on q_pos - k_pos only, and bounded: xPos stays
        finite at any length), elsewhere over positions 0..length-1 before attending; the
        other implementations get q and k rotated that way.
    Returns:
      `[batch, length, heads, head_dim]` in v's dtype.
    """
    _check_shapes(q, k, v, segment_ids)
    name = "xla" if impl == "auto" else impl
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention impl {impl!r}; available: "
                         f"{sorted(IMPLEMENTATIONS) + ['auto']}")
    extra = {}
    if rotation is not None and name in ROTATION_IMPLEMENTATIONS:
        extra["rotation"] = rotation
    elif rotation is not None:
        positions = np.arange(q.shape[1], dtype=np.int32)
        q, k = rotation(q, k, positions, positions)
    if content_bias is None:
        return IMPLEMENTATIONS[name](q, k, v, mask=mask, bias=bias, block_size=block_size,
                                     segment_ids=segment_ids, **extra)
    if name not in CONTENT_BIAS_IMPLEMENTATIONS:
        raise ValueError(
            f"attention impl {impl!r} takes no content bias (DeBERTa's content-to-position "
            "terms): the Pallas kernels add a bias of distance read from a per-head table, not "
            f"one of the queries and keys; use one of {sorted(CONTENT_BIAS_IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[name](q, k, v, mask=mask, bias=bias, block_size=block_size,
                                 segment_ids=segment_ids, content_bias=content_bias, **extra)
