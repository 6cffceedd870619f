"""DeBERTa's disentangled self-attention (He et al., ICLR 2021; v2/v3 log buckets).

    A_ij = (q^c_i . k^c_j  +  q^c_i . k^r_d(i,j)  +  k^c_j . q^r_d(i,j)) / sqrt(d (1 + terms))

content-to-content, content-to-position ("c2p") and position-to-content ("p2c") scores over
bucketed relative positions. Both position terms index the relative table at the same
d(i, j) = clamp(bucket(i - j) + span, 0, 2 span - 1), as the official code and transformers do
(the paper writes d(j, i) for p2c; the code's convention is what checkpoints hold). The relative
embeddings `[2 span, embed]` are shared by all layers (the model layer-norms them once), and each
layer projects them with its own content projections (`share_projections`, v2/v3) or with separate
`position_key` / `position_query` projections (v1).

The position terms depend on the queries' and keys' content, so they reach the attention core as a
`ContentBias`: per layer, `c2p [batch, length, heads, 2 span]` (each query against every relative
key) and `p2c` (each key against every relative query) are computed once, and each block of the
blocked XLA path gathers its `[heads, q, k]` scores from them by position: memory O(length x span),
never `[length, length]`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from lexjax.attention import MaskSpec, attend
from lexjax.attention.common import ContentBias
from lexjax.layers.basic import ACTIVATION_HEADS, dense, make_norm, with_activation_axes
from lexjax.layers.decoder import DecoderLayer

POSITION_TERMS = ("c2p", "p2c")


def log_bucket_positions(distance: np.ndarray, position_buckets: int,
                         max_relative_positions: int) -> np.ndarray:
    """DeBERTa-v2's log buckets of relative distances (the official `make_log_bucket_position`,
    float64 numpy): |r| <= buckets/2 stays r; farther distances share buckets that grow
    logarithmically up to `max_relative_positions`. int64 of `distance`'s shape."""
    rel = np.asarray(distance, np.int64)
    mid = position_buckets // 2
    abs_pos = np.where((rel < mid) & (rel > -mid), mid - 1, np.abs(rel)).astype(np.float64)
    log_pos = np.ceil(np.log(abs_pos / mid) / np.log((max_relative_positions - 1) / mid)
                      * (mid - 1)) + mid
    return np.where(abs_pos <= mid, rel, log_pos * np.sign(rel)).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class RelativePositions:
    """How DeBERTa indexes its relative embeddings.

    Attributes:
      position_buckets: log buckets (v2/v3: 256); 0 for v1's plain clipped distances.
      max_relative_positions: the farthest distance the buckets tell apart (512).
    """

    position_buckets: int = 256
    max_relative_positions: int = 512

    def __post_init__(self):
        if self.max_relative_positions < 2 or self.position_buckets < 0 or (
                self.position_buckets and self.position_buckets < 4):
            raise ValueError("relative positions need max_relative_positions >= 2 and "
                             "position_buckets 0 (no buckets) or >= 4, got "
                             f"{self.max_relative_positions} and {self.position_buckets}")

    @property
    def span(self) -> int:
        """k of the paper: the table holds 2k relative embeddings."""
        return self.position_buckets or self.max_relative_positions

    @property
    def _reach(self) -> int:
        """A distance past which every index is saturated (0 or 2 span - 1)."""
        return 2 * max(self.span, self.max_relative_positions)

    def index_table(self) -> np.ndarray:
        """int32 `[2 reach + 1]`: the table index d of every distance in [-reach, reach]."""
        reach = self._reach
        rel = np.arange(-reach, reach + 1)
        if self.position_buckets:
            rel = log_bucket_positions(rel, self.position_buckets, self.max_relative_positions)
        return np.clip(rel + self.span, 0, 2 * self.span - 1).astype(np.int32)

    def index(self, distance: jnp.ndarray) -> jnp.ndarray:
        """int32 table indices d of `distance = q_pos - k_pos` (any shape)."""
        reach = self._reach
        return jnp.asarray(self.index_table())[jnp.clip(distance, -reach, reach) + reach]


def disentangled_bias(c2p: Optional[jnp.ndarray], p2c: Optional[jnp.ndarray],
                      relative: RelativePositions) -> ContentBias:
    """The position terms as a `ContentBias` for `attend`.

    Args:
      c2p: float32 `[batch, length, heads, 2 span]`: each query against each relative key
        (already scaled), or None.
      p2c: float32 `[batch, length, heads, 2 span]`: each key against each relative query, or
        None.
    Returns:
      `(q_pos [..., q], k_pos [..., k]) -> [batch, ..., heads, q, k]`:
      c2p[q, d(q, k)] + p2c[k, d(q, k)].
    """
    length = (c2p if c2p is not None else p2c).shape[1]

    def rows_at(scores, positions):  # [b, n, h, r] at positions [..., m] -> [b, ..., h, m, r]
        rows = jnp.take(scores, jnp.clip(positions, 0, length - 1), axis=1)
        return jnp.moveaxis(rows, -2, -3)

    def bias(q_pos, k_pos):
        index = relative.index(q_pos[..., :, None] - k_pos[..., None, :])  # [..., q, k]
        index = index[None, ..., None, :, :]                              # [1, ..., 1, q, k]
        total = 0.0
        if c2p is not None:
            total = total + jnp.take_along_axis(rows_at(c2p, q_pos), index, axis=-1)
        if p2c is not None:
            by_key = jnp.take_along_axis(rows_at(p2c, k_pos), jnp.swapaxes(index, -1, -2),
                                         axis=-1)                         # [b, ..., h, k, q]
            total = total + jnp.swapaxes(by_key, -1, -2)
        return total
    return bias


