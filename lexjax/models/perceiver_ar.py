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

Regularisation: `input_dropout_rate` drops a random subset of the *context* inputs (the N - m
positions before the latents), per example, by masking them as cross-attention keys; the latent
positions themselves are always kept, so every latent sees at least its own input and no row is
ever fully masked. Residual dropout (`dropout_rate`) as in the Transformer.

Generation: `prefill` then `decode_step`, one token at a time. A new token costs its key/value
projection, one cross-attention row and one pass of the latent stack over the sliding window of
the last `num_latents` cross-attention outputs (every latent's self-attention state depends on
where the window starts, so the stack is re-run rather than cached). Logits equal the full
forward at every length.
"""
from __future__ import annotations

from typing import Optional

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from lexjax.attention import MaskSpec
from lexjax.layers import MLP, Embedding, compute_dtype, dense, make_norm, with_activation_axes
from lexjax.layers.basic import Dtype
from lexjax.layers.latent_cross_attention import (DEFAULT_KEY_CHUNK, DEFAULT_QUERY_BLOCK,
                                                  LatentCrossAttention)
from lexjax.models.transformer import DecoderLayer
from lexjax.positions import PositionScheme, RoPE


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
    then `z + MLP(Norm(z))`. `keys_values` (normalized, projected inputs) is separate so a decoder
    can cache it."""

    features: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    position: PositionScheme
    num_kv_heads: Optional[int] = None
    norm: str = "rmsnorm"
    mlp_activation: str = "gelu"
    dropout_rate: float = 0.0
    block_size: int = DEFAULT_QUERY_BLOCK
    key_chunk_size: int = DEFAULT_KEY_CHUNK
    dtype: Dtype = jnp.float32

    def setup(self):
        self.query_norm = make_norm(self.norm, dtype=self.dtype, name="pre_attention_query_norm")
        self.input_norm = make_norm(self.norm, dtype=self.dtype, name="pre_attention_input_norm")
        self.attention = LatentCrossAttention(
            features=self.features, num_heads=self.num_heads, head_dim=self.head_dim,
            position=self.position, num_kv_heads=self.num_kv_heads, block_size=self.block_size,
            key_chunk_size=self.key_chunk_size, dtype=self.dtype, name="attention")
        self.mlp_norm = make_norm(self.norm, dtype=self.dtype, name="pre_mlp_norm")
        self.mlp = MLP(self.mlp_dim, self.mlp_activation, self.dropout_rate, self.dtype,
                       name="mlp")
        self.dropout = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))

    def keys_values(self, inputs: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """`inputs [batch, n, features]` -> keys, values `[batch, n, kv_heads, head_dim]`."""
        return self.attention.keys_values(self.input_norm(inputs))

    def __call__(self, latents: jnp.ndarray, latent_positions: jnp.ndarray, keys: jnp.ndarray,
                 values: jnp.ndarray, key_positions: jnp.ndarray,
                 key_valid: Optional[jnp.ndarray], deterministic: bool) -> jnp.ndarray:
        """`latents [batch, m, features]` -> `[batch, m, features]` (see LatentCrossAttention)."""
        h = self.attention(self.query_norm(latents), latent_positions, keys, values,
                           key_positions, key_valid)
        z = latents + self.dropout(h, deterministic=deterministic)
        h = self.mlp(self.mlp_norm(z), deterministic=deterministic)
        return with_activation_axes(z + self.dropout(h, deterministic=deterministic))


class LatentStack(nn.Module):
    """`num_layers` causal self-attention blocks (the Transformer's `DecoderLayer`) over the
    latents, then the final norm: `[batch, m, features]` at positions `[m]` -> same."""

    num_layers: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    position: PositionScheme
    num_kv_heads: Optional[int] = None
    norm: str = "rmsnorm"
    mlp_activation: str = "gelu"
    dropout_rate: float = 0.0
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jnp.ndarray, positions: jnp.ndarray, deterministic: bool):
        for i in range(self.num_layers):
            z, _ = DecoderLayer(
                num_heads=self.num_heads, head_dim=self.head_dim, mlp_dim=self.mlp_dim,
                position=self.position, mask=MaskSpec(), num_kv_heads=self.num_kv_heads,
                norm=self.norm, mlp_activation=self.mlp_activation,
                dropout_rate=self.dropout_rate, attention_impl=self.attention_impl,
                dtype=self.dtype, deterministic=deterministic, name=f"layer_{i}")(z, positions)
        return make_norm(self.norm, dtype=self.dtype, name="final_norm")(z)


@flax.struct.dataclass
class DecodeState:
    """What `decode_step` carries from token to token.

    keys, values: `[batch, max_length, kv_heads, head_dim]` cross-attention inputs, filled for
      positions < length (unrotated; rotated at attention time from their positions).
    latents: `[batch, num_latents, embed]` cross-attention outputs of positions
      start .. start + num_latents - 1, start = max(0, length - num_latents); slots at positions
      >= length hold nothing yet (causal masking keeps them unseen).
    length: int32 scalar, tokens consumed so far.
    """

    keys: jnp.ndarray
    values: jnp.ndarray
    latents: jnp.ndarray
    length: jnp.ndarray


