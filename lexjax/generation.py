"""Text generation for every model of the zoo: `generate(model, variables, prompt, ...)`.

One jitted program per (model, shapes, sampling settings): the prompt is read by
`model.prefill` (one pass for models that decode chunks, else a scan), then a `lax.while_loop`
appends one token per iteration through `model.decode_step`, until every row has its
`max_new_tokens` or has emitted `eos_id`. No Python loop of dispatches.

Prompts of different lengths: pass them right-padded in one `[batch, prompt]` array with
`prompt_lengths`. The cache is filled with the shortest prompt in one prefill; the loop then
feeds each longer row its own prompt tokens until they run out and samples after that, so no
padding ever enters a cache, for any model: greedy decoding gives every row exactly what it gets
alone (a sampled row's draws depend on its place in the batch, as the key is per position).

Sampling (the Hugging Face order): logits / temperature, then top-k, then top-p (nucleus: the
smallest set of most likely tokens whose probability reaches p; the most likely token always
stays), then one categorical draw with the key `fold_in(rng, position)`. Temperature 0 is greedy
(argmax; top-k / top-p then change nothing).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lexjax.errors import ConfigError
from lexjax.models.lm import LanguageModel

PAD_ID = 0  # what follows a row's end (its EOS, or its last new token) in the output


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """A ConfigError (a ValueError) naming a bad sampling setting and its allowed range."""
    if not np.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
        raise ConfigError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def filter_logits(logits: jnp.ndarray, top_k: Optional[int], top_p: Optional[float]
                  ) -> jnp.ndarray:
    """float32 `[batch, vocab]` logits with every token outside the top-k and outside the
    nucleus of probability `top_p` set to -inf (ties at the k-th value are kept)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
        kept = jnp.where(before < top_p, ordered, jnp.inf)  # the nucleus, in descending order
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def next_tokens(logits: jnp.ndarray, key: Optional[jax.Array], temperature: float,
                top_k: Optional[int], top_p: Optional[float]) -> jnp.ndarray:
    """int32 `[batch]`: the tokens chosen from float32 `logits [batch, vocab]` (`key` unused,
    and may be None, when greedy)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / temperature, top_k, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(model: LanguageModel, variables: Any, prompt: jnp.ndarray, max_new_tokens: int,
             *, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, rng: Optional[jax.Array] = None,
             eos_id: Optional[int] = None,
             prompt_lengths: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Continues each prompt by up to `max_new_tokens` tokens.

    Args:
      model, variables: any `LanguageModel` and its variables (`{"params": ...}`).
      prompt: int32 `[batch, prompt]`; right-padded when `prompt_lengths` is given.
      max_new_tokens: tokens appended to each row (fewer where a row stops at `eos_id`).
      temperature, top_k, top_p: sampling (module docstring); temperature 0 is greedy.
      rng: a PRNG key, required when temperature > 0; the same key gives the same tokens.
      eos_id: a row stops after emitting this token; the rest of its row is `PAD_ID`.
      prompt_lengths: int `[batch]`, each row's prompt length (1..prompt; default all).
    Returns:
      int32 `[batch, prompt + max_new_tokens]`: row i holds its prompt, its new tokens, then
      `PAD_ID` up to the end.
    """
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ConfigError(f"prompt must be int tokens [batch, length >= 1], got "
                          f"{prompt.dtype}{list(prompt.shape)}")
    if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens \
            or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    if temperature > 0 and rng is None:
        raise ConfigError("sampling (temperature > 0) needs rng=jax.random.PRNGKey(seed)")
    batch, width = prompt.shape
    if prompt_lengths is None:
        lengths, shortest = jnp.full((batch,), width, jnp.int32), width
    else:
        lengths = np.asarray(prompt_lengths)
        if lengths.shape != (batch,) or lengths.min() < 1 or lengths.max() > width:
            raise ConfigError(f"prompt_lengths must be [batch={batch}] ints in 1..{width}, got "
                              f"{lengths.tolist()}")
        lengths, shortest = jnp.asarray(lengths, jnp.int32), int(lengths.min())
    if max_new_tokens == 0:
        return jnp.where(jnp.arange(width)[None] < lengths[:, None], prompt, PAD_ID
                         ).astype(jnp.int32)
    total = width + int(max_new_tokens)
    limit = model.max_positions
    if limit is not None and total > limit:
        raise ConfigError(f"{type(model).__name__} reads at most {limit} positions (its "
                          f"position table) but prompt + max_new_tokens = {total}; shorten one "
                          "of them")
    key = jax.random.PRNGKey(0) if rng is None else rng
    run = _generation_program(model, int(max_new_tokens), shortest, float(temperature),
                              None if top_k is None else int(top_k),
                              None if top_p is None else float(top_p),
                              None if eos_id is None else int(eos_id))
    return run(variables, prompt.astype(jnp.int32), lengths, key)


@functools.lru_cache(maxsize=32)
def _generation_program(model: LanguageModel, max_new_tokens: int, shortest: int,
                        temperature: float, top_k: Optional[int], top_p: Optional[float],
                        eos_id: Optional[int]):
    """The jitted `(variables, prompt [b, w], lengths [b], key) -> tokens [b, w + new]`."""

    @jax.jit
    def run(variables, prompt, lengths, key):
        batch, width = prompt.shape
        total = width + max_new_tokens
        in_prompt = jnp.arange(width)[None] < lengths[:, None]
        tokens = jnp.full((batch, total), PAD_ID, jnp.int32).at[:, :width].set(
            jnp.where(in_prompt, prompt, PAD_ID))
        logits, cache = model.prefill(variables, prompt[:, :shortest], max_length=total)
        ends = lengths + max_new_tokens  # where each row's output ends

        def choose(position, logits, tokens, done):
            """Token `position` of every row: its prompt's, a new one, or PAD_ID."""
            step_key = jax.random.fold_in(key, position) if temperature > 0 else None
            new = next_tokens(logits, step_key, temperature, top_k, top_p)
            in_prompt = position < lengths
            token = jnp.where(in_prompt, tokens[:, position], new)
            stopped = done | (position >= ends)
            token = jnp.where(stopped, PAD_ID, token)
            if eos_id is not None:
                done = done | (~in_prompt & (token == eos_id))
            return tokens.at[:, position].set(token), done | (position + 1 >= ends)

        def proceed(carry):
            position, _, _, _, done = carry
            return (position < total - 1) & ~jnp.all(done)

        def step(carry):
            position, logits, cache, tokens, done = carry
            tokens, done = choose(position, logits, tokens, done)
            logits, cache = model.decode_step(variables, cache, tokens[:, position])
            return position + 1, logits, cache, tokens, done

        carry = (jnp.int32(shortest), logits[:, -1], cache, tokens, jnp.zeros((batch,), bool))
        position, logits, _, tokens, done = jax.lax.while_loop(proceed, step, carry)
        return choose(position, logits, tokens, done)[0]  # the last token needs no decoding

    return run
