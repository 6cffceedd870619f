"""The Block-Recurrent Transformer (Hutchins et al., NeurIPS 2022) and its Transformer-XL baseline.

A decoder stack of `lexjax.layers.recurrent.BlockLayer`s: every layer attends over the current and
the previous block of `block_size` tokens (Transformer-XL: the previous block's keys/values are
cached across segments), and the layers in `recurrent_layers` (paper: one, the third from the top)
also carry a state of `num_states` vectors from block to block. `recurrent_layers=()` is the
Transformer-XL baseline (configs/models/transformer_xl.gin).

Three ways to run it:
- `model.apply(variables, tokens)`: any length; starts from the learned initial state with no cache,
  like every LM of the zoo.
- Segments of one stream: `logits, carry = model.apply(variables, tokens, carry=carry,
  return_carry=True)`, starting from `model.init_carry(batch)`; the carry (states, last-block
  keys/values per layer, position) makes consecutive calls equal to one call on the concatenation.
  The trainer keeps it in the train state (truncated backpropagation through time).
- Decoding (`LanguageModel.prefill` / `decode_step`): one token per call; per layer the keys and
  values of the previous and the current block, and the recurrent layers' state.
Packed documents are not kept apart: the state and the cache run from block to block across the
row.
"""
from __future__ import annotations

from typing import Optional

import flax
import flax.linen as nn
import gin
import jax.numpy as jnp

from lexjax.layers.recurrent import GATES, BlockLayer
from lexjax.models.lm import AttentionLanguageModel
from lexjax.positions import PositionScheme, T5Buckets


@flax.struct.dataclass
class RecurrentCarry:
    """What one segment hands to the next of the same stream.

    states: float32 `[recurrent_layers, batch, num_states, embed]` (None for Transformer-XL).
    keys, values: float32 `[layers, batch, block, kv_heads, head_dim]`, the last block's keys and
      values of every layer (before any position transform).
    position: int32 scalar, tokens of the stream seen so far; 0 means "a fresh stream" (the
      learned initial state, no cache).
    """

    states: jnp.ndarray
    keys: jnp.ndarray
    values: jnp.ndarray
    position: jnp.ndarray


# Logical axes of the carry's leaves (for sharding it like activations).
CARRY_AXES = RecurrentCarry(
    states=(None, "activation_batch", None, "activation_embed"),
    keys=(None, "activation_batch", None, "activation_heads", "activation_kv"),
    values=(None, "activation_batch", None, "activation_heads", "activation_kv"),
    position=())