@gin.configurable(module="lexjax.models")
class PerceiverAR(nn.Module):
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
      dropout_rate: residual, MLP and embedding dropout.
      cross_attention_block_size, cross_attention_key_chunk_size: latents per query block and
        inputs per key chunk of the cross-attention (live memory O(block * chunk) per head).
      attention_impl: `attend` implementation of the latent self-attention.
      dtype: compute dtype name; parameters and logits are float32.
    """

    vocab_size: int
    num_layers: int
    embed_dim: int
    num_heads: int
    mlp_dim: int
    num_latents: int
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    position: PositionScheme = RoPE()
    rotary_fraction: float = 0.5
    input_dropout_rate: float = 0.0
    dropout_rate: float = 0.0
    cross_attention_block_size: int = DEFAULT_QUERY_BLOCK
    cross_attention_key_chunk_size: int = DEFAULT_KEY_CHUNK
    attention_impl: str = "auto"
    norm: str = "rmsnorm"
    mlp_activation: str = "gelu"
    tie_embeddings: bool = True
    dtype: str = "float32"

    def _check_config(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"PerceiverAR needs num_layers >= 1 (the cross-attention), got "
                             f"{self.num_layers}")
        if self.num_latents < 1:
            raise ValueError(f"PerceiverAR needs num_latents >= 1, got {self.num_latents}")
        if not 0.0 < self.rotary_fraction <= 1.0:
            raise ValueError(f"rotary_fraction must be in (0, 1], got {self.rotary_fraction}")
        if not 0.0 <= self.input_dropout_rate <= 1.0:
            raise ValueError(f"input_dropout_rate must be in [0, 1], got "
                             f"{self.input_dropout_rate}")

    @property
    def _head_dim(self) -> int:
        return self.head_dim or self.embed_dim // self.num_heads

    def setup(self):
        self._check_config()
        dtype = compute_dtype(self.dtype)
        rotation = PartialRotation(self.position, self.rotary_fraction, parent=None)
        shared = dict(num_heads=self.num_heads, head_dim=self._head_dim, mlp_dim=self.mlp_dim,
                      position=rotation, num_kv_heads=self.num_kv_heads, norm=self.norm,
                      mlp_activation=self.mlp_activation, dropout_rate=self.dropout_rate,
                      dtype=dtype)
        self.embedding = Embedding(self.vocab_size, self.embed_dim, dtype=dtype,
                                   name="token_embedding")
        self.embedding_dropout = nn.Dropout(self.dropout_rate)
        self.cross = CrossAttentionBlock(features=self.embed_dim,
                                         block_size=self.cross_attention_block_size,
                                         key_chunk_size=self.cross_attention_key_chunk_size,
                                         name="cross_attention", **shared)
        self.latent_stack = LatentStack(num_layers=self.num_layers - 1,
                                        attention_impl=self.attention_impl, name="latents",
                                        **shared)
        if not self.tie_embeddings:
            self.logits_dense = dense(self.vocab_size, ("embed", "vocab"), dtype=dtype,
                                      name="logits")

    @nn.nowrap
    def flops_per_token(self, length: int) -> float:
        """Forward matmul FLOPs per *input* token at sequence `length` (2 per multiply-add): the
        whole forward (keys/values of all inputs, m latents through the stack, m logits) / length.
        """
        d, h = self._head_dim, self.num_heads
        kv = self.num_kv_heads or h
        m = min(length, self.num_latents)
        mlp = self.embed_dim * self.mlp_dim * (3 if self.mlp_activation == "swiglu" else 2)
        q_out = self.embed_dim * d * 2 * h
        k_v = self.embed_dim * d * 2 * kv
        cross_keys_per_latent = length - m + (m + 1) / 2
        cross = length * k_v + m * (q_out + mlp + 2 * h * d * cross_keys_per_latent)
        latent_layer = m * (q_out + k_v + mlp + 2 * h * d * (m + 1) / 2)
        logits = m * self.embed_dim * self.vocab_size
        return 2.0 * (cross + (self.num_layers - 1) * latent_layer + logits) / length

    def _embed(self, tokens: jnp.ndarray, positions: jnp.ndarray,
               deterministic: bool) -> jnp.ndarray:
        """int32 `tokens [batch, n]` at `positions [n]` -> `[batch, n, embed]`."""
        x = self.embedding(tokens)
        absolute = self.position.embed(positions, self.embed_dim)
        if absolute is not None:
            x = x + absolute.astype(x.dtype)
        return with_activation_axes(self.embedding_dropout(x, deterministic=deterministic))

    def _logits(self, z: jnp.ndarray) -> jnp.ndarray:
        """Final-normed latents `[batch, m, embed]` -> float32 `[batch, m, vocab]`."""
        if self.tie_embeddings:
            return self.embedding.attend(z) * (self.embed_dim ** -0.5)
        return self.logits_dense(z).astype(jnp.float32)

    def _context_keep(self, batch: int, n: int, m: int) -> jnp.ndarray:
        """Training mask of cross-attention keys, bool `[batch, n]`: context inputs (positions
        < n - m) kept with probability 1 - input_dropout_rate, latent positions always."""
        rng = self.make_rng("dropout")
        keep = jax.random.bernoulli(rng, 1.0 - self.input_dropout_rate, (batch, n))
        return keep | (jnp.arange(n) >= n - m)[None, :]

    def _read_inputs(self, tokens: jnp.ndarray, deterministic: bool):
        """The full forward up to the cross-attention: `(z [b, m, embed] at latent_positions [m],
        keys, values [b, n, kv_heads, d])`."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be int32 [batch, length], got shape {tokens.shape}")
        b, n = tokens.shape
        m = min(n, self.num_latents)
        x = self._embed(tokens, np.arange(n, dtype=np.int32), deterministic)
        keys, values = self.cross.keys_values(x)
        key_valid = None
        if not deterministic and self.input_dropout_rate > 0.0 and n > m:
            key_valid = self._context_keep(b, n, m)
        latent_positions = np.arange(n - m, n, dtype=np.int32)
        z = self.cross(x[:, n - m:], latent_positions, keys, values,
                       np.arange(n, dtype=np.int32), key_valid, deterministic)
        return z, latent_positions, keys, values

    def __call__(self, tokens: jnp.ndarray, *, deterministic: bool = True) -> jnp.ndarray:
        """int32 `tokens [batch, N]` -> float32 logits `[batch, min(N, num_latents), vocab]`,
        the predictions at positions N - m .. N - 1."""
        z, latent_positions, _, _ = self._read_inputs(tokens, deterministic)
        return self._logits(self.latent_stack(z, latent_positions, deterministic))

    def prefill(self, tokens: jnp.ndarray, max_length: int) -> tuple[jnp.ndarray, DecodeState]:
        """Reads a prompt `[batch, n]` (n >= 1) for generation up to `max_length` tokens in all.

        Returns the forward's logits `[batch, min(n, num_latents), vocab]` (the last row predicts
        token n) and the `DecodeState` for `decode_step`.
        """
        n = tokens.shape[-1]
        if not 1 <= n <= max_length:
            raise ValueError(f"prefill needs 1 <= prompt length ({n}) <= max_length "
                             f"({max_length})")
        z, latent_positions, keys, values = self._read_inputs(tokens, deterministic=True)
        logits = self._logits(self.latent_stack(z, latent_positions, deterministic=True))
        grow = [(0, 0), (0, max_length - n), (0, 0), (0, 0)]
        latents = jnp.pad(z, [(0, 0), (0, self.num_latents - z.shape[1]), (0, 0)])
        state = DecodeState(keys=jnp.pad(keys, grow), values=jnp.pad(values, grow),
                            latents=latents, length=jnp.asarray(n, jnp.int32))
        return logits, state

    def decode_step(self, state: DecodeState, token: jnp.ndarray
                    ) -> tuple[jnp.ndarray, DecodeState]:
        """Consumes `token [batch]` (int32) at position `state.length`; returns the logits
        `[batch, vocab]` predicting the next token and the advanced state. The caller keeps
        `state.length < max_length` (positions past the cache are not checked under jit)."""
        t = state.length
        position = t[None]
        x = self._embed(token[:, None], position, deterministic=True)
        new_keys, new_values = self.cross.keys_values(x)
        keys = jax.lax.dynamic_update_slice_in_dim(state.keys, new_keys.astype(state.keys.dtype),
                                                   t, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(
            state.values, new_values.astype(state.values.dtype), t, axis=1)
        key_positions = jnp.arange(keys.shape[1], dtype=jnp.int32)
        z = self.cross(x, position, keys, values, key_positions, None, True)
        z = z.astype(state.latents.dtype)
        window = self.num_latents
        filling = jax.lax.dynamic_update_slice_in_dim(state.latents, z,
                                                      jnp.minimum(t, window - 1), axis=1)
        sliding = jnp.concatenate([state.latents[:, 1:], z], axis=1)
        latents = jnp.where(t < window, filling, sliding)
        start = jnp.maximum(t + 1 - window, 0)
        out = self.latent_stack(latents, start + jnp.arange(window, dtype=jnp.int32),
                                deterministic=True)
        last = jax.lax.dynamic_index_in_dim(out, t - start, axis=1, keepdims=True)
        logits = self._logits(last)[:, 0]
        return logits, DecodeState(keys=keys, values=values, latents=latents, length=t + 1)
