"""What layers keep in the "cache" collection while a model decodes (`LanguageModel.prefill` /
`decode_step`): the keys and values of earlier tokens (`KeyValueCache`), or a recurrent state
(`cached_recurrence`).

Both follow one convention. A decode call made while the model is initializing (what
`LanguageModel.init_cache` does, on a dummy batch of `max_length` tokens) only *creates* the cache,
sized from that call, and computes the ordinary forward pass; every later decode call reads the
cache, writes the new tokens into it and returns their outputs.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from lexjax.attention import MaskSpec
from lexjax.layers.basic import ACTIVATION_HEADS, with_activation_axes


class KeyValueCache(nn.Module):
    """The keys and values a causal attention layer needs from earlier tokens: a ring of
    `slots` entries, `slots` = the mask's `max_lookback` (a window, chunk or BCA span) or, for a
    full mask, the length the cache was created for (positions past it see only the last
    `slots` keys). Keys are cached as the caller passes them: rotated for a scheme that rotates
    each key by its own position (RoPE), as projected for one whose transform depends on the
    keys in view (xPos, rotated again at every step), so every scheme stays exact.

    Call with the new tokens' keys and values `[batch, n, kv_heads, d]` at consecutive positions
    `[n]` (following the cached ones); returns `(keys, values, key_positions, key_valid)`: the
    cached entries followed by the new ones, `[batch, slots + n, kv_heads, d]`, their positions
    `[slots + n]` and a bool `[slots + n]` that is False for slots holding no token yet. At cache
    creation it returns the new tokens alone (`key_valid` None).
    """

    mask: MaskSpec

    @nn.compact
    def __call__(self, k: jnp.ndarray, v: jnp.ndarray, positions: jnp.ndarray
                 ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, Optional[jnp.ndarray]]:
        if not self.mask.causal:
            raise ValueError("decoding needs a causal mask; this attention layer is bidirectional")
        batch, n = k.shape[:2]
        lookback = self.mask.max_lookback
        slots = n if lookback is None else max(1, min(n, lookback))
        keys = self.variable("cache", "keys", jnp.zeros, (batch, slots) + k.shape[2:], k.dtype)
        values = self.variable("cache", "values", jnp.zeros, (batch, slots) + v.shape[2:],
                               v.dtype)
        if self.is_initializing():
            return k, v, positions, None
        slots = keys.value.shape[1]
        latest = positions[0] - 1  # the position of the newest cached token (-1: none yet)
        cached_positions = latest - jnp.mod(latest - jnp.arange(slots, dtype=jnp.int32), slots)
        all_keys = jnp.concatenate([keys.value, k.astype(keys.value.dtype)], axis=1)
        all_values = jnp.concatenate([values.value, v.astype(values.value.dtype)], axis=1)
        key_positions = jnp.concatenate([cached_positions, positions])
        key_valid = jnp.concatenate([cached_positions >= 0, jnp.ones((n,), bool)])
        kept = min(n, slots)
        written = jnp.mod(positions[n - kept:], slots)
        for cached, new in ((keys, k), (values, v)):  # laid out like the attention's heads
            updated = cached.value.at[:, written].set(new[:, n - kept:].astype(cached.value.dtype))
            cached.value = with_activation_axes(updated, ACTIVATION_HEADS)
        return all_keys, all_values, key_positions, key_valid


def cached_recurrence(module: nn.Module, x: jnp.ndarray, *, name: str,
                      forward: Callable[[jnp.ndarray], jnp.ndarray],
                      initial_state: Callable[[int], Any],
                      step: Callable[[jnp.ndarray, Any], tuple[jnp.ndarray, Any]]) -> jnp.ndarray:
    """A decode call of a recurrent layer (an SSM, an EMA) whose state lives in `module`'s
    "cache" collection under `name`.

    Args:
      x: `[batch, n, features]`; n must be 1 except at cache creation.
      forward: the layer's sequence form (`[batch, n, ...] -> [batch, n, ...]`), used at cache
        creation.
      initial_state: `batch -> state` (the state before the first token).
      step: `(x_t [batch, ...], state) -> (y_t [batch, ...], state)`.
    Returns:
      `[batch, n, ...]`: the outputs of the tokens.
    """
    state = module.variable("cache", name, initial_state, x.shape[0])
    if module.is_initializing():
        return forward(x)
    if x.shape[1] != 1:
        raise ValueError(f"{type(module).__name__} decodes one token per call, got {x.shape[1]}; "
                         "use LanguageModel.prefill for a prompt")
    y, state.value = step(x[:, 0], state.value)
    return y[:, None]
