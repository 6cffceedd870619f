"""Length extrapolation: loss, perplexity and bits per byte of a trained model at several
evaluation lengths ("train short, test long"), plus the loss at each position.

Two protocols:
- non-overlapping (default): the test split cut into windows of L tokens, every token scored with
  the context its window gives it (ALiBi paper, "nonoverlapping inference");
- sliding (`stride=S`): windows of L tokens advanced by S, scoring only the last S tokens of each
  window (after the first), so every scored token sees at least L - S tokens of context.
Windows are scored by `lexjax.evaluation.scoring.Scorer` (the path validation uses too): each
is read as decoder input shifted right by one (`lexjax.losses`), batched over the mesh.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from lexjax import partitioning
from lexjax.evaluation.resolution import attention_resolution
from lexjax.evaluation.scoring import Scorer
from lexjax.losses import shift_right


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


def evaluate_lengths(model: nn.Module, variables: Any, data, lengths: Sequence[int], *,
                     max_tokens: int = 65536, batch_size: int = 4, split: str = "test",
                     respect_documents: bool = False, stride: Optional[int] = None,
                     resolution_max_length: int = 4096, mesh=None,
                     rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES,
                     progress: Optional[Callable[[LengthResult], None]] = None
                     ) -> list[LengthResult]:
    """Evaluates `model` at each length on the `split` of `data` (a `DataConfig` or task name).

    Args:
      max_tokens: evaluation budget per length (windows = max(1, max_tokens // length)), so
        every length scores a similar number of tokens.
      stride: None for non-overlapping windows, else the sliding protocol's stride.
      resolution_max_length: also compute the attention resolution (LeX) at lengths up to this,
        on one batch, for models with softmax attention layers (None for the others).
      mesh, rules: where the scoring runs (default: one device); `variables` already live there.
    """
    from lexjax import data as data_lib

    scorer = Scorer(model, batch_size=batch_size, mesh=mesh, rules=rules)
    bytes_per_token = data_lib.bytes_per_token(data, split)
    results = []
    for length in lengths:
        max_windows = max(1, max_tokens // length)
        if stride is None:
            windows = data_lib.eval_windows(data, length=length, split=split,
                                            max_windows=max_windows,
                                            respect_documents=respect_documents)
            context_only = 0
        else:
            stream = data_lib.eval_windows(data, length=stride, split=split,
                                           max_windows=(max_windows - 1) + length // stride + 1)
            windows, context_only = sliding_windows(stream.ravel(), length, stride, max_windows)
        result = summarize(length, scorer(variables, windows), context_only, bytes_per_token,
                           len(windows))
        if length <= resolution_max_length:
            with partitioning.mesh_context(scorer.mesh, rules):
                found = attention_resolution(model, variables,
                                             shift_right(jnp.asarray(windows[:batch_size])))
            result.resolution = None if found is None else found[0]
        results.append(result)
        if progress:
            progress(result)
    return results
