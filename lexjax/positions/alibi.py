"""ALiBi (Press et al. 2022): a per-head linear penalty on distance, no position embeddings."""
from __future__ import annotations

import math
from typing import Optional

import gin
import jax.numpy as jnp
import numpy as np

from lexjax.attention.kernels import HeadBias
from lexjax.positions.base import PositionScheme


def alibi_slopes(num_heads: int) -> np.ndarray:
    """The paper's head slopes, float64 `[num_heads]`.

    For 2^a heads a geometric sequence starting at, and with ratio, 2^(-8/H) (8 heads: 1/2 ..
    1/256). Otherwise, with p = 2^floor(log2 H): the p-head slopes followed by every other slope
    of the 2p-head sequence, up to H in all (12 heads: 2^-1 .. 2^-8, then 2^-0.5 .. 2^-3.5).
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive, got {num_heads}")

    def geometric(n: int) -> np.ndarray:
        start = 2.0 ** (-8.0 / n)
        return start ** np.arange(1, n + 1, dtype=np.float64)

    p = 2 ** int(math.floor(math.log2(num_heads)))
    if p == num_heads:
        return geometric(p)
    return np.concatenate([geometric(p), geometric(2 * p)[0::2][:num_heads - p]])


@gin.register(module="lexjax.positions")
class ALiBi(PositionScheme):
    """bias_h(q, k) = -slope_h * |q - k|, not scaled by 1/sqrt(d).

    The reference code adds slope * k (identical rows) and relies on softmax's shift invariance
    under a causal mask; -slope * |q - k| equals it up to a per-row constant there and stays
    correct for bidirectional and windowed masks.

    Attributes:
      slopes: explicit per-head slopes (a checkpoint trained with another head order, e.g.
        MPT's for head counts that are not powers of 2), or None for the paper's
        (`alibi_slopes`).
    """

    slopes: Optional[tuple[float, ...]] = None

    def relative_bias(self, num_heads, head_dim):
        if self.slopes is None:
            slopes = alibi_slopes(num_heads)
        elif len(self.slopes) != num_heads:
            raise ValueError(f"ALiBi.slopes has {len(self.slopes)} values for {num_heads} heads")
        else:
            slopes = np.asarray(self.slopes, np.float64)
        return HeadBias(fn=alibi_head_bias, params=jnp.asarray(slopes, jnp.float32)[:, None])


def alibi_head_bias(theta, rel: jnp.ndarray) -> jnp.ndarray:
    """One head's ALiBi bias (`HeadBias.fn`): theta = (slope,)."""
    return -theta[0] * jnp.abs(rel.astype(jnp.float32))
