"""The mask language shared by every attention implementation.

`MaskSpec` describes which keys a query may see, as a pure function of the two positions
(`allows`), plus, for the blocked implementations, how far back (and ahead) of a query block the
visible keys can reach (`key_blocks_around`). Kinds (at most one of window / chunk / blockwise),
and global tokens on top of a window or chunk:

- full:       causal: key <= query;  bidirectional: everything.
- window=w:   causal: query-w < key <= query;  bidirectional: |query-key| < w.
- chunk=c:    disjoint chunks of c tokens (Xiong et al. 2022's local attention), causal inside a
              chunk unless `causal=False`.
- blockwise=b: blockwise causal attention (BCA) of the LeX paper: a query in block j = q // b sees
              the keys of blocks j-1 and j that are not in its future. Causal only.
- global_tokens=G: the first G positions see every key and every query sees them, on top of a
              window or chunk mask (Xiong et al. 2022's local attention with global tokens).
              Bidirectional only.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional

import gin
import jax.numpy as jnp
import numpy as np


@gin.register(module="lexjax.attention")
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Which keys each query sees. Immutable and hashable (usable as a static jit argument).

    `global_tokens`: how many leading positions are global (see the module doc); bidirectional
    window or chunk masks only.
    """

    causal: bool = True
    window: Optional[int] = None
    chunk: Optional[int] = None
    blockwise: Optional[int] = None
    global_tokens: int = 0

    def __post_init__(self):
        local = {k: v for k, v in (("window", self.window), ("chunk", self.chunk),
                                   ("blockwise", self.blockwise)) if v is not None}
        if len(local) > 1:
            raise ValueError(f"MaskSpec takes at most one of window/chunk/blockwise, got {local}")
        for name, size in local.items():
            if isinstance(size, numbers.Integral) and not isinstance(size, bool):
                object.__setattr__(self, name, int(size))  # numpy ints hash and compare alike
                size = int(size)
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"MaskSpec.{name} must be a positive int, got {size!r}")
        if self.blockwise is not None and not self.causal:
            raise ValueError("MaskSpec(blockwise=...) is blockwise *causal* attention: "
                             "it needs causal=True")
        self._check_global_tokens()

    def _check_global_tokens(self) -> None:
        count = self.global_tokens
        if isinstance(count, numbers.Integral) and not isinstance(count, bool):
            count = int(count)
            object.__setattr__(self, "global_tokens", count)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"MaskSpec.global_tokens must be a non-negative int, got {count!r}")
        if count == 0:
            return
        if self.causal:
            raise ValueError(f"MaskSpec(global_tokens={count}) needs causal=False: global tokens "
                             "see later keys and are seen by earlier queries (pass causal=False, "
                             "or global_tokens=0 for a causal mask)")
        if self.kind == "full":
            raise ValueError(f"MaskSpec(global_tokens={count}): global tokens only add to a local "
                             "mask (window or chunk); a full bidirectional mask already lets "
                             "every query see every key (pass window= or chunk=, or drop "
                             "global_tokens)")

    @property
    def kind(self) -> str:
        """One of "full", "window", "chunk", "blockwise"."""
        for name in ("window", "chunk", "blockwise"):
            if getattr(self, name) is not None:
                return name
        return "full"

    @property
    def is_local(self) -> bool:
        """True when each query sees a bounded number of keys (cost O(N * span)); with global
        tokens, every query but the G global ones (cost O(N * (span + G)))."""
        return self.kind != "full"

    def allows(self, q_pos: jnp.ndarray, k_pos: jnp.ndarray) -> jnp.ndarray:
        """Boolean visibility for broadcastable int32 query and key positions."""
        rel = q_pos - k_pos
        ok = rel >= 0 if self.causal else jnp.ones_like(rel, dtype=bool)
        if self.window is not None:
            ok = ok & (jnp.abs(rel) < self.window)
        elif self.chunk is not None:
            ok = ok & (q_pos // self.chunk == k_pos // self.chunk)
        elif self.blockwise is not None:
            ok = ok & (k_pos // self.blockwise >= q_pos // self.blockwise - 1)
        if self.global_tokens:
            ok = ok | (q_pos < self.global_tokens) | (k_pos < self.global_tokens)
        return ok

    def mean_keys_per_query(self, length: int) -> float:
        """Mean number of keys a query sees at sequence `length` (for FLOP accounting)."""
        if self.global_tokens:
            return self._mean_keys_with_global_tokens(length)
        if self.window is not None:
            w = min(self.window, length)
            return w - w * (w - 1) / (2 * length) if self.causal else min(2 * w - 1, length)
        if self.chunk is not None:
            c = min(self.chunk, length)
            return (c + 1) / 2 if self.causal else c
        if self.blockwise is not None:
            b = min(self.blockwise, length)
            return b + (b + 1) / 2 if length > b else (b + 1) / 2
        return (length + 1) / 2 if self.causal else length

    def _mean_keys_with_global_tokens(self, length: int) -> float:
        """Exact mean over the `length` queries, O(length): a global query sees every key; any
        other query its local keys `[first, last]` plus the global keys before `first`."""
        q = np.arange(length)
        if self.window is not None:
            first = np.maximum(q - (self.window - 1), 0)
            last = np.minimum(q + (self.window - 1), length - 1)
        else:
            first = q // self.chunk * self.chunk
            last = np.minimum(first + (self.chunk - 1), length - 1)
        local = last - first + 1 + np.minimum(first, self.global_tokens)
        return float(np.where(q < self.global_tokens, length, local).mean())

    @property
    def max_lookback(self) -> Optional[int]:
        """The largest `query - key` distance a query may see (what a decoding cache must keep):
        w - 1 for a window, c - 1 for chunks, 2b - 1 for BCA; None for a full mask (unbounded).

        Global tokens are not counted (the local mask's value stands): they come only with
        bidirectional masks, which never decode.
        """
        if self.window is not None:
            return self.window - 1
        if self.chunk is not None:
            return self.chunk - 1
        if self.blockwise is not None:
            return 2 * self.blockwise - 1
        return None

    def key_blocks_around(self, block: int) -> tuple[int, int]:
        """How many key blocks before and after a query block can hold visible keys.

        Query and key sequences are cut into aligned blocks of `block` tokens. Returns
        `(before, after)`: query block i needs key blocks i-before .. i+after and no others.
        Only defined for local masks. The span is the local mask's alone: implementations handle
        global keys and global queries separately.
        """
        if self.kind == "full":
            raise ValueError("a full mask has no bounded key span; use the full-causal path")
        if self.window is not None:
            reach = self.window - 1  # from a block's first query back to its earliest key
        elif self.chunk is not None:
            reach = self.chunk - math.gcd(block, self.chunk)  # largest (start mod chunk)
        else:
            b = self.blockwise
            reach = b + b - math.gcd(block, b)
        before = -(-reach // block)
        if self.causal:
            return before, 0
        # Bidirectional masks are symmetric: the reach from a block's last query forward is the same.
        return before, before
