"""Ripple attention (Zheng, Pan and Kong, "Ripple Attention for Visual Perception with
Sub-quadratic Complexity", ICML 2022, arXiv 2110.02453): kernel (linear) attention over an
H x W grid of tokens whose keys are weighted by their spatial distance from the query.

Tokens are the cells of the grid in row-major order (token t sits at row t // W, column t % W;
N = H W). The keys around a query at (i, j) fall into vicinal groups, "rings": ring r holds the
keys at Chebyshev distance max(|di|, |dj|) = r: square rings. The paper computes its groups
with summed-area tables, which sum axis-aligned rectangles in O(1), so its rings are square;
Euclidean (circular) rings have no such sums and are not offered. Each head has one positive
weight per ring below the threshold r_hat and one weight shared by every ring >= r_hat,
`ring_weights [heads, r_hat + 1]`:

    out_q = sum_k w_{ring(q,k)} (phi(q) . phi(k)) v_k  /  sum_k w_{ring(q,k)} (phi(q) . phi(k))

with phi a positive feature map (`ripple_attention_reference` computes this literally, O(N^2)).

The dynamic programme (`ripple_attention`): the summed-area table S of phi(k) (x) (v_k, 1)
(`[batch, H + 1, W + 1, heads, m, d + 1]`, the trailing 1 carries the denominator) gives the sum
over the square of radius r around every cell, clipped to the grid, by inclusion-exclusion of
four entries (`square_sums`). With square_r = rings 0..r, ring r = square_r - square_{r-1} and
the far rings = total - square_{r_hat-1}, so the weighted sum telescopes to

    sum_{r < R} (w_r - w_{r+1}) square_r  +  w_R total,        R = min(r_hat, max(H, W) - 1)

(rings past max(H, W) - 1 do not exist, so their weights never apply). Every query then
contracts its phi(q) with its weighted sum: O(N r_hat m d) time, linear in N for a fixed r_hat,
and exact up to rounding. As with any summed-area table, rounding is relative to the row's
total (the prefix sums reach it), not to the small local squares; sums run in float32 (float64
for float64 inputs).

Feature map: phi(x) = elu(x) + 1 (Katharopoulos et al., ICML 2020), positive everywhere and
deterministic (evaluation repeats exactly), the map of linear-attention ViT baselines;
`RippleAttention.feature_map` names it, so positive random features can join later.

Ring weights: the paper derives its spatial weights through a stick-breaking transformation;
here they are free per-head parameters, w = exp(log-weights), initialised to a per-head decay
(see `RippleAttention`). `shared_rings=True` gives every ring one weight: plain linear attention,
the baseline without spatial weighting. Only the bidirectional form exists (the paper defines
no causal one). Padding keys (`key_mask`, segment id 0) are dropped by zeroing their features.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lexjax.attention import MaskSpec
from lexjax.layers.basic import (ACTIVATION_HEADS, Dtype, dense, projected_qkv,
                                 with_activation_axes)
from lexjax.layers.decoder import DecoderLayer
from lexjax.positions import PositionScheme

_HIGHEST = jax.lax.Precision.HIGHEST


def elu_plus_one(x: jnp.ndarray) -> jnp.ndarray:
    """phi(x) = elu(x) + 1 > 0, computed in float32 (float64 for float64 `x`); any shape."""
    return jax.nn.elu(x.astype(jnp.promote_types(x.dtype, jnp.float32))) + 1.0


FEATURE_MAPS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {"elu_plus_one": elu_plus_one}


def check_grid(height: int, width: int, threshold: int) -> None:
    """A clear error for a grid side below 1 or a negative threshold."""
    if height < 1 or width < 1:
        raise ValueError(f"ripple attention needs a grid of at least 1 x 1, got {height} x {width}")
    if threshold < 0:
        raise ValueError(f"the ring threshold must be >= 0, got {threshold}")


def ring_index(height: int, width: int, threshold: int) -> np.ndarray:
    """The ring of every (query, key) pair of a row-major `height x width` grid: int
    `[N, N]`, min(max(|di|, |dj|), threshold), so values 0..threshold."""
    check_grid(height, width, threshold)
    rows, cols = np.divmod(np.arange(height * width), width)
    ring = np.maximum(np.abs(rows[:, None] - rows[None, :]), np.abs(cols[:, None] - cols[None, :]))
    return np.minimum(ring, threshold)


def summed_area_table(x: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """`x [batch, N, *e]` (row-major grid) -> `[batch, height + 1, width + 1, *e]`, entry (a, c)
    the sum of x over rows < a and columns < c."""
    grid = x.reshape((x.shape[0], height, width) + x.shape[2:])
    table = jnp.cumsum(jnp.cumsum(grid, axis=1), axis=2)
    return jnp.pad(table, [(0, 0), (1, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))


def _square_bounds(size: int, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Table indices (start, end) of the clipped span [i - radius, i + radius] of each i."""
    i = np.arange(size)
    return np.maximum(i - radius, 0), np.minimum(i + radius + 1, size)


