"""The optimizer: AdamW with linear warmup and cosine decay, global-norm clipping, and weight
decay on matrices only (not on norms' scales, biases or per-head position parameters)."""
from __future__ import annotations

import gin
import jax
import optax


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int,
                           final_fraction: float = 0.1) -> optax.Schedule:
    """Linear warmup from 0 to `peak` over `warmup_steps` (capped at a tenth of the run, so short
    runs still train), then cosine decay to `final_fraction * peak` at `total_steps`."""
    warmup = max(1, min(warmup_steps, total_steps // 10))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=peak * final_fraction)


def _decay_mask(params):
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


@gin.configurable(module="lexjax.training")
def make_optimizer(learning_rate: float = gin.REQUIRED, total_steps: int = gin.REQUIRED,
                   warmup_steps: int = 1000, weight_decay: float = 0.1, clip_norm: float = 1.0,
                   b1: float = 0.9, b2: float = 0.98, eps: float = 1e-9
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns `(optimizer, schedule)`; gin binds the hyperparameters (LEARNING_RATE, ...)."""
    schedule = learning_rate_schedule(learning_rate, total_steps, warmup_steps)
    optimizer = optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                    mask=_decay_mask))
    return optimizer, schedule
