"""Perceiver AR (Hawthorne et al. 2022): a long context read once through a latent bottleneck.

Inputs x_0 .. x_{N-1} are embedded; the last m = min(N, num_latents) positions are the latents.
One causally masked cross-attention lets the latent at position p read every input <= p,

    z = e_latent + CrossAttn(Norm_q(e_latent), Norm_kv(e_all)),   z = z + MLP(Norm(z)),

then `num_layers - 1` causal self-attention blocks run over the m latents only, and logits come
out for those m positions: `[batch, m, vocab]` (the trainer scores the last m targets). Cost is
O(N * m) for the cross-attention plus O(layers * m^2) for the latent stack: linear in N.

Positions: the zoo's `PositionScheme` hooks, each at the true token positions (latents at
N-m .. N-1, inputs at 0 .. N-1). Rotations touch the first `rotary_fraction` of each head's
channels (the paper rotates half, with interleaved pairs inside that slice).

Training crops (the reference's `minimum_crop_length` / flaxformer's `train_cropping_method`):
only the last m positions of a row are scored, so training rows are cut at a random end
(`crop_rows`, applied by the trainer's token batches): a row, one left-padded document piece,
keeps a uniformly random prefix of its tokens, at least `minimum_crop_length` long, moved to the
row's end. Every position of a piece is then a latent in some step, instead of only its last m.
"random" (default, the reference's, minimum 1 token), "full_latents" (minimum m: every latent is
a real token, flaxformer's FULL_LATENTS) or "none" (pieces as they are). Rows are never packed
(the latents are a row's last positions), so a crop never mixes documents; the reference crops a
window ending anywhere in the whole document, here the crop stays inside the row's piece (a
piece of a long document does not see the previous piece as context).

Regularisation: `input_dropout_rate` drops a random subset of the *context* inputs (the N - m
positions before the latents), per example, by masking them as cross-attention keys; the latent
positions themselves are always kept, so every latent sees at least its own input and no row is
ever fully masked. Residual dropout (`dropout_rate`) as in the Transformer.

Decoding (`LanguageModel.prefill` / `decode_step`): the prompt is read in one pass (a decode call
of several tokens is a prompt, into an empty cache); the cache holds every input's projected key
and value and the last `num_latents` cross-attention outputs. A new token costs its key/value
projection, one cross-attention row and one pass of the latent stack over the sliding window of
the last `num_latents` cross-attention outputs (every latent's self-attention state depends on
where the window starts, so the stack is re-run rather than cached). Logits equal the full
forward at every length. Packed documents cannot be kept apart: the latents are the row's last
positions, so what a document's tokens read through the latent stack depends on where the document
sits in the row (its logits alone and in a packed row differ by construction).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from lexjax.attention import MaskSpec
from lexjax.layers import MLP, make_norm, with_activation_axes
from lexjax.layers.basic import Dtype
from lexjax.layers.decoder import DecoderLayer
from lexjax.layers.latent_cross_attention import (DEFAULT_KEY_CHUNK, DEFAULT_QUERY_BLOCK,
                                                  LatentCrossAttention)
from lexjax.models.lm import AttentionLanguageModel
from lexjax.positions import PositionScheme, RoPE


TRAIN_CROPPING = ("random", "full_latents", "none")


class PartialRotation(PositionScheme):
    """Applies `scheme`'s rotation to the first `fraction` of each head's channels (rounded down
    to an even count) and leaves the rest unrotated; embeddings and relative biases pass through.

    Clones its scheme in `setup`, so each attention layer that clones this wrapper gets its own
    learned relative-bias parameters (under `position/inner`).
    """

    scheme: PositionScheme
    fraction: float = 1.0

    def setup(self):
        self.inner = self.scheme.clone()

    def rotated_channels(self, head_dim: int) -> int:
        return int(head_dim * self.fraction) // 2 * 2

    def embed(self, positions, features):
        return self.inner.embed(positions, features)

    def rotate(self, q, k, q_positions, k_positions):
        r = self.rotated_channels(q.shape[-1])
        if r == q.shape[-1]:
            return self.inner.rotate(q, k, q_positions, k_positions)
        q_rot, k_rot = self.inner.rotate(q[..., :r], k[..., :r], q_positions, k_positions)
        return (jnp.concatenate([q_rot, q[..., r:]], axis=-1),
                jnp.concatenate([k_rot, k[..., r:]], axis=-1))

    def relative_bias(self, num_heads, head_dim):
        return self.inner.relative_bias(num_heads, head_dim)


class CrossAttentionBlock(nn.Module):
    """The latents' read of the inputs: `z = latents + Attn(Norm_q(latents), Norm_kv(inputs))`,
    then `z + MLP(Norm(z))`, with the heads, MLP, norms, dropout and dtype of `layer` (the
    template of the model's latent self-attention blocks). `keys_values` (normalized, projected
    inputs) is separate so a decoder can cache it."""

    layer: DecoderLayer
    features: int
    block_size: int = DEFAULT_QUERY_BLOCK
    key_chunk_size: int = DEFAULT_KEY_CHUNK

    def setup(self):
        layer = self.layer
        self.query_norm = make_norm(layer.norm, dtype=layer.dtype,
                                    name="pre_attention_query_norm")
        self.input_norm = make_norm(layer.norm, dtype=layer.dtype,
                                    name="pre_attention_input_norm")
        self.attention = LatentCrossAttention(
            features=self.features, num_heads=layer.num_heads, head_dim=layer.head_dim,
            position=layer.position, num_kv_heads=layer.num_kv_heads, block_size=self.block_size,
            key_chunk_size=self.key_chunk_size, dtype=layer.dtype, name="attention")
        self.mlp_norm = make_norm(layer.norm, dtype=layer.dtype, name="pre_mlp_norm")
        self.mlp = MLP(layer.mlp_dim, layer.mlp_activation, layer.dropout_rate, layer.dtype,
                       name="mlp")
        self.dropout = nn.Dropout(layer.dropout_rate, broadcast_dims=(-2,))

    def keys_values(self, inputs: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """`inputs [batch, n, features]` -> keys, values `[batch, n, kv_heads, head_dim]`."""
        return self.attention.keys_values(self.input_norm(inputs))

    def __call__(self, latents: jnp.ndarray, latent_positions: jnp.ndarray, keys: jnp.ndarray,
                 values: jnp.ndarray, key_positions: jnp.ndarray,
                 key_valid: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        """`latents [batch, m, features]` -> `[batch, m, features]` (see LatentCrossAttention)."""
        deterministic = self.layer.deterministic
        h = self.attention(self.query_norm(latents), latent_positions, keys, values,
                           key_positions, key_valid)
        z = latents + self.dropout(h, deterministic=deterministic)
        h = self.mlp(self.mlp_norm(z), deterministic=deterministic)
        return with_activation_axes(z + self.dropout(h, deterministic=deterministic))


class LatentStack(nn.Module):
    """`num_layers` causal self-attention blocks (copies of the `block` template, a
    `DecoderLayer`) over the latents, then the final norm: `[batch, m, embed]` at positions `[m]`
    -> same."""

    num_layers: int
    block: DecoderLayer
    norm: str = "rmsnorm"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
        for i in range(self.num_layers):
            z, _ = self.block.clone(parent=self, name=f"layer_{i}")(z, positions)
        return make_norm(self.norm, dtype=self.dtype, name="final_norm")(z)


@gin.register(module="lexjax.models")
class PerceiverAR(AttentionLanguageModel, kw_only=True):
    """Perceiver AR language model: int32 tokens `[batch, N]` -> float32 logits
    `[batch, min(N, num_latents), vocab_size]` for the last `min(N, num_latents)` positions.

    Attributes:
      num_layers: attention layers in all: the cross-attention plus `num_layers - 1` latent
        self-attention layers (flaxformer's count; the authors' code counts only the latter).
      num_latents: latents = the last `num_latents` positions (the paper's M, 1024 there).
      position: the position scheme (`embed` at the inputs, `rotate` / `relative_bias` in every
        attention layer, at true positions).
      rotary_fraction: fraction of each head's channels the scheme rotates (paper: 0.5).
      input_dropout_rate: training-time fraction of context inputs (before the latents) masked out
        of the cross-attention, drawn per example from the "dropout" rng.
      train_cropping: "random" (the reference's), "full_latents" or "none": how training rows
        are cropped (`crop_rows`, see the module doc).
      minimum_crop_length: the shortest "random" crop (the reference's `minimum_crop_length`;
        at least 1 token).
      cross_attention_block_size, cross_attention_key_chunk_size: latents per query block and
        inputs per key chunk of the cross-attention (live memory O(block * chunk) per head).
      attention_impl: `attend` implementation of the latent self-attention.
    """

    num_latents: int
    position: PositionScheme = RoPE()
    rotary_fraction: float = 0.5
    input_dropout_rate: float = 0.0
    train_cropping: str = "random"
    minimum_crop_length: int = 0
    cross_attention_block_size: int = DEFAULT_QUERY_BLOCK
    cross_attention_key_chunk_size: int = DEFAULT_KEY_CHUNK

    final_norm = False  # the latent stack ends in one
    padding_side = "left"  # it is scored on a row's last positions: keep the text there
    decodes_chunks = True  # a chunk is a prompt, read in one pass
    mixes_segments = ("its latents are the row's last positions, so what a document's tokens "
                      "attend to through the latent stack depends on where it sits in the row")

    @nn.nowrap
    def check(self) -> None:
        super().check()
        if self.num_latents < 1:
            raise ValueError(f"PerceiverAR needs num_latents >= 1, got {self.num_latents}")
        if not 0.0 < self.rotary_fraction <= 1.0:
            raise ValueError(f"rotary_fraction must be in (0, 1], got {self.rotary_fraction}")
        if not 0.0 <= self.input_dropout_rate <= 1.0:
            raise ValueError(f"input_dropout_rate must be in [0, 1], got "
                             f"{self.input_dropout_rate}")
        if self.minimum_crop_length < 0:
            raise ValueError(f"{self.field_name('minimum_crop_length')} must be >= 0, got "
                             f"{self.minimum_crop_length}")
        if self.train_cropping not in TRAIN_CROPPING:
            raise ValueError(f"{self.field_name('train_cropping')} must be one of "
                             f"{TRAIN_CROPPING}, got {self.train_cropping!r}")

    @nn.nowrap
    def crop_rows(self, tokens: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        """Training rows `[batch, length]` (left-padded pieces) cropped at random ends drawn from
        `uniforms [batch]` in [0, 1) (see the module doc); unchanged with
        `train_cropping="none"`."""
        from lexjax.data.packing import random_left_crops  # the data package loads seqio
        if self.train_cropping == "none":
            return tokens
        minimum = (self.num_latents if self.train_cropping == "full_latents"
                   else self.minimum_crop_length)
        return random_left_crops(tokens, minimum, uniforms)

    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward matmul FLOPs per *input* token at sequence `length` (2 per multiply-add): the
        whole forward (keys/values of all inputs, m latents through the stack, m logits) / length.
        """
        d, h, kv = self.head_features, self.num_heads, self.key_value_heads
        m = min(length, self.num_latents)
        mlp = self.embed_dim * self.mlp_dim * (3 if self.mlp_activation == "swiglu" else 2)
        q_out = self.embed_dim * d * 2 * h
        k_v = self.embed_dim * d * 2 * kv
        cross_keys_per_latent = length - m + (m + 1) / 2
        cross = length * k_v + m * (q_out + mlp + 2 * h * d * cross_keys_per_latent)
        latent_layer = m * self.block_macs((m + 1) / 2)
        logits = m * self.embed_dim * self.vocab_size
        return 2.0 * (cross + (self.num_layers - 1) * latent_layer + logits) / length

    def layers(self, deterministic: bool) -> tuple[CrossAttentionBlock, LatentStack]:
        """The cross-attention block and the latent stack, their attention rotating the first
        `rotary_fraction` of each head's channels."""
        rotation = PartialRotation(self.layer_position(), self.rotary_fraction, parent=None)
        fields = {**self.decoder_layer_fields(MaskSpec(), deterministic, decode=False),
                  "position": rotation}
        block = DecoderLayer(**fields, parent=None)
        cross = CrossAttentionBlock(layer=block, features=self.embed_dim,
                                    block_size=self.cross_attention_block_size,
                                    key_chunk_size=self.cross_attention_key_chunk_size,
                                    name="cross_attention")
        stack = LatentStack(self.num_layers - 1, block, norm=self.norm, dtype=self.compute_dtype,
                            name="latents")
        return cross, stack

    def context_keep(self, batch: int, n: int, m: int) -> jnp.ndarray:
        """Training mask of cross-attention keys, bool `[batch, n]`: context inputs (positions
        < n - m) kept with probability 1 - input_dropout_rate, latent positions always."""
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.input_dropout_rate,
                                    (batch, n))
        return keep | (jnp.arange(n) >= n - m)[None, :]

    def backbone(self, x: jnp.ndarray, positions: jnp.ndarray, *,
                 segment_ids: Optional[jnp.ndarray], deterministic: bool,
                 decode: bool) -> jnp.ndarray:
        """`x [b, N, embed]` -> the latent stack's output `[b, min(N, num_latents), embed]`."""
        cross, stack = self.layers(deterministic)
        b, n = x.shape[:2]
        m = min(n, self.num_latents)
        keys, values = cross.keys_values(x)
        cache = self.decoding_cache(keys, values) if decode else None
        if cache is not None and not self.is_initializing():
            if n == 1:
                return self.decode_token(cache, cross, stack, x, keys, values, positions[0])
            write_inputs(cache, keys, values, 0)  # a prompt, into an empty cache
        key_valid = None
        if not deterministic and self.input_dropout_rate > 0.0 and n > m:
            key_valid = self.context_keep(b, n, m)
        z = cross(x[:, n - m:], positions[n - m:], keys, values, positions, key_valid)
        if cache is not None and not self.is_initializing():
            latents = cache["latents"]
            latents.value = jnp.pad(z, [(0, 0), (0, self.num_latents - m), (0, 0)]).astype(
                latents.value.dtype)
        return stack(z, positions[n - m:])

    def decoding_cache(self, keys: jnp.ndarray, values: jnp.ndarray) -> dict:
        """The cache's variables: "keys", "values" `[b, max_length, kv_heads, d]` of every input
        (unrotated; sized by the call that creates the cache) and "latent_window" `[b, num_latents,
        embed]`, the cross-attention outputs of positions start .. start + num_latents - 1,
        start = max(0, length - num_latents) (slots at positions >= length hold nothing yet;
        causal masking keeps them unseen)."""
        latents_shape = (keys.shape[0], self.num_latents, self.embed_dim)
        return {"keys": self.variable("cache", "keys", jnp.zeros, keys.shape, keys.dtype),
                "values": self.variable("cache", "values", jnp.zeros, values.shape,
                                        values.dtype),
                "latents": self.variable("cache", "latent_window", jnp.zeros, latents_shape,
                                         self.compute_dtype)}

    def decode_token(self, cache: dict, cross: CrossAttentionBlock, stack: LatentStack,
                     x: jnp.ndarray, keys: jnp.ndarray, values: jnp.ndarray,
                     t: jnp.ndarray) -> jnp.ndarray:
        """One token `x [b, 1, embed]` (its `keys`, `values`) at position `t` (traced) -> the
        latent stack's output at `t`, `[b, 1, embed]`; updates the cache."""
        write_inputs(cache, keys, values, t)
        all_keys, all_values = cache["keys"].value, cache["values"].value
        key_positions = jnp.arange(all_keys.shape[1], dtype=jnp.int32)
        z = cross(x, t[None], all_keys, all_values, key_positions)
        latents, window = cache["latents"], self.num_latents
        z = z.astype(latents.value.dtype)
        filling = jax.lax.dynamic_update_slice_in_dim(latents.value, z,
                                                      jnp.minimum(t, window - 1), axis=1)
        sliding = jnp.concatenate([latents.value[:, 1:], z], axis=1)
        latents.value = jnp.where(t < window, filling, sliding)
        start = jnp.maximum(t + 1 - window, 0)
        out = stack(latents.value, start + jnp.arange(window, dtype=jnp.int32))
        return jax.lax.dynamic_index_in_dim(out, t - start, axis=1, keepdims=True)


def write_inputs(cache: dict, keys: jnp.ndarray, values: jnp.ndarray, start) -> None:
    """Writes keys and values `[b, n, kv_heads, d]` of positions start .. start + n - 1."""
    for name, new in (("keys", keys), ("values", values)):
        variable = cache[name]
        variable.value = jax.lax.dynamic_update_slice_in_dim(
            variable.value, new.astype(variable.value.dtype), start, axis=1)