def square_sums(table: jnp.ndarray, radius: int) -> jnp.ndarray:
    """Sums over the square of `radius` around every cell, clipped to the grid, by
    inclusion-exclusion of a `summed_area_table [batch, H + 1, W + 1, *e]` -> `[batch, H, W,
    *e]`."""
    row_lo, row_hi = _square_bounds(table.shape[1] - 1, radius)
    col_lo, col_hi = _square_bounds(table.shape[2] - 1, radius)
    upper, lower = table[:, row_lo], table[:, row_hi]
    return lower[:, :, col_hi] - lower[:, :, col_lo] - upper[:, :, col_hi] + upper[:, :, col_lo]


def square_coefficients(ring_weights: jnp.ndarray, height: int,
                        width: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The telescoped weights of the module doc: `ring_weights [heads, r_hat + 1]` ->
    (`[heads, R]`: w_r - w_{r+1} for the squares of radius r < R, `[heads]`: w_R for the
    whole grid), R = min(r_hat, max(height, width) - 1)."""
    reach = min(ring_weights.shape[-1] - 1, max(height, width) - 1)
    w = ring_weights[:, :reach + 1]
    return w[:, :-1] - w[:, 1:], w[:, -1]


@functools.partial(jax.checkpoint, static_argnums=(3, 4))
def _weighted_squares(table: jnp.ndarray, squares: jnp.ndarray, whole: jnp.ndarray,
                      height: int, width: int) -> jnp.ndarray:
    """sum_r squares[h, r] square_sums(table, r) + whole[h] total: `[b, H, W, h, m, e]`.
    Rematerialised, so the backward pass keeps only the table, not one square per radius."""
    out = whole[:, None, None] * table[:, -1:, -1:]  # [h, 1, 1] against [b, H, W, h, m, e]
    for radius in range(squares.shape[-1]):
        out = out + squares[:, radius, None, None] * square_sums(table, radius)
    return jnp.broadcast_to(out, (table.shape[0], height, width) + table.shape[3:])


def _accumulation_dtype(*arrays: jnp.ndarray) -> jnp.dtype:
    """float32, or float64 when an input is float64."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _check_inputs(q_features: jnp.ndarray, values: jnp.ndarray, ring_weights: jnp.ndarray,
                  height: int, width: int) -> None:
    check_grid(height, width, ring_weights.shape[-1] - 1)
    if q_features.shape[1] != height * width:
        raise ValueError(f"ripple attention: length {q_features.shape[1]} != height * width = "
                         f"{height} * {width} = {height * width}")
    if ring_weights.ndim != 2 or ring_weights.shape[0] != values.shape[2]:
        raise ValueError(f"ring_weights must be [heads={values.shape[2]}, threshold + 1], got "
                         f"{ring_weights.shape}")


def _masked_keys(k_features: jnp.ndarray, key_mask: Optional[jnp.ndarray],
                 dtype: jnp.dtype) -> jnp.ndarray:
    """`k_features [b, N, h, m]` in `dtype`, zero at padding keys (`key_mask [b, N]` False)."""
    k_features = k_features.astype(dtype)
    if key_mask is None:
        return k_features
    return jnp.where(jnp.asarray(key_mask, bool)[:, :, None, None], k_features, 0.0)


def _with_ones(v: jnp.ndarray) -> jnp.ndarray:
    """`[..., d]` -> `[..., d + 1]` with a trailing 1 (the denominator's channel)."""
    return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)


def _ratio(num_den: jnp.ndarray) -> jnp.ndarray:
    """`[..., d + 1]` (numerator, denominator last) -> numerator / denominator; 0 for a query
    without keys (every key padding), where both are 0."""
    den = num_den[..., -1:]
    return num_den[..., :-1] / jnp.where(den > 0, den, 1.0)


