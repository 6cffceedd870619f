"""Relative biases the kernels can evaluate block by block.

`attend` takes any callable `rel [*S] int32 -> [heads, *S]`. A plain callable cannot run inside a
Pallas kernel when it closes over arrays (slopes, tables: kernels may not capture constants), and
its parameters would be invisible to the kernel's `custom_vjp`. `HeadBias` splits such a bias into

- `params`: float32 `[heads, P]`, per-head parameters (passed to the kernel as an input, so they
  can be traced values and receive gradients), and
- `fn(theta, rel)`: a pure elementwise function of one head's parameters and an int32 tile of
  relative distances, returning float32 of rel's shape. `theta[p]` is a scalar (inside a kernel a
  scalar read from SMEM; in plain JAX an element of a `[P]` row). `fn` may use Python numbers
  but must not close over arrays.

A `HeadBias` is itself a `RelativeBias` callable (`dense(params, rel)` when given, a vmap of
`fn` over heads otherwise), so every implementation accepts it unchanged.

Plain callables still work with the kernels: `offset_table` tabulates them, outside the kernel,
on the relative offsets of the visited block pairs (`[heads, offsets, block_q, block_kv]`,
O(heads * n * block) at most, never `[n, n]`), and the kernel reads one tile per block pair. Their
parameters cannot be differentiated through a kernel; the kernels raise a clear error then.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lexjax.attention.kernels.geometry import BlockGrid, div

HeadFn = Callable[[Sequence, jnp.ndarray], jnp.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)  # identity hash: params are arrays
class HeadBias:
    """A relative bias as per-head parameters plus a pure per-head function (see module doc).

    Attributes:
      fn: `(theta, rel) -> float32 rel.shape`, theta indexable by `theta[p]`, p < P.
      params: float32 `[heads, P]`.
      dense: optional `(params, rel) -> [heads, *rel.shape]`, a vectorized equivalent of `fn` for
        XLA paths (e.g. a gather where the kernel form uses selects). Must agree with `fn`.
    """

    fn: HeadFn
    params: jnp.ndarray
    dense: Optional[Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]] = None

    @property
    def num_heads(self) -> int:
        return self.params.shape[0]

    def __call__(self, rel: jnp.ndarray) -> jnp.ndarray:
        """`rel [*S]` int32 -> float32 `[heads, *S]` (the `RelativeBias` protocol)."""
        params = jnp.asarray(self.params, jnp.float32)
        if self.dense is not None:
            return self.dense(params, rel).astype(jnp.float32)
        return jax.vmap(lambda theta: self.fn(theta, rel))(params).astype(jnp.float32)


jax.tree_util.register_dataclass(HeadBias, data_fields=["params"], meta_fields=["fn", "dense"])


@dataclasses.dataclass(frozen=True)
class OffsetTable:
    """Where a block pair's tile sits in a table from `offset_table` (static, hashable).

    The relative distance inside the tile of pair (i, j) is `i*block_q - j*block_kv + (r - c)`;
    the tile index is `(i*block_q - j*block_kv - first) // stride`.
    """

    first: int
    stride: int
    count: int

    def index(self, i, j, grid: BlockGrid):
        return div(i * grid.block_q - j * grid.block_kv - self.first, self.stride)


def _visited_offsets(grid: BlockGrid) -> np.ndarray:
    i = np.arange(grid.num_q_blocks)
    start, count = grid.kv_range(i)
    offsets = [i_ * grid.block_q - (s + t) * grid.block_kv
               for i_, s, c in zip(i, start, count) for t in range(c)]
    return np.asarray(offsets)


def offset_table(bias: Callable[[jnp.ndarray], jnp.ndarray], grid: BlockGrid
                 ) -> tuple[jnp.ndarray, OffsetTable]:
    """Tabulates a plain bias callable on the relative offsets of the visited block pairs.

    Returns:
      table: float32 `[heads, count, block_q, block_kv]`; layout: the `OffsetTable`.
    """
    offsets = _visited_offsets(grid)
    stride = math.gcd(grid.block_q, grid.block_kv)
    first = int(offsets.min())
    layout = OffsetTable(first=first, stride=stride,
                         count=(int(offsets.max()) - first) // stride + 1)
    inner = (np.arange(grid.block_q)[:, None] - np.arange(grid.block_kv)[None, :])
    rel = first + stride * np.arange(layout.count)[:, None, None] + inner[None]
    table = bias(jnp.asarray(rel, jnp.int32)).astype(jnp.float32)
    return table, layout
