"""Late [MASK] insertion, "Mask More and Mask Later" (3ML; Liao et al., Findings EMNLP 2022).

Masked-LM pre-training whose encoder never reads the masked positions: each row's visible tokens
are gathered into a shorter sequence (`visible_length(length, mask_rate)` tokens: 50% masking
halves the early layers' work), the first `insert_layer` blocks run on it, and then [MASK] vectors
(one learned `mask_vector` plus the absolute position embedding of each masked position) are
inserted where the masked tokens were. The blocks after the insertion run on the full length, and
a shallow decoder predicts the masked tokens:

- "self" (3ML_self): `decoder_layers` self-attention blocks over the full sequence;
- "cross" (3ML_cross): `decoder_layers` blocks whose inputs are [MASK] vectors at every position,
  attending to each other and cross-attending to the encoder's output (normalized once, as a
  pre-norm encoder's output is before it is read).

The decoder (and `mask_vector`) exist only for pre-training: with `num_classes` set the model is
the plain encoder over all tokens, and `--init_from` a 3ML run carries every block over.

    logits = model.apply(v, inputs, segment_ids=s, hidden=picked)  # MLM, [batch, length, vocab]

`hidden` (bool `[batch, length]`, from `lexjax.objectives.MaskedLM`, which picks exactly
`floor(mask_rate x length)` tokens per row for these models) marks the positions the encoder must
not read; a row with more visible tokens than the encoder's length (EOS is never masked) hides its
last visible tokens too (they are not scored). Without `hidden` nothing is hidden. Positions reach
the model as absolute embeddings only: the encoder's rows are gathered, so a relative scheme would
see the gathered distances.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import flax.linen as nn
import gin
import jax.numpy as jnp
import numpy as np

from lexjax.attention import MaskSpec
from lexjax.layers import make_norm
from lexjax.layers.decoder import CrossDecoderLayer
from lexjax.models.encoder import EncoderHeads
from lexjax.models.lm import AttentionLanguageModel, segment_positions
from lexjax.objectives.masking import visible_length
from lexjax.positions import Learned, PositionScheme

DECODERS = ("self", "cross")


@gin.register(module="lexjax.models")
class LateMask(EncoderHeads, AttentionLanguageModel, kw_only=True):
    """3ML: int32 tokens `[batch, length]` -> MLM logits `[batch, length, vocab]` (or class logits
    `[batch, num_classes]`).

    Attributes:
      mask_rate: the masking rate the encoder's length is sized for (MASK_RATE; the objective's
        must match).
      insert_layer: the blocks before it read only the visible tokens (None: all of them).
      decoder_layers: depth of the pre-training decoder; decoder: "self" or "cross".
      position: an absolute scheme (learned, sinusoidal) or NoPE.
      mask: the encoder's attention mask (bidirectional).
    """

    position: Optional[PositionScheme] = Learned(max_length=2048)
    mask: MaskSpec = MaskSpec(causal=False)
    mask_rate: float = 0.5
    insert_layer: Optional[int] = None
    decoder_layers: int = 2
    decoder: str = "self"

    hides_masked_tokens: ClassVar[bool] = True

    @nn.nowrap
    def check(self) -> None:
        super().check()
        if self.mask.causal:
            raise ValueError(f"LateMask.mask must be bidirectional (causal=False), got {self.mask}")
        if not 0 < self.mask_rate < 1:
            raise ValueError(f"LateMask.mask_rate (MASK_RATE) must lie in (0, 1), got "
                             f"{self.mask_rate!r}")
        if not 1 <= self.inserted_after <= self.num_layers:
            raise ValueError(f"LateMask.insert_layer (INSERT_LAYER) must lie in [1, NUM_LAYERS = "
                             f"{self.num_layers}], got {self.insert_layer!r}")
        if not isinstance(self.decoder_layers, (int, np.integer)) or self.decoder_layers < 1:
            raise ValueError(f"LateMask.decoder_layers (DECODER_LAYERS) must be a positive int, "
                             f"got {self.decoder_layers!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"LateMask.decoder must be one of {DECODERS}, got {self.decoder!r}")
        scheme = type(self.position) if self.position is not None else PositionScheme
        if (scheme.rotate is not PositionScheme.rotate
                or scheme.relative_bias is not PositionScheme.relative_bias):
            raise ValueError(f"LateMask gathers each row's visible tokens, so a relative scheme "
                             f"({scheme.__name__}) would see the gathered distances: use an "
                             "absolute one (configs/positions/learned.gin, sinusoidal.gin)")

    @property
    def inserted_after(self) -> int:
        """The number of blocks that read only the visible tokens."""
        return self.num_layers if self.insert_layer is None else self.insert_layer

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, *, segment_ids: Optional[jnp.ndarray] = None,
                 deterministic: bool = True, decode: bool = False,
                 hidden: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        """int32 `tokens [batch, length]` -> MLM logits `[batch, length, vocab]` (classifier:
        `[batch, num_classes]`).

        Args:
          segment_ids: optional int32 `[batch, length]` (packed documents; 0 for padding).
          hidden: optional bool `[batch, length]`: positions the encoder must not read (MLM
            only).
        """
        self.check_inputs(tokens, segment_ids, decode)
        if hidden is not None and (self.num_classes is not None or hidden.shape != tokens.shape):
            raise ValueError("LateMask takes `hidden` [batch, length] for masked-LM "
                             f"pre-training only, got {hidden.shape} with num_classes "
                             f"{self.num_classes}")
        length = tokens.shape[1]
        positions = self.token_positions(length, decode=False)
        embedding = self.token_embedding()
        x = self.embed(embedding, tokens, positions, segment_ids, deterministic)
        layers = [self.decoder_layer(self.mask, deterministic=deterministic, decode=False,
                                     name=f"layer_{i}") for i in range(self.num_layers)]
        if self.num_classes is not None or hidden is None:
            for layer in layers:
                x, _ = layer(x, positions, segment_ids)
            if self.num_classes is not None:
                return self.head(embedding, x, segment_ids=segment_ids,
                                 deterministic=deterministic)
        masks = self.mask_vectors(tokens.shape, segment_ids)
        if hidden is None:
            memory, memory_segments = x, self.row_segments(segment_ids, tokens.shape)
        else:
            x, memory, memory_segments = self.encode_late(layers, x, masks, hidden, segment_ids)
        x = self.decode_masks(x, masks, memory, memory_segments, segment_ids, deterministic)
        return self.head(embedding, x, segment_ids=segment_ids, deterministic=deterministic)

    @nn.nowrap
    def row_segments(self, segment_ids: Optional[jnp.ndarray], shape: tuple[int, int]
                     ) -> jnp.ndarray:
        """int32 `[batch, length]`: the segment ids, or 1 everywhere."""
        return jnp.ones(shape, jnp.int32) if segment_ids is None else segment_ids

    def encode_late(self, layers, x: jnp.ndarray, masks: jnp.ndarray, hidden: jnp.ndarray,
                    segment_ids: Optional[jnp.ndarray]):
        """The encoder with late insertion.

        Args:
          x: embedded tokens `[batch, length, embed]`; masks: the [MASK] inputs `[batch, length,
            embed]` (`mask_vectors`); hidden: bool `[batch, length]`.
        Returns:
          (the full-length states after every block `[batch, length, embed]`, the encoder's
          output for a cross-attention decoder (the visible states `[batch, visible, embed]`
          when the insertion follows the last block, else the full states), its segment ids).
        """
        batch, length = hidden.shape
        segments = self.row_segments(segment_ids, hidden.shape)
        visible = visible_length(length, self.mask_rate)
        order = jnp.argsort((hidden | (segments == 0)).astype(jnp.int32), axis=1, stable=True)
        slots = order[:, :visible]                                   # visible tokens first
        seen = jnp.arange(visible)[None, :] < jnp.sum(~hidden & (segments > 0), axis=1)[:, None]
        states = jnp.take_along_axis(x, slots[..., None], axis=1)  # [b, visible, embed]
        state_segments = jnp.where(seen, jnp.take_along_axis(segments, slots, axis=1), 0)
        compact_positions = np.arange(visible, dtype=np.int32)  # unused by absolute schemes
        for layer in layers[:self.inserted_after]:
            states, _ = layer(states, compact_positions, state_segments)
        rows = jnp.arange(batch)[:, None]
        x = masks.astype(states.dtype).at[rows, jnp.where(seen, slots, length)].set(
            states, mode="drop")
        positions = np.arange(length, dtype=np.int32)
        for layer in layers[self.inserted_after:]:
            x, _ = layer(x, positions, segment_ids)
        if self.inserted_after == self.num_layers:
            return x, states, state_segments
        return x, x, segments

    def mask_vectors(self, shape: tuple[int, int], segment_ids: Optional[jnp.ndarray]
                     ) -> jnp.ndarray:
        """[MASK] inputs at every position `[batch, length, embed]`: the learned `mask_vector`
        plus the absolute position embedding (within each document with `segment_ids`)."""
        vector = self.param("mask_vector", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("embed",)), (self.embed_dim,), jnp.float32)
        batch, length = shape
        out = jnp.broadcast_to(vector, (batch, length, self.embed_dim))
        if self.position is not None:
            where = (np.arange(length, dtype=np.int32) if segment_ids is None
                     else segment_positions(segment_ids))
            absolute = self.position.embed(where, self.embed_dim)
            if absolute is not None:
                out = out + absolute
        return out.astype(self.compute_dtype)

    def decode_masks(self, x: jnp.ndarray, masks: jnp.ndarray, memory: jnp.ndarray,
                     memory_segments: jnp.ndarray, segment_ids: Optional[jnp.ndarray],
                     deterministic: bool) -> jnp.ndarray:
        """The pre-training decoder on the encoder's full-length states `x` (self) or on the
        [MASK] inputs `masks` reading `memory` (cross): `[batch, length, embed]` for the MLM
        head."""
        batch, length = x.shape[:2]
        positions = np.arange(length, dtype=np.int32)
        if self.decoder == "self":
            for i in range(self.decoder_layers):
                x, _ = self.decoder_layer(self.mask, deterministic=deterministic, decode=False,
                                          name=f"decoder_{i}")(x, positions, segment_ids)
            return x
        x = masks
        memory = make_norm(self.norm, dtype=self.compute_dtype, name="memory_norm")(memory)
        segments = self.row_segments(segment_ids, (batch, length))
        for i in range(self.decoder_layers):
            x = self.remat(CrossDecoderLayer)(
                **self.decoder_layer_fields(MaskSpec(causal=False), deterministic, False),
                name=f"decoder_{i}")(x, positions, segments, memory, memory_segments)
        return x

    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward matmul FLOPs per token of masked-LM pre-training at `mask_rate` (2 per
        multiply-add): the early blocks on the visible tokens, the later blocks and the decoder
        on all of them, the MLM head; a classifier: every block on all tokens."""
        full = self.block_macs(self.mask.mean_keys_per_query(length))
        if self.num_classes is not None:
            return 2.0 * self.num_layers * full
        visible = visible_length(length, self.mask_rate)
        early = self.block_macs(self.mask.mean_keys_per_query(visible)) * visible / length
        late = self.num_layers - self.inserted_after
        decoder = full
        if self.decoder == "cross":
            memory = visible if late == 0 else length
            inner = self.num_heads * self.head_features
            decoder += (2 * self.embed_dim * inner * (1 + memory / length)
                        + 2 * inner * memory)
        head = self.embed_dim * (self.embed_dim + self.vocab_size)
        return 2.0 * (self.inserted_after * early + late * full
                      + self.decoder_layers * decoder + head)
