"""The optimizer: AdamW with linear warmup and cosine decay, global-norm clipping, and weight
decay on matrices only (not on norms' scales, biases or per-head position parameters)."""
from __future__ import annotations

import jax
import optax

from lexjax.training.config import OptimizerConfig


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


def make_optimizer(config: OptimizerConfig, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`(optimizer, schedule)` of `config` for a run of `total_steps` steps."""
    schedule = learning_rate_schedule(config.learning_rate, total_steps, config.warmup_steps,
                                      config.final_fraction)
    optimizer = optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay, mask=_decay_mask))
    return optimizer, schedule
