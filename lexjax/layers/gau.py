"""The gated attention unit (GAU, Hua et al. 2022 §2): one single-head layer that replaces
attention + MLP.

    U = φ(X W_u) [.., e],  V = φ(X W_v) [.., e],  Z = φ(X W_z) [.., s],  φ = SiLU
    Q = γ_q ⊙ Z + β_q,  K = γ_k ⊙ Z + β_k            (per-dimension scale and offset of one Z)
    O = (U ⊙ Â) W_o,  Â = relu²(Q Kᵀ / T + b) V       (FLASH-Quad)
                      Â = mixed chunk attention        (FLASH: four transforms of Z, quad + lin)

e = 2d and s = 128 in the paper. The position scheme's hooks act as in `SelfAttention`: `rotate`
transforms every query and key (the paper applies RoPE to all four in FLASH), `relative_bias`
(one head) joins the paper's `b`, added inside the squared ReLU of the quadratic part. The paper
uses RoPE *and* a learned relative bias b; `score_bias` supplies that second scheme (the model
configs use one-head T5 buckets). It matters beyond faithfulness: with γ ~ N(0, 0.02) the scores
q·k/T start near 0, where relu² and its gradient vanish, so a RoPE-only GAU barely attends (nor
passes gradient to U, V, W_o) for its first tens of steps; a learned b starts the kernel at
relu²(b) > 0. Parameters: d·(2e + s) + e·d + 2·(2 or 4)·s, i.e. 6d² + ds at e = 2d — half of a
Transformer block with a 4d MLP (12d²), so a GAU model stacks twice as many layers for the same
size.

The layer holds no norm or residual; `lexjax.models.Flash` wraps it pre-norm.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from lexjax.attention import MaskSpec, RelativeBias
from lexjax.layers.basic import Dtype, dense, with_activation_axes
from lexjax.layers.decoding import KeyValueCache
from lexjax.layers.mixed_chunk import (init_mixed_chunk_cache, mixed_chunk_attention,
                                       mixed_chunk_decode_step, quadratic_attention,
                                       quadratic_attention_at)
from lexjax.positions import PositionScheme, RoPE, XPos

ACTIVATION_MLP = ("activation_batch", "activation_length", "activation_mlp")


class GatedAttentionUnit(nn.Module):
    """`x [batch, length, embed]`, int32 `positions [length]` -> `[batch, length, embed]`.

    Attributes:
      expansion_dim: e, the width of U and V (paper: 2 × embed).
      qk_dim: s, the width of the shared Z and of every query/key (paper: 128).
      position: position scheme template (cloned per layer, so learned biases are per layer).
      chunk_size: None for the full quadratic GAU (FLASH-Quad); C for mixed chunk attention.
      causal: causal attention (language models); False for bidirectional.
      quadratic_block_size: FLASH-Quad only: query block length of the blocked evaluation
        (None materializes the `[length, length]` scores).
      decode: decode against the "cache" collection (causal only): FLASH one token per call
        (`x [batch, 1, embed]`, `positions [1]`), FLASH-Quad any number (a key/value cache).
      score_bias: optional second position scheme (template) whose `relative_bias` hook is added
        to the position scheme's as the paper's learned b; its other hooks are not used.
      quadratic_length: FLASH-Quad only: T in relu²(q kᵀ / T + b), a constant (the paper: the
        training length), or None: the keys visible to the query (t + 1).
    """

    expansion_dim: int
    qk_dim: int = 128
    position: PositionScheme = RoPE()
    chunk_size: Optional[int] = None
    causal: bool = True
    quadratic_block_size: Optional[int] = None
    decode: bool = False
    score_bias: Optional[PositionScheme] = None
    quadratic_length: Optional[int] = None
    dtype: Dtype = jnp.float32

    def offset_scale(self, z: jnp.ndarray, count: int) -> jnp.ndarray:
        """`z [b, n, s]` -> `[b, n, count, s]`: `count` per-dimension transforms γ_i ⊙ z + β_i
        (γ ~ N(0, 0.02), β = 0, as in the paper)."""
        gamma = self.param("gamma", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, "kv")), (count, self.qk_dim), jnp.float32)
        beta = self.param("beta", nn.with_logical_partitioning(
            nn.initializers.zeros, (None, "kv")), (count, self.qk_dim), jnp.float32)
        return z[..., None, :] * gamma.astype(z.dtype) + beta.astype(z.dtype)

    def combined_bias(self, scheme: PositionScheme) -> Optional[RelativeBias]:
        """The paper's b: the position scheme's relative bias plus `score_bias`'s, one head."""
        hooks = [scheme.relative_bias(1, self.qk_dim)]
        if self.score_bias is not None:
            extra = self.score_bias.clone(parent=self, name="score_bias_hooks")
            hooks.append(extra.relative_bias(1, self.qk_dim))
        hooks = [hook for hook in hooks if hook is not None]
        if not hooks:
            return None
        return lambda rel: sum(hook(rel) for hook in hooks)

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray,
                 segment_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        """`x [batch, length, embed]` at `positions [length]`; `segment_ids [batch, length]`
        (packed documents) for the quadratic attention only: mixed chunk attention's cross-chunk
        state runs over the whole row."""
        if segment_ids is not None and self.chunk_size is not None:
            raise ValueError("mixed chunk attention cannot keep packed documents apart (its "
                             "cross-chunk state runs over the whole row)")
        u = nn.silu(dense(self.expansion_dim, ("embed", "mlp"), dtype=self.dtype, name="wu")(x))
        v = nn.silu(dense(self.expansion_dim, ("embed", "mlp"), dtype=self.dtype, name="wv")(x))
        z = nn.silu(dense(self.qk_dim, ("embed", "kv"), dtype=self.dtype, name="wz")(x))
        u = with_activation_axes(u, ACTIVATION_MLP)
        v = with_activation_axes(v, ACTIVATION_MLP)

        # Transforms in the order (q, k) or (q_quad, k_quad, q_lin, k_lin); queries are the even
        # ones, keys the odd ones, rotated together as "heads" of one rotation call.
        qk = self.offset_scale(z, 2 if self.chunk_size is None else 4)
        queries, keys = qk[:, :, 0::2], qk[:, :, 1::2]
        scheme = self.position.clone(parent=self, name="position_hooks")
        bias = self.combined_bias(scheme)
        if self.decode and self.chunk_size is None:
            attended = self.quadratic_decode(scheme, queries, keys, v, positions, bias)
        else:
            queries, keys = scheme.rotate(queries, keys, positions, positions)
            if self.decode:
                attended = self.mixed_chunk_decode(queries, keys, v, positions, bias)
            elif self.chunk_size is None:
                attended = quadratic_attention(queries[:, :, 0], keys[:, :, 0], v,
                                               causal=self.causal, bias=bias,
                                               block_size=self.quadratic_block_size,
                                               segment_ids=segment_ids,
                                               length=self.quadratic_length)
            else:
                attended = mixed_chunk_attention(queries[:, :, 0], keys[:, :, 0],
                                                 queries[:, :, 1], keys[:, :, 1], v,
                                                 chunk_size=self.chunk_size, causal=self.causal,
                                                 bias=bias)
        gated = with_activation_axes(u * attended, ACTIVATION_MLP)
        return dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="wo")(gated)

    def quadratic_decode(self, scheme: PositionScheme, queries: jnp.ndarray, keys: jnp.ndarray,
                         v: jnp.ndarray, positions: jnp.ndarray, bias) -> jnp.ndarray:
        """FLASH-Quad decoding: the queries `[b, n, 1, s]` at `positions [n]` against every
        earlier key, held unrotated in a `KeyValueCache` (so every position scheme stays exact)."""
        if not self.causal:
            raise ValueError("decoding needs a causal gated attention unit")
        all_keys, values, key_positions, key_valid = KeyValueCache(MaskSpec(), name="kv_cache")(
            keys, v[:, :, None], positions)
        queries, all_keys = scheme.rotate(queries, all_keys, positions, key_positions)
        out = quadratic_attention_at(queries[:, :, 0], all_keys[:, :, 0], values[:, :, 0],
                                     positions, key_positions, causal=True, bias=bias,
                                     k_valid=key_valid, length=self.quadratic_length)
        return out.astype(v.dtype)

    def mixed_chunk_decode(self, queries: jnp.ndarray, keys: jnp.ndarray, v: jnp.ndarray,
                           positions: jnp.ndarray, bias) -> jnp.ndarray:
        """FLASH decoding: mixed chunk attention of one token (`queries, keys [b, 1, 2, s]`,
        `v [b, 1, e]`, `positions [1]`) from the "cache" collection (the current chunk's keys
        and values, the state of the completed chunks; see `lexjax.layers.decoding` for when the
        cache is created instead)."""
        if not self.causal:
            raise ValueError("decoding needs causal mixed chunk attention")
        if isinstance(self.position, XPos):
            raise ValueError("FLASH decoding does not support XPos: its scales are centred "
                             "on the span of keys, so a per-token rotation differs from the "
                             "full forward pass; use RoPE or a relative-bias scheme")
        empty = init_mixed_chunk_cache(v.shape[0], self.chunk_size, self.qk_dim, v.shape[-1],
                                       v.dtype)
        cache = {name: self.variable("cache", name, lambda value=value: value)
                 for name, value in empty.items()}
        if self.is_initializing():
            return mixed_chunk_attention(queries[:, :, 0], keys[:, :, 0], queries[:, :, 1],
                                         keys[:, :, 1], v, chunk_size=self.chunk_size,
                                         causal=True, bias=bias)
        if v.shape[1] != 1:
            raise ValueError(f"FLASH decodes one token per call, got {v.shape[1]}; use "
                             "LanguageModel.prefill for a prompt")
        out, updated = mixed_chunk_decode_step(
            {name: var.value for name, var in cache.items()}, queries[:, 0, 0], keys[:, 0, 0],
            queries[:, 0, 1], keys[:, 0, 1], v[:, 0], positions[0], chunk_size=self.chunk_size,
            bias=bias)
        for name, var in cache.items():
            var.value = updated[name]
        return out[:, None]
