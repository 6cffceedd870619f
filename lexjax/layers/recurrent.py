"""The Block-Recurrent Transformer's layers (Hutchins et al. 2022): Transformer-XL window
attention, and the recurrent cell that carries a state of `num_states` vectors from block to block.

A segment of n tokens (n a multiple of the block size W) is cut into n / W blocks. Every token of
block j attends to the tokens of blocks j-1 and j that are not in its future; the keys "before"
the first block are a cache carried from the previous segment (invalid at a stream's start).

The recurrent layer adds, on the token ("vertical") side, cross-attention from the tokens of block
j to the state c_j; on the state ("horizontal") side, c_{j+1} = gate(c_j, [SelfAttn(c_j);
CrossAttn(c_j -> tokens of block j)]), a `lax.scan` over blocks. The state's keys and values serve
both directions. Everything except the state recurrence is computed for all blocks at once.

Keys and queries are L2-normalised with a learned per-head temperature by default (meliad's
`normalize_keys`, "more stable with Transformer XL"): every attention's logits are
`|τ_h| (q̂ · k̂ + b)`, `x̂ = x / √(Σ x² + 1e-6)`, τ initialised at 1, one τ per attention (the
tokens' self- and cross-attention, the state's self- and cross-attention); without it, the usual
`q · k / √d + b`.

Positions inside an attention span are block-local (queries W..2W-1, keys 0..2W-1 of the span
"previous block + current block"): relative schemes (RoPE, xPos, T5, ALiBi, ...) see the true
distances, and every block, segment and decoding step does the same arithmetic. Absolute schemes
(sinusoidal, learned) are added once at the bottom of the model at absolute positions.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lexjax.attention import MaskSpec
from lexjax.attention.common import masked_softmax_attention
from lexjax.layers.basic import (Dtype, Layer, dense, kernel_axes, make_norm,
                                 with_activation_axes)
from lexjax.layers.mlp import ELEMENTWISE_ACTIVATIONS, MLP
from lexjax.positions import PositionScheme
from lexjax.positions.base import per_head

GATES = ("fixed", "lstm")
NORMALIZE_EPSILON = 1e-6  # meliad's `normalize_kq`


# --- normalised keys and queries ------------------------------------------------------------
def normalize_keys(x: jnp.ndarray) -> jnp.ndarray:
    """meliad's `normalize_kq`: `x [..., d] * rsqrt(Σ x² + 1e-6)`, in x's dtype."""
    x32 = x.astype(jnp.float32)
    norm = jax.lax.rsqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True) + NORMALIZE_EPSILON)
    return (x32 * norm).astype(x.dtype)


def attention_temperature(module: nn.Module, name: str, num_heads: int) -> jnp.ndarray:
    """A learned per-head temperature `|τ| [heads]` (float32, initialised at ones)."""
    tau = module.param(name, nn.with_logical_partitioning(nn.initializers.ones, ("heads",)),
                       (num_heads,), jnp.float32)
    return jnp.abs(tau)


def tempered(q: jnp.ndarray, bias, temperature: Optional[jnp.ndarray]):
    """Queries `[..., heads, d]` and a relative bias such that the softmax's `q·k / √d + b`
    becomes `τ (q·k + b)`: q times `τ √d` and the bias times τ. Unchanged without τ."""
    if temperature is None:
        return q, bias
    q = (q.astype(jnp.float32) * (temperature * q.shape[-1] ** 0.5)[:, None]).astype(q.dtype)
    if bias is None:
        return q, None
    return q, lambda rel: per_head(temperature, rel) * bias(rel)


# --- block layout ---------------------------------------------------------------------------
def to_blocks(x: jnp.ndarray, block: int) -> jnp.ndarray:
    """`[batch, n, ...]` -> `[batch, n // block, block, ...]` (n a multiple of `block`)."""
    b, n = x.shape[:2]
    return x.reshape((b, n // block, block) + x.shape[2:])


def with_previous_block(blocks: jnp.ndarray, previous: jnp.ndarray) -> jnp.ndarray:
    """Key spans: `blocks [b, nb, W, ...]`, `previous [b, W, ...]` (the block before the first)
    -> `[b, nb, 2W, ...]`, span j = (block j-1, block j)."""
    before = jnp.concatenate([previous[:, None].astype(blocks.dtype), blocks[:, :-1]], axis=1)
    return jnp.concatenate([before, blocks], axis=2)


def span_validity(first_position: jnp.ndarray, num_blocks: int, block: int) -> jnp.ndarray:
    """`[num_blocks, 2W]` bool: False for the keys of a "previous block" that precedes the
    stream's first token (absolute position `first_position + W * (j - 1) < 0`)."""
    starts = first_position + block * jnp.arange(num_blocks, dtype=jnp.int32)
    previous_ok = jnp.broadcast_to((starts >= block)[:, None], (num_blocks, block))
    return jnp.concatenate([previous_ok, jnp.ones((num_blocks, block), bool)], axis=1)


