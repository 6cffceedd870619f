"""Kernelized attention with relative position encoding by FFT (Luo et al., "Stable, Fast and
Accurate: Kernelized Attention with Relative Positional Encoding", NeurIPS 2021).

Softmax attention with a relative bias b_{i−j} per head,

    Att_i = Σ_j exp(q_i·k_j/√d + b_{i−j}) v_j / Σ_j exp(q_i·k_j/√d + b_{i−j}),

is kernelised with positive random features (Performer): exp(q·k/√d) = E_w[φ(q)·φ(k)] with

    φ(x)_r = exp(w_r·x' − |x'|²/2) / √m,   x' = x·d^(−1/4),   w_r ~ N(0, I_d),  r = 1..m,

and the bias becomes a positive Toeplitz matrix C_ij = c_{i−j} = exp(b_{i−j}). Then

    num_i = φ(q_i)ᵀ Σ_j C_ij (φ(k_j) ⊗ v_j)   [m × d_v channels],
    den_i = φ(q_i)ᵀ Σ_j C_ij φ(k_j)           [m channels],      out_i = num_i / den_i,

and every channel is one Toeplitz mat-vec y_i = Σ_j c_{i−j} s_j, which embeds in a circulant of
size L ≥ 2n − 1 and costs O(L log L) by FFT: O(n log n · m · d_v) in all, never `[n, n]`. The
causal form keeps the offsets i − j ≥ 0 (key j ≤ query i) only, and computes them exactly
instead (`banded_causal_multiply`: the bias is constant past R, so offsets below R are block-
banded products and the rest one prefix sum, O(n · R · m · d_v)): the float32 FFT's rounding
spreads every key over the whole row, which moved early outputs of a causal LM by ~1e-4 when
later tokens changed.

Bias parameterisation: a learned log-bias per head for offsets −R..R (`[heads, 2R+1]`, index R is
offset 0); farther offsets share the end values, so the parameters do not depend on the length.

Numerics (everything position-dependent, the features and the FFT, runs in float32):
- Features are computed in log space; queries subtract their max over the m features (one shift
  per query row, which cancels between num_i and den_i), keys one max over all positions and
  features of a head (one shift per [batch, head], which cancels in every ratio: in the causal
  form later keys then reach earlier outputs only at rounding level, 1e-7 relative, through a
  common factor). `decode_step`, which cannot see later keys, keeps a running max and rescales
  its state when it grows, as online softmax does.
- The coefficients subtract the max of the log-bias over the offsets used, so c ≤ 1 (cancels).
- The float32 FFT's error is absolute, about 1e-7 of a channel's largest values over the whole
  row, so a row whose true denominator is far below that would be noise. The denominator is
  clamped to at least `DENOMINATOR_FLOOR` × φ(q_i)·Σ_j φ(k_j) over all keys (the denominator
  with every coefficient at its maximum, 1, and every key visible): above the FFT's noise, so
  |out_i| stays about max |v| instead of noise / tiny, and 0/0 stays out. In the causal form
  (computed without the FFT) the floor binds only where a row's own keys' features are e^-14
  below the row's largest or less; such a row is shrunk towards 0 and depends on later keys
  through the floor.

Packed documents (segment ids) are refused: the FFT runs over the whole row and would mix them
(exact segment separation needs a local O(n·R) band plus segmented prefix sums, not an FFT).
Memory: the FFT holds `[batch, L/2+1, heads, m·(d_v+1)]` complex64 — the method's known cost.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lexjax.layers.basic import (ACTIVATION_HEADS, Dtype, dense, projected_qkv,
                                 with_activation_axes)
from lexjax.layers.decoder import DecoderLayer
from lexjax.layers.decoding import cached_recurrence
from lexjax.layers.ssm import fft_length
from lexjax.positions import PositionScheme

REDRAW_MODES = ("fixed", "per_step")
STABILIZERS = (None, "query", "key")
DENOMINATOR_FLOOR = 1e-6
_HIGHEST = jax.lax.Precision.HIGHEST


def random_projection(key: jax.Array, heads: int, features: int, head_dim: int,
                      orthogonal: bool = True) -> jnp.ndarray:
    """Random feature directions w, float32 `[heads, features, head_dim]`.

    Each row is marginally N(0, I_d), so the features stay unbiased. With `orthogonal`, the rows
    come in blocks of `head_dim` that are exactly orthogonal (QR of a Gaussian matrix), each row
    rescaled to the norm of an independent Gaussian vector (Performer's orthogonal random
    features: same marginals, lower variance); the last block is cut to size."""
    if not orthogonal:
        return jax.random.normal(key, (heads, features, head_dim), jnp.float32)
    blocks = -(-features // head_dim)
    k_dir, k_norm = jax.random.split(key)
    gauss = jax.random.normal(k_dir, (heads, blocks, head_dim, head_dim), jnp.float32)
    q, r = jnp.linalg.qr(gauss)  # columns orthonormal
    # LAPACK's signs make Q's columns point in biased directions; with diag(R) > 0, Q is Haar.
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[..., None, :]
    rows = jnp.swapaxes(q, -1, -2).reshape(heads, blocks * head_dim, head_dim)[:, :features]
    norms = jnp.linalg.norm(
        jax.random.normal(k_norm, (heads, features, head_dim), jnp.float32), axis=-1)
    return rows * norms[..., None]


def feature_logits(x: jnp.ndarray, projection: jnp.ndarray) -> jnp.ndarray:
    """log(√m · φ(x)) = w_r·x' − |x'|²/2 with x' = x·d^(−1/4): `x [batch, length, heads, head_dim]`,
    `projection [heads, m, head_dim]` -> float32 `[batch, length, heads, m]`."""
    x = x.astype(jnp.float32) * x.shape[-1] ** -0.25
    wx = jnp.einsum("bnhd,hmd->bnhm", x, projection.astype(jnp.float32), precision=_HIGHEST)
    return wx - 0.5 * jnp.sum(jnp.square(x), axis=-1, keepdims=True)


def positive_random_features(x: jnp.ndarray, projection: jnp.ndarray,
                             stabilize: Optional[str] = None) -> jnp.ndarray:
    """φ(x) = exp(w·x' − |x'|²/2)/√m, so that E[φ(q)·φ(k)] = exp(q·k/√d).

    Args:
      x: `[batch, length, heads, head_dim]`.
      projection: `[heads, m, head_dim]` (`random_projection`).
      stabilize: None (the plain features); "query": subtract each row's max over the m features
        (a factor per [batch, length, head], cancelling between an attention numerator and
        denominator); "key": subtract one max over all positions and features per [batch, head]
        (a factor common to all keys of a head, cancelling likewise). The shifts carry no gradient.
    Returns:
      float32 `[batch, length, heads, m]`, positive.
    """
    if stabilize not in STABILIZERS:
        raise ValueError(f"unknown stabilize {stabilize!r}; use one of {STABILIZERS}")
    logits = feature_logits(x, projection)
    if stabilize == "query":
        logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    elif stabilize == "key":
        logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=(1, 3), keepdims=True))
    return jnp.exp(logits) / math.sqrt(projection.shape[1])


def toeplitz_multiply(coefficients: jnp.ndarray, signal: jnp.ndarray,
                      causal: bool) -> jnp.ndarray:
    """y_i = Σ_j c_{i−j} s_j per head and channel, by a circulant embedding and FFT.

    Args:
      coefficients: `[heads, 2n − 1]`, c for offsets −(n−1)..(n−1) (index n − 1 is offset 0).
      signal: `[batch, n, heads, channels]`.
      causal: use offsets ≥ 0 only (y_i sums over j ≤ i); the negative half is ignored.
    Returns:
      float32 `[batch, n, heads, channels]`. The circulant has size L = `fft_length(n)` ≥ 2n − 1
      (first column c_0..c_{n−1}, zeros, then c_{−(n−1)}..c_{−1}), so nothing wraps around;
      O(L log L) per channel.
    """
    n = signal.shape[1]
    if coefficients.shape[-1] != 2 * n - 1:
        raise ValueError(f"coefficients {coefficients.shape} do not fit length {n}: need "
                         f"[heads, {2 * n - 1}]")
    size = fft_length(n)
    coefficients = coefficients.astype(jnp.float32)
    ahead = coefficients[:, n - 1:]  # offsets 0 .. n-1
    behind = coefficients[:, :n - 1]  # offsets -(n-1) .. -1
    if causal:
        behind = jnp.zeros_like(behind)
    column = jnp.concatenate(
        [ahead, jnp.zeros((coefficients.shape[0], size - 2 * n + 1), jnp.float32), behind], -1)
    c_f = jnp.fft.rfft(column, n=size, axis=-1).T  # [L/2+1, heads]
    s_f = jnp.fft.rfft(signal.astype(jnp.float32), n=size, axis=1)  # [b, L/2+1, h, F]
    return jnp.fft.irfft(s_f * c_f[None, :, :, None], n=size, axis=1)[:, :n]


def banded_causal_multiply(coefficients: jnp.ndarray, signal: jnp.ndarray,
                           band: int) -> jnp.ndarray:
    """The causal y_i = Σ_{j≤i} c_{i−j} s_j exactly, for coefficients constant from offset
    `band` on (a bias clipped at R: band = R): offsets below `band` as block-banded matrix
    products (chunks of `band` tokens against their own and the previous chunk), the rest as
    c_band times a prefix sum. O(n · band · F), and no output reads a later input even in
    rounding (the float32 FFT's rounding spreads every input over the whole row: ~1e-4 in the
    logits of early positions, measured, which a causal LM must not show).

    Args:
      coefficients: `[heads, 2n − 1]` (`relative_coefficients`; offsets ≥ 0 read).
      signal: `[batch, n, heads, F]`.
      band: the first offset from which the coefficients are constant.
    Returns:
      float32 `[batch, n, heads, F]`.
    """
    b, n, h, f = signal.shape
    width = max(1, min(band, n))
    ahead = coefficients.astype(jnp.float32)[:, n - 1:]  # offsets 0 .. n-1
    chunks = -(-n // width)
    s = jnp.pad(signal.astype(jnp.float32), ((0, 0), (0, chunks * width - n), (0, 0), (0, 0)))
    s = s.reshape(b, chunks, width, h, f)
    previous = jnp.concatenate([jnp.zeros_like(s[:, :1]), s[:, :-1]], axis=1)
    pairs = jnp.concatenate([previous, s], axis=2)  # [b, chunks, 2 width, h, F]
    offsets = np.arange(width)[:, None] + width - np.arange(2 * width)[None, :]
    inside = (offsets >= 0) & (offsets < width)
    matrix = jnp.where(inside[None], ahead[:, np.clip(offsets, 0, width - 1)], 0.0)
    out = jnp.einsum("htu,bcuhf->bcthf", matrix, pairs, precision=_HIGHEST)
    out = out.reshape(b, chunks * width, h, f)[:, :n]
    if n > width:
        prefix = jnp.cumsum(signal.astype(jnp.float32), axis=1)
        far = jnp.concatenate([jnp.zeros((b, width, h, f), jnp.float32), prefix[:, :n - width]],
                              axis=1)
        out = out + ahead[:, width][None, None, :, None] * far
    return out


def relative_offsets(n: int) -> jnp.ndarray:
    """int32 offsets i − j = −(n−1)..(n−1), the layout of `relative_coefficients`."""
    return jnp.arange(-(n - 1), n, dtype=jnp.int32)


def relative_log_coefficients(log_bias: jnp.ndarray, n: int, causal: bool) -> jnp.ndarray:
    """b_{clip(i−j, −R, R)} for offsets −(n−1)..(n−1): float32 `[heads, 2n − 1]`, −inf at the
    negative offsets when `causal`; not shifted."""
    reach = (log_bias.shape[-1] - 1) // 2
    offsets = relative_offsets(n)
    logs = log_bias.astype(jnp.float32)[:, jnp.clip(offsets, -reach, reach) + reach]
    if causal:
        logs = jnp.where(offsets < 0, -jnp.inf, logs)
    return logs


def relative_coefficients(log_bias: jnp.ndarray, n: int, causal: bool) -> jnp.ndarray:
    """c_{i−j} = exp(b_{clip(i−j, −R, R)} − max b) per head, float32 `[heads, 2n − 1]`.

    Args:
      log_bias: `[heads, 2R + 1]` (index R is offset 0; offsets beyond ±R share the end values).
      n: the length; the result covers offsets −(n−1)..(n−1), index n − 1 being offset 0.
      causal: zero the offsets i − j < 0 (key after query).
    The max is taken over the offsets used (of the n, and the causal half), so the largest
    coefficient is exactly 1; it cancels in the attention ratio and carries no gradient.
    """
    if log_bias.ndim != 2 or log_bias.shape[-1] % 2 != 1:
        raise ValueError(f"log_bias must be [heads, 2R + 1], got {log_bias.shape}")
    logs = relative_log_coefficients(log_bias, n, causal)
    top = jax.lax.stop_gradient(jnp.max(logs, axis=-1, keepdims=True))
    return jnp.exp(logs - top)


def _refuse_segments(segment_ids: Optional[jnp.ndarray]) -> None:
    if segment_ids is not None:
        raise ValueError("kernelized RPE attention cannot keep packed documents apart (its FFT "
                         "runs over the whole row); pass segment_ids=None (unpacked rows)")


def _ratio(num_den: jnp.ndarray, floor: jnp.ndarray) -> jnp.ndarray:
    """`[..., d_v + 1]` (numerator, denominator last) -> numerator / max(denominator, floor)."""
    return num_den[..., :-1] / jnp.maximum(num_den[..., -1:], floor[..., None])


def _denominator_floor(phi_q: jnp.ndarray, phi_k: jnp.ndarray) -> jnp.ndarray:
    """DENOMINATOR_FLOOR · φ(q_i)·Σ_j φ(k_j) over all keys: `[batch, n, heads]` (see the module
    docstring)."""
    key_sum = jnp.sum(phi_k, axis=1, keepdims=True)
    return DENOMINATOR_FLOOR * jnp.sum(phi_q * key_sum, axis=-1)


def _with_ones(v: jnp.ndarray) -> jnp.ndarray:
    """`[..., d_v]` -> float32 `[..., d_v + 1]` with a trailing 1 (the denominator's channel)."""
    v = v.astype(jnp.float32)
    return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)