def ripple_attention(q_features: jnp.ndarray, k_features: jnp.ndarray, values: jnp.ndarray,
                     ring_weights: jnp.ndarray, *, height: int, width: int,
                     key_mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Ripple attention by summed-area tables (the module doc's dynamic programme).

    Args:
      q_features, k_features: `[batch, N, heads, m]`, feature-mapped (positive), N = height *
        width, tokens in row-major grid order.
      values: `[batch, N, heads, d]`.
      ring_weights: positive `[heads, threshold + 1]`: w_r for ring r < threshold, the last
        entry for every ring >= threshold.
      height, width: the grid.
      key_mask: optional bool `[batch, N]`; False: a padding key, left out of every sum.
    Returns:
      `[batch, N, heads, d]` in float32 (float64 for float64 inputs). O(N threshold m d).
    """
    _check_inputs(q_features, values, ring_weights, height, width)
    b, n, h, m = q_features.shape
    dtype = _accumulation_dtype(q_features, k_features, values, ring_weights)
    phi_k = _masked_keys(k_features, key_mask, dtype)
    pairs = phi_k[..., :, None] * _with_ones(values.astype(dtype))[..., None, :]
    table = summed_area_table(pairs, height, width)  # [b, H + 1, W + 1, h, m, d + 1]
    squares, whole = square_coefficients(ring_weights.astype(dtype), height, width)
    weighted = _weighted_squares(table, squares, whole, height, width).reshape(b, n, h, m, -1)
    num_den = jnp.einsum("bnhm,bnhme->bnhe", q_features.astype(dtype), weighted,
                         precision=_HIGHEST)
    return _ratio(num_den)


def ripple_attention_reference(q_features: jnp.ndarray, k_features: jnp.ndarray,
                               values: jnp.ndarray, ring_weights: jnp.ndarray, *, height: int,
                               width: int, key_mask: Optional[jnp.ndarray] = None
                               ) -> jnp.ndarray:
    """`ripple_attention` in its dense O(N^2) form, the weights materialised as `[heads, N, N]`
    from `ring_index` (the tests' truth); same arguments and result."""
    _check_inputs(q_features, values, ring_weights, height, width)
    dtype = _accumulation_dtype(q_features, k_features, values, ring_weights)
    rings = ring_index(height, width, ring_weights.shape[-1] - 1)
    weights = ring_weights.astype(dtype)[:, rings]  # [h, N, N]
    scores = jnp.einsum("bqhm,bkhm->bhqk", q_features.astype(dtype),
                        _masked_keys(k_features, key_mask, dtype), precision=_HIGHEST)
    num_den = jnp.einsum("bhqk,bkhe->bqhe", scores * weights[None],
                         _with_ones(values.astype(dtype)), precision=_HIGHEST)
    return _ratio(num_den)


def initial_log_weights(heads: int, threshold: int, decay: float) -> np.ndarray:
    """log w_{h, r} = -decay (h + 1) / heads * r, float32 `[heads, threshold + 1]`: weights
    falling geometrically with the ring, head h at rate decay (h + 1) / heads (heads of
    different reach, as ALiBi's slopes; the last head's neighbours outweigh ring r by
    e^(decay r))."""
    rates = decay * np.arange(1, heads + 1) / heads
    return (-rates[:, None] * np.arange(threshold + 1)[None, :]).astype(np.float32)


class RippleAttention(nn.Module):
    """Bidirectional ripple self-attention over a `grid_height x grid_width` grid of tokens:
    `x [batch, N, embed]` -> `[batch, N, embed]`, N = grid_height * grid_width (row-major).

    q, k, v projections as `SelfAttention`'s ("query", "key", "value": `[embed, heads, kv]`),
    the feature map on q and k, `ripple_attention`, then "out" (`[heads, kv, embed]`).

    Attributes:
      num_heads, head_dim: attention shape (m = d = head_dim).
      grid_height, grid_width: the token grid (patches of the image).
      ring_threshold: r_hat >= 1: rings 0..r_hat - 1 have their own weights, rings >= r_hat
        share one; "ring_log_weights" `[heads, r_hat + 1]` (weights = exp of them, positive),
        initialised by `initial_log_weights(heads, r_hat, ring_decay)`. Unused with
        `shared_rings`.
      ring_decay: the initial decay rate of the last head (see `initial_log_weights`).
      shared_rings: one weight for every ring, no ring parameter: plain linear attention.
      feature_map: a key of `FEATURE_MAPS` ("elu_plus_one").
      dtype: the projections' compute dtype (the attention core runs in float32).
      use_bias: biases on the four projections.
      position: a rotary scheme (RoPE, xPos) turning q and k before the feature map, or None.
        Relative-bias schemes are not applied: the ring weights are this attention's relative
        positions.
    """

    num_heads: int
    head_dim: int
    grid_height: int
    grid_width: int
    ring_threshold: int = 4
    ring_decay: float = 1.0
    shared_rings: bool = False
    feature_map: str = "elu_plus_one"
    dtype: Dtype = jnp.float32
    use_bias: bool = False
    position: Optional[PositionScheme] = None

    def __post_init__(self):
        check_grid(self.grid_height, self.grid_width, self.ring_threshold)
        if not self.shared_rings and self.ring_threshold < 1:
            raise ValueError(f"RippleAttention ring_threshold must be >= 1, got "
                             f"{self.ring_threshold} (shared_rings=True for one weight)")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature_map {self.feature_map!r}; use one of "
                             f"{tuple(FEATURE_MAPS)}")
        super().__post_init__()

    def ring_weights(self) -> jnp.ndarray:
        """The positive ring weights, float32 `[heads, r_hat + 1]` (`[heads, 1]` of ones when
        `shared_rings`)."""
        if self.shared_rings:
            return jnp.ones((self.num_heads, 1), jnp.float32)
        init = initial_log_weights(self.num_heads, self.ring_threshold, self.ring_decay)
        log_weights = self.param(
            "ring_log_weights",
            nn.with_logical_partitioning(lambda *_: jnp.asarray(init), ("heads", "relpos_buckets")),
            init.shape, jnp.float32)
        return jnp.exp(log_weights)

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: Optional[jnp.ndarray] = None,
                 segment_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        """`x [batch, N, embed]`, `positions [N]` (read only by a rotary `position`), optional
        int32 `segment_ids [batch, N]`: keys with id 0 (padding) are left out; other ids are one
        image (the grid is the row) -> `[batch, N, embed]`."""
        grid = self.grid_height * self.grid_width
        if x.shape[1] != grid:
            raise ValueError(f"RippleAttention: length {x.shape[1]} != grid_height * grid_width "
                             f"= {self.grid_height} * {self.grid_width} = {grid}")
        q, k, v = projected_qkv(self, x, positions, num_heads=self.num_heads,
                                head_dim=self.head_dim, dtype=self.dtype,
                                use_bias=self.use_bias, position=self.position)
        q = with_activation_axes(q, ACTIVATION_HEADS)
        phi = FEATURE_MAPS[self.feature_map]
        key_mask = None if segment_ids is None else jnp.asarray(segment_ids) > 0
        out = ripple_attention(phi(q), phi(k), v, self.ring_weights(), height=self.grid_height,
                               width=self.grid_width, key_mask=key_mask)
        return dense(x.shape[-1], ("heads", "kv", "embed"), dtype=self.dtype, contract=(-2, -1),
                     use_bias=self.use_bias, name="out")(out.astype(self.dtype))


class RippleLayer(DecoderLayer, kw_only=True):
    """A Transformer block whose attention is `RippleAttention` over a `grid_height x
    grid_width` grid (`ring_threshold`, `shared_rings`); the rest as `DecoderLayer`. The mask
    must be the full bidirectional `MaskSpec(causal=False)`."""

    grid_height: int = 0
    grid_width: int = 0
    ring_threshold: int = 4
    shared_rings: bool = False

    def __post_init__(self):
        if self.mask != MaskSpec(causal=False):
            raise ValueError(f"RippleLayer is bidirectional over the whole grid (ripple attention "
                             f"has no causal or local form): use MaskSpec(causal=False), got "
                             f"{self.mask!r}")
        super().__post_init__()

    def attention(self, h: jnp.ndarray, positions: jnp.ndarray,
                  segment_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        return RippleAttention(num_heads=self.num_heads, head_dim=self.head_dim,
                               grid_height=self.grid_height, grid_width=self.grid_width,
                               ring_threshold=self.ring_threshold,
                               shared_rings=self.shared_rings, dtype=self.dtype,
                               use_bias=self.use_bias, position=self.position,
                               name="attention")(h, positions, segment_ids)
