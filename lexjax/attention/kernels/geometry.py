"""Which (query block, key block) pairs a `MaskSpec` needs, computed ahead from the mask alone.

For every mask kind the keys a query sees form one interval `[first_key(q), last_key(q)]` whose
ends never decrease as q grows, so the key blocks a query block needs form one contiguous range,
and the same holds for the query blocks a key block feeds. A kernel grid therefore walks, for
query block i, the key blocks `kv_start(i) + t` for `t < kv_count(i)` (and symmetrically for the
key-side backward kernel): O(N * span) pairs for local masks, the lower triangle for full causal.
The same formulas run on numpy arrays (static tables, cost estimates) and on traced int32 scalars
(Pallas index maps and kernel bodies), so the grid and the kernel agree by construction.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lexjax.attention.masks import MaskSpec


def _static(x) -> bool:
    return isinstance(x, (int, np.ndarray, np.integer))


def div(a, b: int):
    """a // b for non-negative a: numpy floor division for static values, `lax.div` for traced
    ones (Mosaic lowers jnp's floor division through `sign`, which needs a live TPU)."""
    return a // b if _static(a) else jax.lax.div(a, jnp.asarray(b, a.dtype))


def rem(a, b: int):
    """a % b for non-negative a (see `div`)."""
    return a % b if _static(a) else jax.lax.rem(a, jnp.asarray(b, a.dtype))


def _maximum(a, b):
    return np.maximum(a, b) if _static(a) else jnp.maximum(a, b)


def _minimum(a, b):
    return np.minimum(a, b) if _static(a) else jnp.minimum(a, b)


def key_interval(mask: MaskSpec, q, n: int):
    """(first, last) key position query `q` sees, clipped to the `n` real keys.

    `q` is an int, an int numpy array or a traced int32; q >= 0.
    """
    last = q if mask.causal else n - 1
    if mask.window is not None:
        first = _maximum(q - (mask.window - 1), 0)
        if not mask.causal:
            last = q + (mask.window - 1)
    elif mask.chunk is not None:
        first = div(q, mask.chunk) * mask.chunk
        if not mask.causal:
            last = first + (mask.chunk - 1)
    elif mask.blockwise is not None:
        first = _maximum((div(q, mask.blockwise) - 1) * mask.blockwise, 0)
    else:
        first = q * 0
    return first, _minimum(last, n - 1)


def query_interval(mask: MaskSpec, k, n: int):
    """(first, last) query position that sees key `k` (0 <= k < n), clipped to the n real queries
    (padding queries past n need no gradient)."""
    first = k if mask.causal else k * 0
    last = k * 0 + (n - 1)
    if mask.window is not None:
        last = k + (mask.window - 1)
        if not mask.causal:
            first = _maximum(k - (mask.window - 1), 0)
    elif mask.chunk is not None:
        start = div(k, mask.chunk) * mask.chunk
        last = start + (mask.chunk - 1)
        if not mask.causal:
            first = start
    elif mask.blockwise is not None:
        last = (div(k, mask.blockwise) + 2) * mask.blockwise - 1
    return first, _minimum(last, n - 1)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class BlockGrid:
    """The block-sparse iteration space of one attention call (hashable, static).

    Attributes:
      mask: the mask.
      length: real sequence length n.
      block_q, block_kv: query and key block lengths.
    """

    mask: MaskSpec
    length: int
    block_q: int
    block_kv: int

    @property
    def padded_length(self) -> int:
        """n rounded up so that both block lengths divide it."""
        return _round_up(self.length, math.lcm(self.block_q, self.block_kv))

    @property
    def num_q_blocks(self) -> int:
        return self.padded_length // self.block_q

    @property
    def num_kv_blocks(self) -> int:
        return self.padded_length // self.block_kv

    # -- query-side walk (forward and dq kernels) ---------------------------------------------

    def kv_range(self, i):
        """(first key block, number of key blocks) that query block `i` needs (int or traced)."""
        # Query blocks made only of padding walk like the last real query (their rows are dropped).
        first_q = _minimum(i * self.block_q, self.length - 1)
        last_q = _minimum(i * self.block_q + (self.block_q - 1), self.length - 1)
        first_key, _ = key_interval(self.mask, first_q, self.length)
        _, last_key = key_interval(self.mask, last_q, self.length)
        start = div(first_key, self.block_kv)
        return start, div(last_key, self.block_kv) - start + 1

    def kv_block(self, i, t):
        """Key block visited at step `t` of query block `i`, clamped to the last needed block
        (steps past the count repeat it, so a pipeline fetches nothing new)."""
        start, count = self.kv_range(i)
        return start + _minimum(t, count - 1)

    @property
    def kv_counts(self) -> np.ndarray:
        """int `[num_q_blocks]`: key blocks visited per query block."""
        return self.kv_range(np.arange(self.num_q_blocks))[1]

    @property
    def kv_steps(self) -> int:
        """Grid width of the query-side kernels: the largest per-block count."""
        return int(self.kv_counts.max())

    # -- key-side walk (dk/dv kernel) ---------------------------------------------------------

    def q_range(self, j):
        """(first query block, number of query blocks) that read key block `j`."""
        first_k = _minimum(j * self.block_kv, self.length - 1)
        last_k = _minimum(first_k + (self.block_kv - 1), self.length - 1)
        first_query, _ = query_interval(self.mask, first_k, self.length)
        _, last_query = query_interval(self.mask, last_k, self.length)
        start = div(first_query, self.block_q)
        count = div(last_query, self.block_q) - start + 1
        # Key blocks made only of padding are read by no query.
        return start, count * (j * self.block_kv < self.length)

    def q_block(self, j, t):
        start, count = self.q_range(j)
        return start + _minimum(t, _maximum(count - 1, 0))

    @property
    def q_counts(self) -> np.ndarray:
        return self.q_range(np.arange(self.num_kv_blocks))[1]

    @property
    def q_steps(self) -> int:
        return max(int(self.q_counts.max()), 1)

    @property
    def visited_pairs(self) -> int:
        """Number of (query block, key block) pairs any kernel computes, per batch and head."""
        return int(self.kv_counts.sum())