def kernelized_rpe_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                             log_bias: jnp.ndarray, projection: jnp.ndarray, *, causal: bool,
                             segment_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Random-feature attention with a relative bias, by FFT: O(n log n · m · d_v).

    Args:
      q, k: `[batch, length, heads, head_dim]`; v: `[batch, length, heads, d_v]`.
      log_bias: `[heads, 2R + 1]` (`relative_coefficients`).
      projection: `[heads, m, head_dim]` (`random_projection`).
      causal: query i sees keys j ≤ i.
      segment_ids: must be None; packed documents raise ValueError (the FFT would mix them).
    Returns:
      float32 `[batch, length, heads, d_v]`: num_i / den_i with the m·(d_v + 1) channels
      φ(k_j) ⊗ (v_j, 1) summed by `toeplitz_multiply`; den clamped as the module doc says.
    """
    _refuse_segments(segment_ids)
    b, n, h, _ = q.shape
    phi_q = positive_random_features(q, projection, "query")
    phi_k = positive_random_features(k, projection, "key")
    m = phi_k.shape[-1]
    channels = (phi_k[..., :, None] * _with_ones(v)[..., None, :]).reshape(b, n, h, -1)
    coefficients = relative_coefficients(log_bias, n, causal)
    if causal:
        summed = banded_causal_multiply(coefficients, channels, (log_bias.shape[-1] - 1) // 2)
    else:
        summed = toeplitz_multiply(coefficients, channels, causal=False)
    num_den = jnp.einsum("bnhm,bnhme->bnhe", phi_q, summed.reshape(b, n, h, m, -1),
                         precision=_HIGHEST)
    return _ratio(num_den, _denominator_floor(phi_q, phi_k))


def dense_bias_matrix(log_bias: jnp.ndarray, n: int, causal: bool) -> jnp.ndarray:
    """The Toeplitz matrix C_ij = c_{i−j} of `relative_coefficients`, float32 `[heads, n, n]`."""
    c = relative_coefficients(log_bias, n, causal)
    index = jnp.arange(n)[:, None] - jnp.arange(n)[None, :] + n - 1
    return c[:, index]


def dense_kernelized_rpe_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                                   log_bias: jnp.ndarray, projection: jnp.ndarray, *,
                                   causal: bool) -> jnp.ndarray:
    """`kernelized_rpe_attention` with the dense `[heads, n, n]` bias matrix (O(n²); the
    reference for the FFT path: same features, stabilisers and denominator floor)."""
    n = q.shape[1]
    phi_q = positive_random_features(q, projection, "query")
    phi_k = positive_random_features(k, projection, "key")
    scores = jnp.einsum("bihm,bjhm->bhij", phi_q, phi_k, precision=_HIGHEST)
    scores = scores * dense_bias_matrix(log_bias, n, causal)[None]
    num_den = jnp.einsum("bhij,bjhe->bihe", scores, _with_ones(v), precision=_HIGHEST)
    return _ratio(num_den, _denominator_floor(phi_q, phi_k))


def softmax_rpe_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                          log_bias: jnp.ndarray, causal: bool) -> jnp.ndarray:
    """Exact softmax attention with logits q_i·k_j/√d + b_{clip(i−j, −R, R)}, float32
    `[batch, length, heads, d_v]` (what the random features approximate)."""
    n, d = q.shape[1], q.shape[-1]
    logits = jnp.einsum("bihd,bjhd->bhij", q.astype(jnp.float32), k.astype(jnp.float32),
                        precision=_HIGHEST) / math.sqrt(d)
    logs = relative_log_coefficients(log_bias, n, causal)
    index = jnp.arange(n)[:, None] - jnp.arange(n)[None, :] + n - 1
    weights = jax.nn.softmax(logits + logs[:, index][None], axis=-1)
    return jnp.einsum("bhij,bjhe->bihe", weights, v.astype(jnp.float32), precision=_HIGHEST)


class DecodeState(NamedTuple):
    """Causal decoding state after token t: the last R keys' features and values (index o holds
    key t − o; zeros before the start), the sum of φ(k) ⊗ (v, 1) over the older keys (offsets ≥ R
    share the coefficient c_R), and Σ_j φ(k_j) over all keys (for the denominator floor). The key
    features are stored relative to `shift`, the largest key log-feature so far."""

    window_features: jnp.ndarray  # [batch, R, heads, m]
    window_values: jnp.ndarray  # [batch, R, heads, d_v]
    far: jnp.ndarray  # [batch, heads, m, d_v + 1]
    key_sum: jnp.ndarray  # [batch, heads, m]
    shift: jnp.ndarray  # [batch, heads]: the running max of the keys' log-features


def decode_state_init(batch: int, heads: int, features: int, value_dim: int,
                      max_distance: int) -> DecodeState:
    """The empty causal decoding state (O(R·(m + d_v) + m·d_v) per head)."""
    if max_distance < 1:
        raise ValueError(f"decoding needs max_distance >= 1, got {max_distance}")
    return DecodeState(
        window_features=jnp.zeros((batch, max_distance, heads, features), jnp.float32),
        window_values=jnp.zeros((batch, max_distance, heads, value_dim), jnp.float32),
        far=jnp.zeros((batch, heads, features, value_dim + 1), jnp.float32),
        key_sum=jnp.zeros((batch, heads, features), jnp.float32),
        shift=jnp.full((batch, heads), -1e30, jnp.float32))


def decode_step(state: DecodeState, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                log_bias: jnp.ndarray,
                projection: jnp.ndarray) -> tuple[jnp.ndarray, DecodeState]:
    """One causal token: `q, k [batch, heads, head_dim]`, `v [batch, heads, d_v]` -> (float32
    `[batch, heads, d_v]`, the next state); equals `kernelized_rpe_attention(causal=True)` token
    by token up to rounding.

    Queries subtract their row max as in the forward pass; keys are shifted by the running max
    of their log-features (the state is rescaled when it grows), where the forward pass uses the
    max over all keys: the same common factor up to rounding. Offsets 0..R−1 use the window,
    offsets ≥ R the shared c_R. The denominator floor sums the keys so far (the forward pass's
    sums all keys), so the two agree wherever the floor does not bind.
    """
    reach = state.window_features.shape[1]
    if log_bias.shape[-1] != 2 * reach + 1:
        raise ValueError(f"log_bias {log_bias.shape} does not fit a state of R = {reach}")
    phi_q = positive_random_features(q[:, None], projection, "query")[:, 0]
    log_k = feature_logits(k[:, None], projection)[:, 0]  # [b, h, m]
    shift = jax.lax.stop_gradient(jnp.maximum(state.shift, jnp.max(log_k, axis=-1)))
    rescale = jnp.exp(state.shift - shift)  # [b, h]: the stored features' new scale
    phi_k = jnp.exp(log_k - shift[..., None]) / math.sqrt(projection.shape[1])
    v = v.astype(jnp.float32)
    window = state.window_features * rescale[:, None, :, None]
    # The oldest window entry moves to offset R, the new key enters at offset 0.
    old = window[:, -1, :, :, None] * _with_ones(state.window_values[:, -1])[:, :, None, :]
    far = state.far * rescale[..., None, None] + old
    window_features = jnp.concatenate([phi_k[:, None], window[:, :-1]], axis=1)
    window_values = jnp.concatenate([v[:, None], state.window_values[:, :-1]], axis=1)
    key_sum = state.key_sum * rescale[..., None] + phi_k
    logs = log_bias.astype(jnp.float32)[:, reach:]  # offsets 0..R, [h, R + 1]
    c = jnp.exp(logs - jax.lax.stop_gradient(jnp.max(logs, axis=-1, keepdims=True)))
    scores = jnp.einsum("bhm,bohm->boh", phi_q, window_features, precision=_HIGHEST)
    scores = scores * c[:, :reach].T[None]
    num_den = (jnp.einsum("boh,bohe->bhe", scores, _with_ones(window_values), precision=_HIGHEST)
               + c[:, reach][None, :, None]
               * jnp.einsum("bhm,bhme->bhe", phi_q, far, precision=_HIGHEST))
    floor = DENOMINATOR_FLOOR * jnp.sum(phi_q * key_sum, axis=-1)
    return _ratio(num_den, floor), DecodeState(window_features, window_values, far, key_sum,
                                               shift)


class KernelizedRPEAttention(nn.Module):
    """Self-attention whose softmax is replaced by positive random features and whose relative
    bias (a learned log-bias per head for offsets −R..R, shared beyond) is applied by FFT
    (`kernelized_rpe_attention`). Projections as `SelfAttention` ("query", "key", "value",
    "out"); the parameters do not depend on the length.

    Attributes:
      num_heads, head_dim: attention shape.
      num_features: m, random features per head.
      max_distance: R; "relative_log_bias" `[heads, 2R + 1]`, zero-initialised.
      causal: query i sees keys j ≤ i.
      redraw: "fixed" (the projection drawn from `PRNGKey(seed)`, a constant, the same at every
        call and length) or "per_step" (redrawn from the "dropout" rng in training, the fixed one
        when `deterministic`).
      seed: the fixed projection's seed.
      dtype: the projections' compute dtype (the attention core is float32).
      use_bias: biases on the four projections.
      deterministic: evaluation mode (for `redraw="per_step"`).
      decode: causal decoding, one token per call (`decode_tokens`).
      position: a rotary scheme (RoPE, xPos) turning q and k before the features, or None.
    """

    num_heads: int
    head_dim: int
    num_features: int = 64
    max_distance: int = 128
    causal: bool = True
    redraw: str = "fixed"
    seed: int = 0
    dtype: Dtype = jnp.float32
    use_bias: bool = False
    deterministic: bool = True
    decode: bool = False
    position: Optional[PositionScheme] = None

    def __post_init__(self):
        if self.redraw not in REDRAW_MODES:
            raise ValueError(f"unknown redraw {self.redraw!r}; use one of {REDRAW_MODES}")
        super().__post_init__()

    def projection(self) -> jnp.ndarray:
        """The random feature directions `[heads, num_features, head_dim]` for this call."""
        if self.redraw == "per_step" and not self.deterministic:
            key = self.make_rng("dropout")
        else:
            key = jax.random.PRNGKey(self.seed)
        return jax.lax.stop_gradient(
            random_projection(key, self.num_heads, self.num_features, self.head_dim))

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: Optional[jnp.ndarray] = None,
                 segment_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        """`x [batch, length, embed]` -> `[batch, length, embed]`. `positions [length]` are read
        only by a rotary `position` scheme (the learned bias is relative); `segment_ids` must be
        None (see `kernelized_rpe_attention`)."""
        _refuse_segments(segment_ids)
        q, k, v = projected_qkv(self, x, positions, num_heads=self.num_heads,
                                head_dim=self.head_dim, dtype=self.dtype,
                                use_bias=self.use_bias, position=self.position)
        log_bias = self.param(
            "relative_log_bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "relpos_buckets")),
            (self.num_heads, 2 * self.max_distance + 1), jnp.float32)
        q = with_activation_axes(q, ACTIVATION_HEADS)
        projection = self.projection()
        if self.decode:
            out = self.decode_tokens(q, k, v, log_bias, projection)
        else:
            out = kernelized_rpe_attention(q, k, v, log_bias, projection, causal=self.causal)
        return dense(x.shape[-1], ("heads", "kv", "embed"), dtype=self.dtype, contract=(-2, -1),
                     use_bias=self.use_bias, name="out")(out.astype(self.dtype))

    def decode_tokens(self, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                      log_bias: jnp.ndarray, projection: jnp.ndarray) -> jnp.ndarray:
        """Causal decoding, one token per call, from a `DecodeState` in the "cache" collection
        (the last R keys and one running sum: O(R) per token)."""
        if not self.causal:
            raise ValueError("a bidirectional KernelizedRPEAttention does not decode")
        d = q.shape[-1]

        def step(token, state):
            q_t, k_t, v_t = jnp.split(token, [d, 2 * d], axis=-1)
            return decode_step(state, q_t, k_t, v_t, log_bias, projection)

        return cached_recurrence(
            self, jnp.concatenate([q, k, v], axis=-1).astype(jnp.float32), name="kernel_state",
            forward=lambda qkv: kernelized_rpe_attention(*jnp.split(qkv, [d, 2 * d], axis=-1),
                                                         log_bias, projection, causal=True),
            initial_state=lambda batch: decode_state_init(batch, self.num_heads,
                                                          self.num_features, d,
                                                          self.max_distance),
            step=step)


class KernelizedRPELayer(DecoderLayer, kw_only=True):
    """A Transformer block whose attention is `KernelizedRPEAttention` (causal or not by the
    block's mask); the rest as `DecoderLayer`."""

    num_features: int = 64
    max_distance: int = 128
    redraw: str = "fixed"

    def attention(self, h: jnp.ndarray, positions: jnp.ndarray,
                  segment_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        return KernelizedRPEAttention(
            num_heads=self.num_heads, head_dim=self.head_dim, num_features=self.num_features,
            max_distance=self.max_distance, causal=self.mask.causal, redraw=self.redraw,
            dtype=self.dtype, use_bias=self.use_bias, deterministic=self.deterministic,
            decode=self.decode, position=self.position, name="attention")(h, positions,
                                                                        segment_ids)
