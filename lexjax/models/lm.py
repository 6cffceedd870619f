"""What the language models of the zoo share: the token embedding with any absolute position
embedding, the output logits, the remat-policy check and the empty decoding cache."""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lexjax.layers import Embedding, compute_dtype, dense, with_activation_axes
from lexjax.models.transformer import REMAT_POLICIES
from lexjax.positions import PositionScheme


def embed_tokens(module: nn.Module, tokens: jnp.ndarray, positions: jnp.ndarray,
                 position: Optional[PositionScheme], deterministic: bool) -> tuple[Embedding,
                                                                                   jnp.ndarray]:
    """(the token embedding, its output `[batch, length, embed]` plus any absolute position
    embedding, after dropout), created inside `module`'s compact scope; `module` has the fields
    `vocab_size`, `embed_dim`, `dropout_rate` and `dtype`."""
    dtype = compute_dtype(module.dtype)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be int32 [batch, length], got shape {tokens.shape}")
    embedding = Embedding(module.vocab_size, module.embed_dim, dtype=dtype,
                          name="token_embedding")
    x = embedding(tokens)
    if position is not None:
        absolute = position.embed(positions, module.embed_dim)
        if absolute is not None:
            x = x + absolute.astype(dtype)
    x = nn.Dropout(module.dropout_rate)(x, deterministic=deterministic)
    return embedding, with_activation_axes(x)


def output_logits(module: nn.Module, embedding: Embedding, x: jnp.ndarray) -> jnp.ndarray:
    """float32 logits `[batch, length, vocab]` from `x [batch, length, embed]`: tied to the
    embedding (scaled by embed^-0.5, as the Transformer) or a separate `logits` projection
    (`module.tie_embeddings`)."""
    if module.tie_embeddings:
        return embedding.attend(x) * (module.embed_dim ** -0.5)
    logits = dense(module.vocab_size, ("embed", "vocab"), dtype=x.dtype, name="logits")(x)
    return logits.astype(jnp.float32)


def check_remat(policy: str) -> None:
    """Raises a clear error for an unknown `remat_policy`."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {policy!r}; use one of {sorted(REMAT_POLICIES)}")


def empty_cache(model: nn.Module, batch_size: int) -> Any:
    """An empty decoding cache (the "cache" collection) for `batch_size` sequences: the shapes a
    `decode=True` call creates, filled with zeros (no parameters are initialised)."""
    tokens = jnp.zeros((batch_size, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, decode=True))
    return jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes["cache"])
