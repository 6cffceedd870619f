"""What the train step reads: the run objective's batches (`training_batches`); for the token
objectives (causal and masked LM), by model (shared by the trainer, the step and the bench):

- a model that keeps packed documents apart (`keeps_segments_apart`): packed rows of the token
  stream and their segment ids (`lexjax.data.segment_ids`), which the model reads (an encoder
  with global tokens, `packs_documents` False: padded rows, the segment ids marking padding);
- a model whose layers mix the whole row: padded rows, one document piece each (segment id 1,
  padding 0, which is not scored), padded after the piece, or before it for a model scored on
  a row's last positions (`padding_side = "left"`: Perceiver AR, whose rows are then cropped at
  random, `crop_rows`, so every position of a piece is scored);
- a state-carrying model (`init_carry`): row streams, row i of each batch continuing row i of the
  previous one (`lexjax.data.stream_batches`).

Each batch is this process's rows (`[batch / processes, length]` int32 arrays) of a global batch
that is a pure function of (seed, step), so resuming costs nothing.
"""
from __future__ import annotations

from typing import Iterator, Optional

import flax.linen as nn
import numpy as np

from lexjax.training.config import TrainConfig
from lexjax.training.state import carries_state


def reads_segment_ids(model: nn.Module) -> bool:
    """Whether the model is given the segment ids of packed rows (else it gets padded rows or
    row streams)."""
    return bool(getattr(model, "keeps_segments_apart", False)) and not carries_state(model)


def training_batches(model: nn.Module, config: TrainConfig, start_step: int = 0
                     ) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of the global batches of `config.objective` from `start_step` on."""
    return config.objective.training_batches(model, config, start_step)


def host_shard(config: TrainConfig) -> tuple[int, int]:
    """(shard_index, num_shards) of this process's rows in the run mesh's global batch (one
    shard on one host; `partitioning.host_batch_shard`)."""
    from lexjax import partitioning
    return partitioning.host_batch_shard(partitioning.make_mesh(config.mesh))


def token_batches(model: nn.Module, config: TrainConfig, start_step: int = 0
                  ) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of the global token batches from `start_step` on: `{"targets"}`,
    plus `{"segment_ids"}` for models without carried state."""
    from lexjax import data

    shard_index, num_shards = host_shard(config)
    common = dict(length=config.train_length, batch_size=config.batch_size, seed=config.seed,
                  start_step=start_step, shard_index=shard_index, num_shards=num_shards)
    if carries_state(model):
        for tokens in data.stream_batches(config.data, **common):
            yield {"targets": tokens}
        return
    pad_left = getattr(model, "padding_side", "right") == "left"
    pack = reads_segment_ids(model) and model.packs_documents
    eos_id = config.data.seqio_vocabulary().eos_id  # a converted checkpoint's may not be 1
    crop = getattr(model, "crop_rows", None)
    batches = data.train_batches(config.data, pack=pack, pad_left=pad_left, **common)
    for step, tokens in enumerate(batches, start_step):
        if crop is not None:  # one draw per global row: a function of (seed, step), as the rows
            first = shard_index * tokens.shape[0]
            uniforms = np.random.default_rng((config.seed, step)).random(config.batch_size)
            tokens = crop(tokens, uniforms[first:first + tokens.shape[0]])
        yield {"targets": tokens, "segment_ids": data.segment_ids(tokens, eos_id)}


def segments_per_stream(model: nn.Module, config: TrainConfig) -> Optional[int]:
    """How many steps a state-carrying model's row streams last before they restart (None for
    other models)."""
    if not carries_state(model):
        return None
    from lexjax import data
    return data.stream_segments(config.data, length=config.train_length,
                                batch_size=config.batch_size)
