"""The language-model loss convention (decoder-only, t5x style), shared by training and scoring.

A training example is `tokens [batch, length]`. The model reads the tokens shifted right by one
(`0`, the pad id, acts as beginning-of-sequence) and predicts every token, so an example of length
L trains L predictions at positions 0 .. L-1, and evaluating "at length L" means the same thing.
Models that emit logits for the last M positions only (Perceiver AR) are scored on those.

Packed rows carry segment ids (`lexjax.data.segment_ids`: 1, 2, ... per document piece, 0 for
padding): every segment starts from BOS, and padding is not scored.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import optax

BOS_ID = 0


def shift_right(tokens: jnp.ndarray, segment_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """`[batch, length]` -> `[batch, length]`: BOS then tokens[:, :-1]; with `segment_ids`, BOS at
    the first token of every segment too (a document never reads its predecessor's last token)."""
    shifted = jnp.pad(tokens[:, :-1], [(0, 0), (1, 0)], constant_values=BOS_ID)
    if segment_ids is None:
        return shifted
    starts = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], [(0, 0), (1, 0)],
                     constant_values=True)
    return jnp.where(starts, BOS_ID, shifted)


def token_losses(logits: jnp.ndarray, tokens: jnp.ndarray) -> jnp.ndarray:
    """Per-token cross entropy (nats) `[batch, m]` of logits `[batch, m, vocab]` against the last
    m targets of `tokens [batch, length]`, computed in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           last(tokens, logits.shape[1]))


def last(x: jnp.ndarray, m: int) -> jnp.ndarray:
    """The last `m` positions of `x [batch, length, ...]` (what a model emitting m logits
    predicts)."""
    return x[:, x.shape[1] - m:]


def mean_loss(logits: jnp.ndarray, tokens: jnp.ndarray,
              segment_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """The mean token loss, over the tokens that are not padding (segment id 0)."""
    losses = token_losses(logits, tokens)
    if segment_ids is None:
        return jnp.mean(losses)
    weights = (last(segment_ids, losses.shape[1]) > 0).astype(jnp.float32)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)