class DisentangledSelfAttention(nn.Module):
    """`x [batch, length, embed]` -> `[batch, length, embed]` under DeBERTa's attention.

    Attributes:
      relative: the relative-position indexing; terms: the position terms ("c2p", "p2c").
      share_projections: project the relative embeddings with the content `query` / `key`
        projections (v2/v3), else with `position_query` / `position_key` (v1).
      use_bias: every projection has a bias (the official models'; shared projections then
        add it to the relative embeddings' projections too).
    """

    num_heads: int
    head_dim: int
    relative: RelativePositions
    mask: MaskSpec = MaskSpec(causal=False)
    terms: tuple[str, ...] = POSITION_TERMS
    share_projections: bool = True
    attention_impl: str = "auto"
    block_size: Optional[int] = None
    dtype: jnp.dtype = jnp.float32
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, relative_embeddings: jnp.ndarray,
                 segment_ids: Optional[jnp.ndarray] = None,
                 queries: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        """Args:
          x: `[batch, length, embed]`: the keys' and values' (and, by default, the queries')
            inputs.
          relative_embeddings: `[2 span, embed]`, shared by every layer.
          segment_ids: optional int32 `[batch, length]` (packed documents kept apart).
          queries: optional `[batch, length, embed]` query inputs (the enhanced mask decoder's
            hidden states plus absolute positions).
        """
        heads = (self.num_heads, self.head_dim)

        def projection(name: str):
            return dense(heads, ("embed", "heads", "kv"), dtype=self.dtype,
                         use_bias=self.use_bias, name=name)

        query, key = projection("query"), projection("key")
        q = query(x if queries is None else queries)
        k = key(x)
        v = projection("value")(x)
        scale = (self.head_dim * (1 + len(self.terms))) ** -0.5
        rel = relative_embeddings.astype(self.dtype)
        c2p = p2c = None
        if "c2p" in self.terms:
            position_key = key if self.share_projections else projection("position_key")
            c2p = jnp.einsum("bnhd,rhd->bnhr", q, position_key(rel),
                             preferred_element_type=jnp.float32) * scale
        if "p2c" in self.terms:
            position_query = (query if self.share_projections
                              else projection("position_query"))
            p2c = jnp.einsum("bnhd,rhd->bnhr", k, position_query(rel),
                             preferred_element_type=jnp.float32) * scale
        q = with_activation_axes(q, ACTIVATION_HEADS)
        # attend scales q.k by head_dim^-0.5; the extra factor makes it sqrt(d (1 + terms)).
        content_scale = (1 + len(self.terms)) ** -0.5
        out = attend(q * jnp.asarray(content_scale, q.dtype), k, v, mask=self.mask,
                     impl=self.attention_impl, block_size=self.block_size,
                     segment_ids=segment_ids,
                     content_bias=(disentangled_bias(c2p, p2c, self.relative)
                                   if self.terms else None))
        return dense(x.shape[-1], ("heads", "kv", "embed"), dtype=self.dtype, contract=(-2, -1),
                     use_bias=self.use_bias, name="out")(out)


class DisentangledLayer(DecoderLayer, kw_only=True):
    """The block with disentangled attention: `queries + Attn(Norm(queries), Norm(x))`, then the
    MLP branch (post-norm: `Norm(queries + Attn(queries, x))`, the official models' order);
    `queries` defaults to `x` (the enhanced mask decoder passes its own). Returns
    `[batch, length, embed]`."""

    relative: RelativePositions = RelativePositions()
    terms: tuple[str, ...] = POSITION_TERMS
    share_projections: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray, relative_embeddings: jnp.ndarray,
                 segment_ids: Optional[jnp.ndarray] = None,
                 queries: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        attention = DisentangledSelfAttention(
            num_heads=self.num_heads, head_dim=self.head_dim, relative=self.relative,
            mask=self.mask, terms=self.terms, share_projections=self.share_projections,
            attention_impl=self.attention_impl, block_size=self.attention_block_size,
            dtype=self.dtype, use_bias=self.use_bias, name="attention")
        residual = x if queries is None else queries
        if self.norm_position == "post":
            h = attention(x, relative_embeddings, segment_ids, queries)
            return self.feed_forward(make_norm(self.norm, dtype=self.dtype,
                                               name="post_attention_norm")(
                residual + self.residual_dropout(h)))
        norm = make_norm(self.norm, dtype=self.dtype, name="pre_attention_norm")
        h = attention(norm(x), relative_embeddings, segment_ids,
                      None if queries is None else norm(queries))
        return self.feed_forward(residual + self.residual_dropout(h))
