"""The static description of one kernel call and the per-block math every lowering shares.

`KernelPlan` is hashable (a `custom_vjp` non-differentiable argument). The helpers below work on
values (not refs) so the TPU, GPU and interpret kernels compute a block identically: scaled
scores, the relative bias for the block's positions, the mask, segment ids.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from lexjax.attention.common import NEG_INF
from lexjax.attention.kernels.bias import HeadFn, OffsetTable
from lexjax.attention.kernels.geometry import BlockGrid, div
from lexjax.attention.masks import MaskSpec

BIAS_KINDS = ("none", "head", "table")


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """Everything static about one attention call in kernel layout.

    Attributes:
      grid: block-sparse iteration space (mask, length, block sizes).
      num_heads, num_kv_heads: query heads and key/value heads (GQA group = their ratio).
      scale: softmax scale (1/sqrt of the real head dim).
      segmented: whether segment ids restrict attention.
      bias: "none", "head" (in-kernel `HeadBias.fn` on per-head params) or "table" (tiles of an
        `offset_table`).
      bias_fn: the `HeadBias.fn` when bias == "head".
      num_params: P, the per-head parameter count when bias == "head".
      table: the tile layout when bias == "table".
      interpret: run the kernels in Pallas interpret mode (CPU).
    """

    grid: BlockGrid
    num_heads: int
    num_kv_heads: int
    scale: float
    segmented: bool = False
    bias: str = "none"
    bias_fn: Optional[HeadFn] = None
    num_params: int = 0
    table: Optional[OffsetTable] = None
    interpret: bool = False

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


def positions(block_index, block: int, shape: tuple[int, int], axis: int) -> jnp.ndarray:
    """int32 positions of a block's rows (axis 0) or columns (axis 1), broadcast to `shape`."""
    return block_index * block + jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def mask_allows(mask: MaskSpec, q_pos: jnp.ndarray, k_pos: jnp.ndarray) -> jnp.ndarray:
    """`MaskSpec.allows` for non-negative positions, with divisions Mosaic can lower without a
    live TPU (`geometry.div`); tests check it equals `allows`."""
    rel = q_pos - k_pos
    ok = rel >= 0 if mask.causal else rel == rel
    if mask.window is not None:
        ok = ok & (rel < mask.window) & (rel > -mask.window)
    elif mask.chunk is not None:
        ok = ok & (div(q_pos, mask.chunk) == div(k_pos, mask.chunk))
    elif mask.blockwise is not None:
        ok = ok & (div(k_pos, mask.blockwise) + 1 >= div(q_pos, mask.blockwise))
    return ok


def visibility(plan: KernelPlan, q_pos: jnp.ndarray, k_pos: jnp.ndarray,
               seg_q: Optional[jnp.ndarray] = None, seg_k: Optional[jnp.ndarray] = None
               ) -> jnp.ndarray:
    """bool: the mask, real (non-padding) keys, and equal segments."""
    visible = mask_allows(plan.grid.mask, q_pos, k_pos) & (k_pos < plan.grid.length)
    if seg_q is not None:
        visible = visible & (seg_q == seg_k)
    return visible


def head_bias(plan: KernelPlan, theta, rel: jnp.ndarray) -> jnp.ndarray:
    """`HeadBias.fn` for one head on a tile of relative distances, float32."""
    return plan.bias_fn(theta, rel).astype(jnp.float32)


def head_param_grads(plan: KernelPlan, theta, rel: jnp.ndarray, ds: jnp.ndarray,
                     keepdims: bool = False) -> tuple:
    """Per-row parts of d(loss)/d(theta_p): `sum_k ds[r, k] * d fn(theta, rel)[r, k] / d theta_p`
    for each parameter p, each `[rows]` (`[rows, 1]` with `keepdims`: a column, which TPU v4
    cannot turn into a lane vector). Forward mode, one parameter at a time, so the kernel sees
    only single-axis reductions (and no tangent fan-in when fn uses each parameter once, which
    Mosaic GPU needs)."""
    theta = tuple(theta)
    grads = []
    for p in range(plan.num_params):
        def one(x, p=p):
            return head_bias(plan, theta[:p] + (x,) + theta[p + 1:], rel)
        _, slope = jax.jvp(one, (theta[p],), (jnp.float32(1.0),))
        grads.append(jnp.sum(ds * slope, axis=1, keepdims=keepdims))
    return tuple(grads)


def scores(plan: KernelPlan, s: jnp.ndarray, visible: jnp.ndarray,
           bias: Optional[jnp.ndarray]) -> jnp.ndarray:
    """Scaled float32 logits plus bias, masked with a finite -inf."""
    s = s * plan.scale
    if bias is not None:
        s = s + bias
    return jnp.where(visible, s, NEG_INF)
