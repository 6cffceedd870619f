"""T5 relative position buckets (Raffel et al. 2020): a learned scalar per (bucket, head)."""
from __future__ import annotations

import flax.linen as nn
import gin
import jax.numpy as jnp
import numpy as np

from lexjax.attention.kernels import HeadBias
from lexjax.positions.base import PositionScheme


def relative_position_bucket(rel: jnp.ndarray, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jnp.ndarray:
    """Bucket of relative distance `rel = q_pos - k_pos` (int32, any shape) -> int32, same shape.

    Half the buckets (of each sign, if bidirectional) hold exact distances 0, 1, ...; the rest
    grow logarithmically up to `max_distance`, beyond which everything shares the last bucket.
    Causal (not bidirectional): keys in the future (rel < 0) share bucket 0 with rel = 0.
    """
    buckets = jnp.zeros_like(rel)
    n = rel
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    log_ratio = jnp.log(jnp.maximum(n, max_exact).astype(jnp.float32) / max_exact) / np.log(
        max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, n, large)


@gin.register(module="lexjax.positions")
class T5Buckets(PositionScheme):
    """T5's bucketed relative bias. The T5 paper shares one table across layers (a model's
    `share_relative_bias=True`, SPADE's default); by default each attention layer has its own
    table (flaxformer's unshared option), as for every learned relative scheme of the zoo."""

    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = False

    @nn.compact
    def relative_bias(self, num_heads, head_dim):
        table = self.param("rel_embedding", nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
            ("relpos_buckets", "heads")), (self.num_buckets, num_heads), jnp.float32)

        def bucket(rel):
            return relative_position_bucket(rel, bidirectional=self.bidirectional,
                                            num_buckets=self.num_buckets,
                                            max_distance=self.max_distance)

        def head(theta, rel):
            """One head (`HeadBias.fn`): the bucket's entry as a sum of one-hot terms, which a
            kernel evaluates (and differentiates per bucket) without a gather."""
            b = bucket(rel)
            return sum(theta[i] * (b == i).astype(jnp.float32) for i in range(self.num_buckets))

        return HeadBias(fn=head, params=table.T,
                        dense=lambda params, rel: jnp.take(params, bucket(rel), axis=1))
