"""FLASH and FLASH-Quad (Hua et al. 2022): language models built from gated attention units.

One GAU (`lexjax.layers.GatedAttentionUnit`) replaces a Transformer block's attention *and* MLP
with about half its parameters, so a FLASH model of a Transformer's size stacks twice as many
layers. The size macros keep that accounting: with NUM_LAYERS = L, EMBED_DIM = d and MLP_DIM = m
the model stacks 2L GAUs of expansion e = m / 2 (the paper's e = 2d at the usual m = 4d) and
s = 128: 2L · (3dm/2 + ds) parameters against the Transformer's L · (4d² + 2dm); equal up to
the small Z projection (2Lds) when m = 4d. NUM_HEADS is ignored (a GAU has one head).
`chunk_size` picks the attention: C for FLASH (mixed chunk attention, linear in length), None
for FLASH-Quad (full quadratic attention).

Incremental decoding (FLASH): `init_cache(batch)` gives an empty "cache" collection (per layer:
the current chunk's keys and values and the cross-chunk state, O(C) memory at any length), and

    logits, vars = model.apply({"params": p, "cache": cache}, token[:, None], decode=True,
                               mutable=["cache"])

returns the logits at that token's position and the advanced cache (`vars["cache"]`).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import gin
import jax.numpy as jnp
import numpy as np

from lexjax.attention import MaskSpec
from lexjax.layers import Embedding, compute_dtype, dense, make_norm, with_activation_axes
from lexjax.layers.basic import Dtype
from lexjax.layers.gau import GatedAttentionUnit
from lexjax.models.lm import empty_cache
from lexjax.models.transformer import REMAT_POLICIES
from lexjax.positions import PositionScheme, RoPE


class FlashLayer(nn.Module):
    """Pre-norm residual GAU: x + GAU(Norm(x)); `[batch, length, embed]` -> same."""

    expansion_dim: int
    qk_dim: int
    position: PositionScheme
    chunk_size: Optional[int]
    quadratic_block_size: Optional[int] = None
    norm: str = "rmsnorm"
    dropout_rate: float = 0.0
    decode: bool = False
    deterministic: bool = True
    score_bias: Optional[PositionScheme] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
        h = make_norm(self.norm, dtype=self.dtype, name="pre_norm")(x)
        h = GatedAttentionUnit(expansion_dim=self.expansion_dim, qk_dim=self.qk_dim,
                               position=self.position, chunk_size=self.chunk_size, causal=True,
                               quadratic_block_size=self.quadratic_block_size,
                               decode=self.decode, score_bias=self.score_bias,
                               dtype=self.dtype, name="gau")(h, positions)
        h = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(h, deterministic=self.deterministic)
        return with_activation_axes(x + h)


@gin.configurable(module="lexjax.models")
class Flash(nn.Module):
    """Decoder-only GAU language model: int32 tokens `[batch, length]` -> float32 logits
    `[batch, length, vocab_size]`, causal.

    Attributes:
      num_layers: Transformer-equivalent depth L; the model stacks `units_per_layer * L` GAUs.
      embed_dim: d.
      mlp_dim: the Transformer MLP width m these layers stand in for; each GAU's expansion is
        e = m / units_per_layer (m / 2 by default: the paper's e = 2d at m = 4d).
      chunk_size: C of mixed chunk attention (FLASH; paper 256), or None for FLASH-Quad.
      qk_dim: s, the shared query/key width (paper 128).
      units_per_layer: GAUs per Transformer-equivalent layer (2, paper).
      position: the position scheme (RoPE by default, as in the paper).
      score_bias: a second scheme whose relative bias is added as the paper's learned b (the gin
        configs: one-head T5 buckets); None leaves only `position`'s hooks.
      attention_block_size: FLASH-Quad's query block length (memory O(block · length)).
      dtype: compute dtype name; parameters are float32, logits float32.
      remat_policy: one of `lexjax.models.transformer.REMAT_POLICIES`.
    """

    vocab_size: int
    num_layers: int
    embed_dim: int
    mlp_dim: int
    chunk_size: Optional[int] = 256
    qk_dim: int = 128
    units_per_layer: int = 2
    position: PositionScheme = RoPE()
    score_bias: Optional[PositionScheme] = None
    attention_block_size: Optional[int] = 512
    norm: str = "rmsnorm"
    tie_embeddings: bool = True
    dropout_rate: float = 0.0
    dtype: str = "float32"
    remat_policy: str = "none"

    @property
    def num_units(self) -> int:
        """The number of GAUs stacked."""
        return self.num_layers * self.units_per_layer

    @property
    def expansion_dim(self) -> int:
        """e of every GAU: the MLP width shared among the units of one layer (m / 2 by default)."""
        return self.mlp_dim // self.units_per_layer

    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward matmul FLOPs per token at sequence `length` (2 per multiply-add): projections
        d(3e + s); scores and A·V (s + e) per visible key (within the chunk for FLASH); FLASH's
        linear part 2se (the chunk state K_lin,gᵀ V_g and the query against it); logits."""
        d, e, s = self.embed_dim, self.expansion_dim, self.qk_dim
        if self.chunk_size is None:
            keys = MaskSpec(causal=True).mean_keys_per_query(length)
            linear = 0
        else:
            keys = MaskSpec(causal=True, chunk=self.chunk_size).mean_keys_per_query(length)
            linear = 2 * s * e
        unit = d * (3 * e + s) + (s + e) * keys + linear
        return 2.0 * (self.num_units * unit + d * self.vocab_size)

    @nn.nowrap
    def init_cache(self, batch_size: int) -> Any:
        """An empty decoding cache (the "cache" collection) for `batch_size` sequences."""
        return empty_cache(self, batch_size)

    def _check(self) -> None:
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; use one of "
                             f"{sorted(REMAT_POLICIES)}")
        if self.units_per_layer < 1 or self.mlp_dim < self.units_per_layer:
            raise ValueError(f"need units_per_layer >= 1 and mlp_dim >= units_per_layer, got "
                             f"{self.units_per_layer} and {self.mlp_dim}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int)
                                            or self.chunk_size < 1):
            raise ValueError(f"Flash.chunk_size must be a positive int (FLASH) or None "
                             f"(FLASH-Quad), got {self.chunk_size!r}")

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, *, deterministic: bool = True,
                 decode: bool = False) -> jnp.ndarray:
        """`tokens [batch, length]` -> logits `[batch, length, vocab]`; with `decode=True`,
        `tokens [batch, 1]` at the position held in the cache (see the module docstring)."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be int32 [batch, length], got shape {tokens.shape}")
        self._check()
        dtype = compute_dtype(self.dtype)
        if decode:
            initialized = self.has_variable("cache", "index")
            index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            positions = index.value[None]
            if initialized:
                index.value = index.value + 1
        else:
            positions = np.arange(tokens.shape[1], dtype=np.int32)

        embedding = Embedding(self.vocab_size, self.embed_dim, dtype=dtype, name="token_embedding")
        x = embedding(tokens)
        absolute = self.position.embed(positions, self.embed_dim)
        if absolute is not None:
            x = x + absolute.astype(dtype)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        x = with_activation_axes(x)

        layer_cls = FlashLayer
        if self.remat_policy != "none" and not decode:
            layer_cls = nn.remat(FlashLayer, policy=REMAT_POLICIES[self.remat_policy])
        for i in range(self.num_units):
            x = layer_cls(expansion_dim=self.expansion_dim, qk_dim=self.qk_dim,
                          position=self.position, chunk_size=self.chunk_size,
                          quadratic_block_size=self.attention_block_size, norm=self.norm,
                          dropout_rate=self.dropout_rate, decode=decode,
                          deterministic=deterministic, score_bias=self.score_bias,
                          dtype=dtype, name=f"unit_{i}")(x, positions)

        x = make_norm(self.norm, dtype=dtype, name="final_norm")(x)
        if self.tie_embeddings:
            return embedding.attend(x) * (self.embed_dim ** -0.5)
        logits = dense(self.vocab_size, ("embed", "vocab"), dtype=dtype, name="logits")(x)
        return logits.astype(jnp.float32)