@gin.register(module="lexjax.models")
class BlockRecurrentTransformer(AttentionLanguageModel, kw_only=True):
    """Block-recurrent decoder LM: int32 tokens `[batch, length]` -> float32 logits
    `[batch, length, vocab_size]`, causal.

    Attributes:
      block_size: W, the attention window and recurrence step (CHUNK_SIZE; paper 512).
      num_states: S, state vectors per recurrent layer (NUM_STATES; paper 512).
      recurrent_layers: indices (negative counts from the top) of the recurrent layers; None:
        the paper's single layer `num_layers - 3` (layer 10 of 12), or the top one when
        `num_layers < 3`; () is Transformer-XL.
      gate: "fixed" (the paper's best) or "lstm"; state_mlp: False = "skip" (no MLP in the state
        path, the paper's best), True = "dual" (a second gate after an MLP on the state), or
        with `single_gate` "single" (one gate, fed by the MLP's hidden layer on the attention
        outputs; meliad's `single_gate`).
      normalize_keys: L2-normalised queries and keys with a learned per-head temperature in
        every attention (meliad's default, "more stable with Transformer XL"); False: the usual
        1/√d scaling.
      unroll_blocks: a Python loop over blocks instead of `lax.scan` (tests; compile time grows
        with length).
      Other fields as `AttentionLanguageModel`; the block-window attention is computed directly
      (`attention_impl` stays "auto").
    """

    block_size: int = 512
    num_states: int = 512
    recurrent_layers: Optional[tuple[int, ...]] = None
    gate: str = "fixed"
    state_mlp: bool = False
    single_gate: bool = False
    normalize_keys: bool = True
    position: PositionScheme = T5Buckets()
    unroll_blocks: bool = False

    mixes_segments = "its state and key/value cache run from block to block across the row"

    # -- structure ----------------------------------------------------------------------------
    @nn.nowrap
    def recurrent_indices(self) -> tuple[int, ...]:
        """Sorted, non-negative indices of the recurrent layers."""
        if self.recurrent_layers is None:
            return (max(self.num_layers - 3, 0),)
        indices = sorted({i % self.num_layers if -self.num_layers <= i < self.num_layers else i
                          for i in self.recurrent_layers})
        bad = [i for i in indices if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"recurrent_layers {self.recurrent_layers} name layers outside "
                             f"0..{self.num_layers - 1}")
        return tuple(indices)

    @nn.nowrap
    def check(self) -> None:
        super().check()
        if self.gate not in GATES:
            raise ValueError(f"unknown gate {self.gate!r}; use one of {GATES}")
        if self.share_relative_bias:
            raise ValueError("BlockRecurrentTransformer keeps one relative-bias table per layer "
                             "(as meliad does); share_relative_bias is not supported here")
        if self.single_gate and self.mlp_activation == "swiglu":
            raise ValueError("single_gate feeds the state MLP's hidden layer to the gate: it needs "
                             "an element-wise mlp_activation, not 'swiglu'")
        if self.single_gate and not self.state_mlp:
            raise ValueError("single_gate (meliad's \"single\" state path) gates the state MLP's "
                             "output: set state_mlp=True as well")
        if self.block_size < 1 or self.num_states < 1:
            raise ValueError(f"block_size and num_states must be positive, got "
                             f"{self.block_size}, {self.num_states}")
        if self.attention_impl != "auto":
            raise ValueError("BlockRecurrentTransformer computes its block-window attention "
                             f"directly; attention_impl must stay 'auto', got "
                             f"{self.attention_impl!r}")
        self.recurrent_indices()

    # -- carry ----------------------------------------------------------------------------------
    @nn.nowrap
    def init_carry(self, batch_size: int) -> RecurrentCarry:
        """The carry of a fresh stream (zeros, position 0): float32 arrays (no states without
        recurrent layers)."""
        kv = (self.num_layers, batch_size, self.block_size, self.key_value_heads,
              self.head_features)
        recurrent = len(self.recurrent_indices())
        states = (jnp.zeros((recurrent, batch_size, self.num_states, self.embed_dim), jnp.float32)
                  if recurrent else None)
        return RecurrentCarry(states=states,
                              keys=jnp.zeros(kv, jnp.float32), values=jnp.zeros(kv, jnp.float32),
                              position=jnp.zeros((), jnp.int32))

    @nn.nowrap
    def carry_axes(self) -> RecurrentCarry:
        """Logical axis names of the carry's leaves (a `RecurrentCarry` of tuples)."""
        return CARRY_AXES if self.recurrent_indices() else CARRY_AXES.replace(states=None)

    # -- cost ---------------------------------------------------------------------------------
    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward matmul FLOPs per token (2 per multiply-add) at segment `length`."""
        d, h, kv = self.head_features, self.num_heads, self.key_value_heads
        w, s, e = self.block_size, self.num_states, self.embed_dim
        keys_per_query = w + (w + 1) / 2 if length > w else (length + 1) / 2
        gates = 1 if self.gate == "fixed" else 3
        if self.single_gate:  # attention outputs -> MLP hidden -> the gate's projections
            state_path = 2 * h * d * self.mlp_dim + self.mlp_dim * e * gates
        else:
            state_path = 2 * h * d * e * gates + (
                e * self.mlp_dim * (3 if self.mlp_activation == "swiglu" else 2) + e * e * gates
                if self.state_mlp else 0)
        per_state = e * d * (2 * h + 2 * kv) + state_path + 2 * h * d * (s + w)
        recurrent_extra = e * h * d * 2 + 2 * h * d * s + per_state * s / w
        total = (self.num_layers * self.block_macs(keys_per_query)
                 + len(self.recurrent_indices()) * recurrent_extra)
        return 2.0 * (total + e * self.vocab_size)

    # -- forward ------------------------------------------------------------------------------
    def block_layers(self, deterministic: bool) -> list[BlockLayer]:
        recurrent = self.recurrent_indices()
        return [BlockLayer(
            embed_dim=self.embed_dim, num_heads=self.num_heads, head_dim=self.head_features,
            mlp_dim=self.mlp_dim, block_size=self.block_size, position=self.position_template,
            num_kv_heads=self.num_kv_heads, recurrent=i in recurrent,
            num_states=self.num_states, gate=self.gate, state_mlp=self.state_mlp,
            single_gate=self.single_gate, normalize_keys=self.normalize_keys,
            unroll_blocks=self.unroll_blocks, norm=self.norm, mlp_activation=self.mlp_activation,
            dropout_rate=self.dropout_rate, dtype=self.compute_dtype,
            deterministic=deterministic, name=f"layer_{i}") for i in range(self.num_layers)]

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, *, segment_ids: Optional[jnp.ndarray] = None,
                 deterministic: bool = True, decode: bool = False,
                 carry: Optional[RecurrentCarry] = None, return_carry: bool = False):
        """`tokens [batch, length]` -> logits `[batch, length, vocab]`, or `(logits, carry)` with
        `return_carry` (then length must be a multiple of `block_size`). `carry`: the previous
        segment's (default: a fresh stream). `decode=True`: one token per call (see
        `LanguageModel`)."""
        self.check_inputs(tokens, segment_ids, decode)
        layers = self.block_layers(deterministic)
        embedding = self.token_embedding()
        if decode:
            positions = self.token_positions(tokens.shape[1], decode=True)
            caches = self.decoding_caches(layers, tokens.shape[0])
            if not self.is_initializing():
                return self.decode_token(embedding, layers, caches, tokens, positions[0])

        batch, length = tokens.shape
        w = self.block_size
        if return_carry and length % w:
            raise ValueError(f"a carried segment must be a multiple of block_size={w} tokens, "
                             f"got {length}; pad the stream or change TRAIN_LENGTH/CHUNK_SIZE")
        carry = self.init_carry(batch) if carry is None else carry
        padded = jnp.pad(tokens, ((0, 0), (0, -length % w)))
        positions = carry.position + jnp.arange(padded.shape[1], dtype=jnp.int32)
        x = self.embed(embedding, padded, positions, None, deterministic)
        states, keys, values = [], [], []
        recurrent = self.recurrent_indices()
        for i, layer in enumerate(layers):
            state = carry.states[recurrent.index(i)] if i in recurrent else None
            x, (k, v), state = layer(x, (carry.keys[i], carry.values[i]), state, carry.position)
            keys.append(k)
            values.append(v)
            if i in recurrent:
                states.append(state)
        logits = self.output_logits(embedding, x)[:, :length]
        if not return_carry:
            return logits
        new_carry = RecurrentCarry(
            states=jnp.stack(states) if states else carry.states, keys=jnp.stack(keys),
            values=jnp.stack(values), position=carry.position + length)
        return logits, new_carry

    # -- decoding -------------------------------------------------------------------------------
    def decoding_caches(self, layers: list[BlockLayer], batch: int) -> list[dict]:
        """Per layer the cache's "keys", "values" `[batch, 2W, kv_heads, d]` (previous block,
        then the current block so far) and, for a recurrent layer, "state" `[batch, S, embed]`
        (the state the current block reads)."""
        kv_shape = (batch, 2 * self.block_size, self.key_value_heads, self.head_features)
        caches = []
        for i, layer in enumerate(layers):
            cache = {name: self.variable("cache", f"layer_{i}_{name}", jnp.zeros, kv_shape,
                                         jnp.float32) for name in ("keys", "values")}
            if layer.recurrent:
                cache["state"] = self.variable("cache", f"layer_{i}_state", jnp.zeros,
                                               (batch, self.num_states, self.embed_dim),
                                               jnp.float32)
            caches.append(cache)
        return caches

    def decode_token(self, embedding, layers: list[BlockLayer], caches: list[dict],
                     tokens: jnp.ndarray, position: jnp.ndarray) -> jnp.ndarray:
        """Logits `[batch, 1, vocab]` of one token `tokens [batch, 1]` at `position` (traced);
        advances every layer's cache."""
        if tokens.shape[1] != 1:
            raise ValueError(f"BlockRecurrentTransformer decodes one token per call, got "
                             f"{tokens.shape[1]}; use LanguageModel.prefill for a prompt")
        x = self.embed(embedding, tokens, position[None], None, True)
        for layer, cache in zip(layers, caches):
            x, updated = layer.step(x, {name: v.value for name, v in cache.items()}, position)
            for name, variable in cache.items():
                variable.value = updated[name]
        return self.output_logits(embedding, x)
