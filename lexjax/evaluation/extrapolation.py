"""Length extrapolation: loss, perplexity and bits per byte of a trained model at several
evaluation lengths ("train short, test long"), plus the loss at each position.

Two protocols:
- non-overlapping (default): the test split cut into windows of L tokens, every token scored with
  the context its window gives it (ALiBi paper, "nonoverlapping inference");
- sliding (`stride=S`): windows of L tokens advanced by S, scoring only the last S tokens of each
  window (after the first), so every scored token sees at least L - S tokens of context.
Each window is read as decoder input shifted right by one (lexjax.training.losses).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lexjax.training.losses import shift_right, token_losses


@dataclasses.dataclass
class LengthResult:
    """The evaluation at one length."""

    length: int
    loss: float  # mean nats per scored token
    perplexity: float
    bits_per_byte: float
    windows: int
    scored_tokens: int
    per_position_loss: list[float]  # mean loss at each window position (over windows)
    resolution: Optional[float] = None

    def row(self, train_length: Optional[int]) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "per_position_loss"}
        if train_length:
            out["x_train"] = self.length / train_length
        return out


def sliding_windows(stream: np.ndarray, length: int, stride: int,
                    max_windows: Optional[int]) -> tuple[np.ndarray, int]:
    """Windows `[W, length]` of a token stream advanced by `stride`; the second value is how many
    leading positions of every window but the first are context only (length - stride)."""
    if not 0 < stride <= length:
        raise ValueError(f"stride must be in (0, length]; got stride={stride}, length={length}")
    starts = range(0, len(stream) - length + 1, stride)
    windows = np.stack([stream[s:s + length] for s in starts][:max_windows])
    return windows, length - stride


def per_token_losses(model, variables, windows: np.ndarray, batch_size: int) -> np.ndarray:
    """float32 `[W, m]` losses of the last m positions the model scores (m = length for LMs)."""
    @jax.jit
    def losses(tokens):
        logits = model.apply(variables, shift_right(tokens), deterministic=True)
        return token_losses(logits, tokens)

    out = []
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        pad = batch_size - len(batch)
        padded = np.concatenate([batch, np.repeat(batch[:1], pad, axis=0)]) if pad else batch
        out.append(np.asarray(losses(jnp.asarray(padded)))[:len(batch)])
    return np.concatenate(out)


def summarize(length: int, losses: np.ndarray, context_only: int, bytes_per_token: float,
              windows: int) -> LengthResult:
    """Aggregates `[W, m]` losses; positions < context_only of windows after the first are not
    scored (sliding protocol)."""
    scored = np.concatenate([losses[0].ravel(), losses[1:, context_only:].ravel()])
    loss = float(np.mean(scored, dtype=np.float64))
    return LengthResult(length=length, loss=loss, perplexity=float(math.exp(min(loss, 700))),
                        bits_per_byte=loss / math.log(2) / bytes_per_token, windows=windows,
                        scored_tokens=int(scored.size),
                        per_position_loss=np.mean(losses, axis=0, dtype=np.float64).tolist())


def evaluate_lengths(model, variables, task: str, lengths: Sequence[int], *,
                     max_tokens: int = 65536, batch_size: int = 4, split: str = "test",
                     respect_documents: bool = False, stride: Optional[int] = None,
                     resolution_max_length: int = 4096,
                     progress=None) -> list[LengthResult]:
    """Evaluates `model` at each length on `task`'s `split`.

    Args:
      max_tokens: evaluation budget per length (windows = max(1, max_tokens // length)), so
        every length scores a similar number of tokens.
      stride: None for non-overlapping windows, else the sliding protocol's stride.
      resolution_max_length: also compute the attention resolution (LeX) at lengths up to this,
        on one batch, for models with softmax attention layers.
    """
    from lexjax import data
    from lexjax.evaluation.resolution import attention_resolution

    bytes_per_token = data.bytes_per_token(task, split)
    results = []
    for length in lengths:
        max_windows = max(1, max_tokens // length)
        if stride is None:
            windows = data.eval_windows(task, length=length, split=split,
                                        max_windows=max_windows,
                                        respect_documents=respect_documents)
            context_only = 0
        else:
            stream = data.eval_windows(task, length=stride, split=split,
                                       max_windows=(max_windows - 1) + length // stride + 1)
            windows, context_only = sliding_windows(stream.ravel(), length, stride, max_windows)
        losses = per_token_losses(model, variables, windows, batch_size)
        result = summarize(length, losses, context_only, bytes_per_token, len(windows))
        if length <= resolution_max_length:
            try:
                result.resolution, _ = attention_resolution(
                    model, variables, shift_right(jnp.asarray(windows[:batch_size])))
            except ValueError:
                pass
        results.append(result)
        if progress:
            progress(result)
    return results
