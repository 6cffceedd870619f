"""What the train step reads, by model (shared by the trainer and the bench):

- a model that keeps packed documents apart (`keeps_segments_apart`): packed rows of the token
  stream and their segment ids (`lexjax.data.segment_ids`);
- a model whose layers mix the whole row: padded rows, one document piece each (segment id 1,
  padding 0, which is not scored);
- a state-carrying model (`init_carry`): row streams, row i of each batch continuing row i of the
  previous one (`lexjax.data.stream_batches`).

Each batch is this process's rows (`[batch / processes, length]` int32 arrays) of a global batch
that is a pure function of (seed, step), so resuming costs nothing.
"""
from __future__ import annotations

from typing import Iterator, Optional

import flax.linen as nn
import jax
import numpy as np

from lexjax.training.config import TrainConfig
from lexjax.training.state import carries_state


def training_batches(model: nn.Module, config: TrainConfig, start_step: int = 0
                     ) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of the global batches from `start_step` on: `{"targets"}`, plus
    `{"segment_ids"}` for models without carried state."""
    from lexjax import data

    common = dict(length=config.train_length, batch_size=config.batch_size, seed=config.seed,
                  start_step=start_step, shard_index=jax.process_index(),
                  num_shards=jax.process_count())
    if carries_state(model):
        for tokens in data.stream_batches(config.data, **common):
            yield {"targets": tokens}
        return
    pack = bool(getattr(model, "keeps_segments_apart", False))
    for tokens in data.train_batches(config.data, pack=pack, **common):
        yield {"targets": tokens, "segment_ids": data.segment_ids(tokens)}


def segments_per_stream(model: nn.Module, config: TrainConfig) -> Optional[int]:
    """How many steps a state-carrying model's row streams last before they restart (None for
    other models)."""
    if not carries_state(model):
        return None
    from lexjax import data
    return data.stream_segments(config.data, length=config.train_length,
                                batch_size=config.batch_size)
