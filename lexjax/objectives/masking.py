"""BERT-style masking of token rows, on device: a pure function of (key, tokens), so each training
step's masks follow from (seed, step) like its batch (resuming costs nothing), every corpus gets
the same treatment, and the host does no work.

Masking picks *units* (single tokens, whole words, or spans of a fixed number of tokens), each
independently with probability `rate`, or exactly `floor(rate x units + u)` of them per row (u
uniform in [0, 1): fairseq's count; late-[MASK] models, whose encoder reads a fixed number of
visible tokens, `visible_length`); of the picked tokens, 80% become the mask id, 10% a random
text token, and 10% stay (Devlin et al. 2019; the split is configurable). Padding (segment id 0)
and EOS are never picked. A unit is a run of tokens that starts where `unit_starts` is True.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

UNITS = ("token", "word", "span")


#: The bits of a vocabulary's word roles (`lexjax.data.word_roles`): the token is part of a
#: word (one may go on after it); it continues the word of the token before it.
IN_WORD, CONTINUES_WORD = 1, 2


def unit_starts(tokens: jnp.ndarray, segment_ids: jnp.ndarray, unit: str, *,
                word_roles: Optional[jnp.ndarray] = None, span_length: int = 1,
                phase: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """bool `[batch, length]`: where a masking unit starts.

    Args:
      tokens, segment_ids: int32 `[batch, length]`.
      unit: "token" (every token), "word" (a token starts a unit unless it continues the word
        of the token before it: `word_roles [vocab]` int8 from the vocabulary,
        `lexjax.data.word_roles`), or "span" (every `span_length` tokens, from a per-row
        offset `phase [batch]`).
      A new segment always starts a unit.
    """
    if unit not in UNITS:
        raise ValueError(f"unknown masking unit {unit!r}; use one of {UNITS}")
    batch, length = tokens.shape
    new_segment = jnp.concatenate([jnp.ones((batch, 1), bool),
                                   segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    if unit == "token":
        return jnp.ones((batch, length), bool)
    if unit == "word":
        roles = word_roles[tokens]
        joins = ((roles[:, 1:] & CONTINUES_WORD) > 0) & ((roles[:, :-1] & IN_WORD) > 0)
        joined = jnp.concatenate([jnp.zeros((batch, 1), bool), joins], axis=1)
        return new_segment | ~joined
    index = jnp.arange(length, dtype=jnp.int32)[None, :]
    return new_segment | ((index + phase[:, None]) % span_length == 0)


def visible_length(length: int, rate: float) -> int:
    """How many tokens of a `length`-token row stay visible when exactly a `rate` of them is
    masked: `length - floor(rate x length)` (a static shape: late-[MASK] encoders read this
    many)."""
    return length - math.floor(rate * length)


def mask_tokens(key: jax.Array, tokens: jnp.ndarray, segment_ids: jnp.ndarray,
                starts: jnp.ndarray, *, rate: float, mask_id: int, random_ids: tuple[int, int],
                eos_id: int = 1, keep_fraction: float = 0.1, random_fraction: float = 0.1,
                visible: Optional[int] = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Masks units of `tokens [batch, length]` (int32).

    Args:
      key: PRNG key.
      segment_ids: int32 `[batch, length]`, 0 for padding (never masked).
      starts: bool `[batch, length]`, where units start (`unit_starts`).
      rate: probability that a unit is picked.
      mask_id: the id of the mask token.
      random_ids: `[low, high)`: the ids random replacements are drawn from (text tokens).
      eos_id: never picked.
      keep_fraction, random_fraction: of the picked tokens, the fractions left unchanged and
        replaced by a random token (the rest become `mask_id`).
      visible: None: each unit is picked with probability `rate`. Else exactly
        `floor(rate x eligible units + u)` units per row, and at least enough that at most
        `visible` of the row's real tokens stay unpicked (exact for token units; whole words
        and spans may leave a few more).

    Returns:
      (inputs int32 `[batch, length]`, picked bool `[batch, length]`: the tokens to predict).
    """
    pick_key, action_key, random_key = jax.random.split(key, 3)
    length = tokens.shape[1]
    draws = jax.random.uniform(pick_key, tokens.shape)
    index = jnp.arange(length, dtype=jnp.int32)[None, :]
    unit_first = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)  # each token's unit start
    eligible = (segment_ids > 0) & (tokens != eos_id)
    if visible is None:
        picked_units = draws < rate
    else:
        picked_units = _exact_units(jax.random.fold_in(key, 3), draws, starts & eligible,
                                    segment_ids > 0, rate=rate, visible=visible)
    picked = jnp.take_along_axis(picked_units, unit_first, axis=1) & eligible
    action = jax.random.uniform(action_key, tokens.shape)
    replacements = jax.random.randint(random_key, tokens.shape, random_ids[0], random_ids[1],
                                      dtype=jnp.int32)
    to_mask = picked & (action >= keep_fraction + random_fraction)
    to_random = picked & (action >= keep_fraction) & ~to_mask
    inputs = jnp.where(to_mask, mask_id, jnp.where(to_random, replacements, tokens))
    return inputs.astype(jnp.int32), picked


def _exact_units(key: jax.Array, draws: jnp.ndarray, unit_starts: jnp.ndarray,
                 real: jnp.ndarray, *, rate: float, visible: int) -> jnp.ndarray:
    """bool `[batch, length]`, True at the starts of the picked units: per row the
    `floor(rate x units + u)` eligible unit starts with the smallest `draws`, raised to leave at
    most `visible` of the row's `real` tokens unpicked."""
    units = jnp.sum(unit_starts, axis=1)
    count = jnp.floor(rate * units + jax.random.uniform(key, units.shape)).astype(jnp.int32)
    count = jnp.minimum(jnp.maximum(count, jnp.sum(real, axis=1) - visible), units)
    order = jnp.argsort(jnp.where(unit_starts, draws, 2.0), axis=1)
    rank = jnp.argsort(order, axis=1)
    return unit_starts & (rank < count[:, None])
