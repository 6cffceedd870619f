"""Language-model inputs and loss (decoder-only, t5x convention).

A training example is `tokens [batch, length]`. The model reads the tokens shifted right by one
(`0`, the pad id, acts as beginning-of-sequence) and predicts every token, so an example of length
L trains L predictions at positions 0 .. L-1, and evaluating "at length L" means the same thing.
Models that emit logits for the last M positions only (Perceiver AR) are scored on those.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

BOS_ID = 0


def shift_right(tokens: jnp.ndarray) -> jnp.ndarray:
    """`[batch, length]` -> `[batch, length]`: BOS then tokens[:, :-1]."""
    return jnp.pad(tokens[:, :-1], [(0, 0), (1, 0)], constant_values=BOS_ID)


def token_losses(logits: jnp.ndarray, tokens: jnp.ndarray) -> jnp.ndarray:
    """Per-token cross entropy (nats) `[batch, m]` of logits `[batch, m, vocab]` against the last
    m targets of `tokens [batch, length]`, computed in float32."""
    targets = tokens[:, tokens.shape[1] - logits.shape[1]:]
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