def span_positions(block: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Block-local positions: queries `[W]` = W..2W-1, keys `[2W]` = 0..2W-1."""
    keys = jnp.arange(2 * block, dtype=jnp.int32)
    return keys[block:], keys


def attend_span(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, q_pos: jnp.ndarray,
                k_pos: jnp.ndarray, *, causal: bool, bias=None,
                k_valid: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Softmax attention over one explicit span of keys (float32 logits).

    Args:
      q: `[..., q_len, heads, d]`; k, v: `[..., k_len, kv_heads, d]` (same leading dims).
      q_pos, k_pos: int32 `[q_len]`, `[k_len]` positions for the mask and the relative bias.
      causal: mask keys after the query; bias: a relative bias callable or None.
      k_valid: optional bool `[..., k_len]` broadcastable to the leading dims.
    Returns:
      `[..., q_len, heads, d]`.
    """
    kv_heads = k.shape[-2]
    grouped = q.reshape(q.shape[:-2] + (kv_heads, q.shape[-2] // kv_heads, q.shape[-1]))
    out = masked_softmax_attention(grouped, k, v, q_pos, k_pos, mask=MaskSpec(causal=causal),
                                   bias=bias, k_valid=k_valid)
    return out.reshape(q.shape[:-1] + (v.shape[-1],))


def unordered_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                        temperature: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Attention without mask or positions (to and from the state): `q [..., q_len, heads, d]`,
    `k, v [..., k_len, kv_heads, d]` -> `[..., q_len, heads, d]`; with a `temperature [heads]`,
    logits `τ q·k` (normalised keys), else `q·k / √d`."""
    no_positions = jnp.zeros((), jnp.int32)
    q, _ = tempered(q, None, temperature)
    return attend_span(q, k, v, no_positions[None], no_positions[None], causal=False)


# --- token attention ------------------------------------------------------------------------
class WindowSelfAttention(nn.Module):
    """Projections and block-window attention of the tokens (Transformer-XL style).

    `project(h [b, n, embed])` -> q `[b, n, heads, d]`, k, v `[b, n, kv_heads, d]` (keys and values
    before any position transform: this is what the cache holds); `attend_blocks` and
    `attend_step` attend over (previous block, current block) with the position scheme applied to
    the span's block-local positions. With `normalized`, q and k come back L2-normalised and the
    logits are `|τ| (q̂·k̂ + b)` ("attention_scale").
    """

    num_heads: int
    head_dim: int
    block_size: int
    position: PositionScheme
    num_kv_heads: Optional[int] = None
    normalized: bool = True
    dtype: Dtype = jnp.float32

    def setup(self):
        kv_heads = self.num_kv_heads or self.num_heads
        self.query = dense((self.num_heads, self.head_dim), ("embed", "heads", "kv"),
                           dtype=self.dtype, name="query")
        self.key = dense((kv_heads, self.head_dim), ("embed", "kv_heads", "kv"),
                         dtype=self.dtype, name="key")
        self.value = dense((kv_heads, self.head_dim), ("embed", "kv_heads", "kv"),
                           dtype=self.dtype, name="value")
        self.scheme = self.position.clone()  # parameters under "scheme"
        self.temperature = (attention_temperature(self, "attention_scale", self.num_heads)
                            if self.normalized else None)

    def project(self, h: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        q, k = self.query(h), self.key(h)
        if self.normalized:
            q, k = normalize_keys(q), normalize_keys(k)
        return q, k, self.value(h)

    def _attend(self, q, k, v, q_pos, k_pos, k_valid):
        q, k = self.scheme.rotate(q, k, q_pos, k_pos)
        q, bias = tempered(q, self.scheme.relative_bias(self.num_heads, self.head_dim),
                           self.temperature)
        return attend_span(q, k, v, q_pos, k_pos, causal=True, bias=bias, k_valid=k_valid)

    def attend_blocks(self, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                      previous_k: jnp.ndarray, previous_v: jnp.ndarray,
                      first_position: jnp.ndarray) -> jnp.ndarray:
        """`q [b, n, heads, d]`, `k, v [b, n, kv_heads, d]`, the cached block before them
        `previous_k, previous_v [b, W, kv_heads, d]`, the absolute position of token 0 (int32
        scalar) -> `[b, n, heads, d]`."""
        w = self.block_size
        q_pos, k_pos = span_positions(w)
        k_span = with_previous_block(to_blocks(k, w), previous_k)
        v_span = with_previous_block(to_blocks(v, w), previous_v)
        valid = span_validity(first_position, q.shape[1] // w, w)
        out = self._attend(to_blocks(q, w), k_span, v_span, q_pos, k_pos, valid)
        return out.reshape(q.shape)

    def attend_step(self, q: jnp.ndarray, k_span: jnp.ndarray, v_span: jnp.ndarray,
                    position: jnp.ndarray) -> jnp.ndarray:
        """Decoding: `q [b, 1, heads, d]` at absolute `position` (int32 scalar) against the span
        `k_span, v_span [b, 2W, kv_heads, d]` (previous block, then the current block up to and
        including this token) -> `[b, 1, heads, d]`."""
        w = self.block_size
        k_pos = jnp.arange(2 * w, dtype=jnp.int32)
        q_pos = (w + position % w)[None]
        valid = (k_pos >= w) | (position >= w)
        return self._attend(q, k_span, v_span, q_pos, k_pos, valid)


# --- the state ------------------------------------------------------------------------------
class StateGate(nn.Module):
    """The residual of the state: `state [b, S, embed]` (float32) and an update input
    `[b, S, *features]` (contracted over `contract`) -> the next state, float32.

    "fixed": c' = c * g + z * (1 - g), z = W_z u + b_z, g = sigmoid(b_g) a learned per-channel bias.
    "lstm":  c' = c * f + z * i, z = tanh(W_z u + b_z), i = sigmoid(W_i u + b_i - 1),
             f = sigmoid(W_f u + b_f + 1).
    `squash`: z = tanh(W_z u + b_z) for the fixed gate too (meliad's "single" gate, whose FFN
    ends in tanh). Kernels start at variance scaling 0.1, biases at N(0, 0.1) (the paper's gate
    init).
    """

    kind: str = "fixed"
    contract: tuple[int, ...] = (-1,)
    input_axes: tuple[str, ...] = ("mlp",)
    squash: bool = False
    dtype: Dtype = jnp.float32

    def _projection(self, name: str, features: int) -> nn.Module:
        init = nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")
        return nn.DenseGeneral(
            features, axis=self.contract, dtype=self.dtype, param_dtype=jnp.float32, name=name,
            kernel_init=kernel_axes(init, self.input_axes + ("embed",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.normal(0.1), ("embed",)))

    @nn.compact
    def __call__(self, state: jnp.ndarray, update: jnp.ndarray) -> jnp.ndarray:
        if self.kind not in GATES:
            raise ValueError(f"unknown state gate {self.kind!r}; use one of {GATES}")
        features = state.shape[-1]
        z = self._projection("update", features)(update).astype(jnp.float32)
        if self.kind == "fixed":
            bias = self.param("gate_bias", nn.with_logical_partitioning(
                nn.initializers.normal(0.1), ("embed",)), (features,), jnp.float32)
            g = jax.nn.sigmoid(bias)
            return state * g + (jnp.tanh(z) if self.squash else z) * (1.0 - g)
        i = jax.nn.sigmoid(self._projection("input_gate", features)(update).astype(jnp.float32)
                           - 1.0)
        f = jax.nn.sigmoid(self._projection("forget_gate", features)(update).astype(jnp.float32)
                           + 1.0)
        return state * f + jnp.tanh(z) * i


class StateUpdate(nn.Module):
    """One step of the horizontal direction: state `c [b, S, embed]` (float32) and the current
    block's token keys/values `[b, W, kv_heads, d]` -> `(c_next, (k_s, v_s))`, where `k_s, v_s
    [b, S, kv_heads, d]` are the keys/values of `c` that the block's tokens cross-attend to.

    c (plus learned state IDs) is normalised and projected to queries for self-attention and for
    cross-attention to the tokens, and to keys/values; the two attention outputs, concatenated,
    feed the gate ("skip": no MLP in the state path). With `state_mlp` ("dual"), a second gate
    follows an MLP on the state. With `single_gate` as well ("single", meliad's
    `single_gate`): no gate after the attention; the concatenated attention outputs go through
    the MLP's hidden layer, whose output projection, squashed by tanh, is the one gate's update.
    `normalized`: L2-normalised queries and keys with learned temperatures ("attention_scale"
    for the state's self-attention, "attention_scale2" for its cross-attention).
    """

    num_heads: int
    head_dim: int
    num_kv_heads: Optional[int] = None
    gate: str = "fixed"
    state_mlp: bool = False
    single_gate: bool = False
    mlp_dim: int = 0
    mlp_activation: str = "gelu"
    norm: str = "rmsnorm"
    normalized: bool = True
    dtype: Dtype = jnp.float32

    def setup(self):
        kv_heads = self.num_kv_heads or self.num_heads
        heads = (self.num_heads, self.head_dim)
        self.state_norm = make_norm(self.norm, dtype=self.dtype, name="state_norm")
        self.query = dense(heads, ("embed", "heads", "kv"), dtype=self.dtype, name="query")
        self.cross_query = dense(heads, ("embed", "heads", "kv"), dtype=self.dtype,
                                 name="cross_query")
        self.key = dense((kv_heads, self.head_dim), ("embed", "kv_heads", "kv"),
                         dtype=self.dtype, name="key")
        self.value = dense((kv_heads, self.head_dim), ("embed", "kv_heads", "kv"),
                           dtype=self.dtype, name="value")
        if self.single_gate:
            self.hidden = dense(self.mlp_dim, ("heads", "kv", "mlp"), dtype=self.dtype,
                                contract=(-2, -1), name="hidden")
            self.single = StateGate(self.gate, squash=True, dtype=self.dtype, name="single_gate")
        else:
            self.attention_gate = StateGate(self.gate, contract=(-2, -1),
                                            input_axes=("heads", "kv"), dtype=self.dtype,
                                            name="attention_gate")
            if self.state_mlp:
                self.mlp_norm = make_norm(self.norm, dtype=self.dtype, name="mlp_norm")
                self.mlp = MLP(self.mlp_dim, self.mlp_activation, dtype=self.dtype, name="mlp")
                self.mlp_gate = StateGate(self.gate, dtype=self.dtype, name="mlp_gate")
        self.temperatures = ((attention_temperature(self, "attention_scale", self.num_heads),
                              attention_temperature(self, "attention_scale2", self.num_heads))
                             if self.normalized else (None, None))

    def normed_state(self, state: jnp.ndarray, state_ids: jnp.ndarray) -> jnp.ndarray:
        return self.state_norm((state + state_ids).astype(self.dtype))

    def keys_values(self, state: jnp.ndarray, state_ids: jnp.ndarray
                    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """`[b, S, embed]` -> k_s, v_s `[b, S, kv_heads, d]` (k_s normalised with `normalized`)."""
        h = self.normed_state(state, state_ids)
        return self.query_or_key(self.key, h), self.value(h)

    def query_or_key(self, projection: nn.Module, h: jnp.ndarray) -> jnp.ndarray:
        """A query or key projection of `h`, L2-normalised with `normalized`."""
        x = projection(h)
        return normalize_keys(x) if self.normalized else x

    def __call__(self, state: jnp.ndarray, block_kv: tuple[jnp.ndarray, jnp.ndarray],
                 state_ids: jnp.ndarray):
        token_k, token_v = block_kv
        h = self.normed_state(state, state_ids)
        q, cross_q, k_s = (self.query_or_key(p, h)
                           for p in (self.query, self.cross_query, self.key))
        v_s = self.value(h)
        own_tau, read_tau = self.temperatures
        own = unordered_attention(q, k_s, v_s, own_tau)
        read = unordered_attention(cross_q, token_k.astype(self.dtype),
                                   token_v.astype(self.dtype), read_tau)
        both = jnp.concatenate([own, read], axis=-2)
        if self.single_gate:
            hidden = ELEMENTWISE_ACTIVATIONS[self.mlp_activation](self.hidden(both))
            return self.single(state, hidden), (k_s, v_s)
        state = self.attention_gate(state, both)
        if self.state_mlp:
            state = self.mlp_gate(state, self.mlp(self.mlp_norm(state.astype(self.dtype))))
        return state, (k_s, v_s)


def _scan_body(module: StateUpdate, state, block_kv, state_ids):
    return module(state, block_kv, state_ids)


# --- layers ---------------------------------------------------------------------------------
class BlockLayer(Layer, kw_only=True):
    """One pre-norm layer of the block-recurrent stack: `[b, n, embed]` -> same.

    Without `recurrent`: a Transformer-XL layer (block-window self-attention with the carried
    previous block, then an MLP). With `recurrent`: the recurrent cell; the tokens' attention
    output is concatenated with their cross-attention to the state of their block (its own
    temperature "attention_scale2" with `normalize_keys`) before the output projection, and the
    state runs through `StateUpdate` block by block (`lax.scan`, or a Python loop with
    `unroll_blocks`). Dropout is applied on the token path only (as in meliad:
    the state path has none).
    """

    embed_dim: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    block_size: int
    position: PositionScheme
    num_kv_heads: Optional[int] = None
    recurrent: bool = False
    num_states: int = 512
    gate: str = "fixed"
    state_mlp: bool = False
    single_gate: bool = False
    normalize_keys: bool = True
    unroll_blocks: bool = False
    norm: str = "rmsnorm"
    mlp_activation: str = "gelu"

    def setup(self):
        self.attention_norm = make_norm(self.norm, dtype=self.dtype, name="pre_attention_norm")
        self.attention = WindowSelfAttention(self.num_heads, self.head_dim, self.block_size,
                                             self.position, self.num_kv_heads,
                                             self.normalize_keys, self.dtype, name="attention")
        self.out = dense(self.embed_dim, ("heads", "kv", "embed"), dtype=self.dtype,
                         contract=(-2, -1), name="out")
        self.mlp_norm = make_norm(self.norm, dtype=self.dtype, name="pre_mlp_norm")
        self.mlp = MLP(self.mlp_dim, self.mlp_activation, self.dropout_rate, self.dtype,
                       name="mlp")
        self.dropout = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))
        if self.recurrent:
            self.cross_query = dense((self.num_heads, self.head_dim), ("embed", "heads", "kv"),
                                     dtype=self.dtype, name="cross_query")
            self.state_update = StateUpdate(
                self.num_heads, self.head_dim, self.num_kv_heads, self.gate, self.state_mlp,
                self.single_gate, self.mlp_dim, self.mlp_activation, self.norm,
                self.normalize_keys, self.dtype, name="state_update")
            self.cross_temperature = (
                attention_temperature(self, "attention_scale2", self.num_heads)
                if self.normalize_keys else None)
            shape = (self.num_states, self.embed_dim)
            self.state_ids = self.param("state_ids", nn.with_logical_partitioning(
                nn.initializers.normal(1.0), (None, "embed")), shape, jnp.float32)
            self.initial_state = self.param("initial_state", nn.with_logical_partitioning(
                nn.initializers.normal(0.1), (None, "embed")), shape, jnp.float32)

    def token_cross_queries(self, h: jnp.ndarray) -> jnp.ndarray:
        """The tokens' queries to the state `[b, n, heads, d]` (normalised with
        `normalize_keys`)."""
        q = self.cross_query(h)
        return normalize_keys(q) if self.normalize_keys else q

    def _finish(self, x: jnp.ndarray, mixed: jnp.ndarray) -> jnp.ndarray:
        x = x + self.dropout(self.out(mixed), deterministic=self.deterministic)
        h = self.mlp(self.mlp_norm(x), deterministic=self.deterministic)
        return with_activation_axes(x + self.dropout(h, deterministic=self.deterministic))

    def start_state(self, state: jnp.ndarray, first_position: jnp.ndarray) -> jnp.ndarray:
        """The learned initial state at a stream's start, else the carried `state [b, S, embed]`."""
        return jnp.where(first_position == 0, self.initial_state[None], state)

    def run_state(self, state: jnp.ndarray, k_blocks: jnp.ndarray, v_blocks: jnp.ndarray):
        """`state [b, S, embed]`, block keys/values `[b, nb, W, kv_heads, d]` -> (final state,
        (k_s, v_s) `[b, nb, S, kv_heads, d]`: the keys/values of the state each block reads)."""
        if self.unroll_blocks:
            per_block = []
            for j in range(k_blocks.shape[1]):
                state, kv = self.state_update(state, (k_blocks[:, j], v_blocks[:, j]),
                                              self.state_ids)
                per_block.append(kv)
            return state, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs, 1), *per_block)
        scan = nn.scan(_scan_body, variable_broadcast="params", split_rngs={"params": False},
                       in_axes=(1, nn.broadcast), out_axes=1)
        return scan(self.state_update, state, (k_blocks, v_blocks), self.state_ids)

    def __call__(self, x: jnp.ndarray, previous_kv: tuple[jnp.ndarray, jnp.ndarray],
                 state: Optional[jnp.ndarray], first_position: jnp.ndarray):
        """A segment: `x [b, n, embed]` (n a multiple of the block size W), the cached previous
        block `previous_kv` (`[b, W, kv_heads, d]` each), the carried state `[b, S, embed]`
        (recurrent layers; ignored at a stream's start) and the absolute position of token 0.

        Returns `(x, last_kv, state)`: the output, this segment's last-block keys/values (the
        next segment's cache) and the state after the last block (`state` as given if not
        recurrent).
        """
        w = self.block_size
        h = self.attention_norm(x)
        q, k, v = self.attention.project(h)
        mixed = self.attention.attend_blocks(q, k, v, *previous_kv, first_position)
        if self.recurrent:
            state, (k_s, v_s) = self.run_state(self.start_state(state, first_position),
                                               to_blocks(k, w), to_blocks(v, w))
            read = unordered_attention(to_blocks(self.token_cross_queries(h), w), k_s, v_s,
                                       self.cross_temperature)
            mixed = jnp.concatenate([mixed, read.reshape(mixed.shape)], axis=-2)
        last_kv = (k[:, -w:].astype(jnp.float32), v[:, -w:].astype(jnp.float32))
        return self._finish(x, mixed), last_kv, state

    def step(self, x: jnp.ndarray, cache: dict, position: jnp.ndarray):
        """Decoding one token `x [b, 1, embed]` at absolute `position` (int32 scalar).

        `cache`: "keys", "values" `[b, 2W, kv_heads, d]` (previous block, then the current block
        so far) and, for a recurrent layer, "state" `[b, S, embed]` (the state the current block
        reads). Returns `(x, cache)`; when the token completes its block the state advances and
        the current block becomes the previous one.
        """
        w = self.block_size
        h = self.attention_norm(x)
        q, k, v = self.attention.project(h)
        slot = w + position % w
        keys = jax.lax.dynamic_update_slice_in_dim(cache["keys"], k.astype(jnp.float32), slot, 1)
        values = jax.lax.dynamic_update_slice_in_dim(cache["values"], v.astype(jnp.float32),
                                                     slot, 1)
        mixed = self.attention.attend_step(q, keys.astype(q.dtype), values.astype(q.dtype),
                                           position)
        complete = position % w == w - 1
        new_cache = {}
        if self.recurrent:
            state = self.start_state(cache["state"], position)
            k_s, v_s = self.state_update.keys_values(state, self.state_ids)
            read = unordered_attention(self.token_cross_queries(h), k_s, v_s,
                                       self.cross_temperature)
            mixed = jnp.concatenate([mixed, read], axis=-2)
            advanced, _ = self.state_update(state, (keys[:, w:], values[:, w:]), self.state_ids)
            new_cache["state"] = jnp.where(complete, advanced, state)
        shift = lambda c: jnp.where(complete, jnp.concatenate(
            [c[:, w:], jnp.zeros_like(c[:, w:])], axis=1), c)
        new_cache.update(keys=shift(keys), values=shift(values))
        return self._finish(x, mixed), new_cache
