"""YOSO, "You Only Sample (Almost) Once" (Zeng et al., ICML 2021): attention by LSH sampling.

With q and k L2-normalised per head, softmax's weights are replaced by Bernoulli variables whose
mean is the collision probability of a tau-bit SimHash code (a random hyperplane puts two unit
vectors at angle theta on the same side with probability 1 - theta / pi; tau independent
hyperplanes all agree with that probability to the power tau):

    B(q_i, k_j) ~ Bernoulli(p_ij),    p_ij = (1 - arccos(q_i . k_j) / pi) ** tau

There is no softmax denominator:

    YOSO-E(Q, K, V)_i = sum_j p_ij v_j                                      (exact, quadratic)
    YOSO(Q, K, V)_i   = (1/m) sum_{hash} sum_j 1[h(q_i) = h(k_j)] v_j         (sampled)

The sampled form is an unbiased estimate of YOSO-E (`yoso_expectation`): per hash, every key's
value is added (`jax.ops.segment_sum`) to the bucket of its code and every query reads its own
code's bucket (`yoso_sampled`), O(n m d) time, no [n, n] matrix. `YosoAttention` L2-normalises
the result per head, as the reference does, so only directions of q and k matter (tau acts as
a temperature).

Backward: the exact derivative of p_ij carries arccos' 1 / sqrt(1 - x^2), singular at
|q . k| = 1. The paper uses a surrogate instead; for the loss gradient g_i = dL/dout_i,

    dL/dq_i ~ sum_j (tau/2) (g_i . v_j) B(q_i, k_j) k_j
    dL/dk_j ~ sum_i (tau/2) (g_i . v_j) B(q_i, k_j) q_i
    dL/dv_j = sum_i B(q_i, k_j) g_i            (unbiased for the exact YOSO-E gradient)

estimated with the forward's own collisions: per hash, buckets of g_i (for dv), of the outer
products v_j (x) k_j and g_i (x) q_i (`[d_v, d]` each, for dq and dk), read at the other side's
codes. These are gradients with respect to the *normalised* q and k: the normalisation is applied
outside the `jax.custom_vjp`, so JAX applies its Jacobian, g -> (g - q^ (q^ . g)) / |q|, on the
way back (as torch autograd does around the reference's CUDA function).
`yoso_expectation_surrogate_grads` computes the same surrogate with p_ij in place of B (the
backward's expectation; quadratic, a test reference).

Segment ids (packed documents; 0 = padding) keep documents apart exactly: a token's bucket is
its (segment, code) pair, renumbered densely per row, head and hash (a sort along the length), so
the tables hold at most n buckets whatever the number of documents. Padding keys are in no
query's bucket; padding queries read nothing (output 0). Without segment ids the buckets are the
2^tau codes themselves.

The random hyperplanes `[num_hashes, hash_bits, head_dim]` are shared by all batch rows and
heads (each head's estimate is unbiased on its own; heads differ through their q and k).

Only the bidirectional form exists (the paper defines no causal variant): use it in encoders.
Not implemented: the reference's optional depthwise convolution of V added to the output, and
v2's fast Hadamard hashing.

Memory: forward O(b h m (S + n) d) with S = 2^tau buckets (n + 1 with segment ids); the backward
loops over hashes (`lax.scan`), each step O(b h (S + n) d_v d) for the outer-product tables.
"""
from __future__ import annotations

import functools
import math
import zlib
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lexjax.layers.basic import (ACTIVATION_HEADS, Dtype, dense, projected_qkv,
                                 with_activation_axes)
from lexjax.layers.decoder import DecoderLayer
from lexjax.positions import PositionScheme

MAX_HASH_BITS = 24  # codes, and segment * 2^tau + code, are int32


def check_hashing(hash_bits: int, num_hashes: int) -> None:
    """A clear error for hash settings outside 1 <= hash_bits <= MAX_HASH_BITS, num_hashes >= 1."""
    if not 1 <= hash_bits <= MAX_HASH_BITS:
        raise ValueError(f"YOSO hash_bits must be in [1, {MAX_HASH_BITS}], got {hash_bits!r}")
    if not num_hashes >= 1:
        raise ValueError(f"YOSO num_hashes must be >= 1, got {num_hashes!r}")


def l2_normalize(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
    """`x [..., d]` / its L2 norm over the last axis, in float32 (zero vectors stay zero; the
    gradient is finite there)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def collision_probability(cosine: jnp.ndarray, hash_bits: int) -> jnp.ndarray:
    """P[tau-bit SimHash codes of two unit vectors agree] = (1 - arccos(cos) / pi) ** tau, the
    cosine clipped to [-1, 1] (any shape)."""
    angle = jnp.arccos(jnp.clip(cosine, -1.0, 1.0))
    return (1.0 - angle / math.pi) ** hash_bits


def _key_mask(key_mask: Optional[jnp.ndarray], b: int, nq: int, nk: int) -> Optional[jnp.ndarray]:
    """bool `[b, nq, nk]` or broadcastable -> bool `[b, 1, nq, nk]` (over heads), or None."""
    if key_mask is None:
        return None
    return jnp.broadcast_to(jnp.asarray(key_mask, bool), (b, nq, nk))[:, None]


def expectation_weights(q: jnp.ndarray, k: jnp.ndarray, hash_bits: int, *,
                        key_mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Collision probabilities p_ij of the normalised `q [b, n_q, h, d]` and `k [b, n_k, h, d]`
    -> float32 `[b, h, n_q, n_k]`, 0 where `key_mask` (bool `[b, n_q, n_k]` or broadcastable) is
    False."""
    cosine = jnp.einsum("bqhd,bkhd->bhqk", l2_normalize(q), l2_normalize(k))
    weights = collision_probability(cosine, hash_bits)
    mask = _key_mask(key_mask, q.shape[0], q.shape[1], k.shape[1])
    return weights if mask is None else jnp.where(mask, weights, 0.0)


def yoso_expectation(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, hash_bits: int, *,
                     key_mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """YOSO-E: `sum_j p_ij v_j` (no denominator), float32 `[b, n_q, h, d_v]`.

    Args:
      q: `[batch, q_length, heads, head_dim]`; k: `[batch, k_length, heads, head_dim]` (both
        L2-normalised here); v: `[batch, k_length, heads, d_v]`.
      hash_bits: tau, the exponent of the collision probability.
      key_mask: bool `[batch, q_length, k_length]` or broadcastable; False: weight 0.
    Plain autodiff of this function is the exact gradient (singular where |q^ . k^| = 1); the
    paper's surrogate is `yoso_expectation_surrogate_grads`.
    """
    weights = expectation_weights(q, k, hash_bits, key_mask=key_mask)
    return jnp.einsum("bhqk,bkhe->bqhe", weights, v.astype(jnp.float32))


def yoso_expectation_surrogate_grads(
        q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, g: jnp.ndarray, hash_bits: int, *,
        key_mask: Optional[jnp.ndarray] = None) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """The paper's surrogate gradient of YOSO-E with p_ij for B(q_i, k_j): the expectation of
    `yoso_sampled`'s backward.

    With A_ij = (tau/2) (g_i . v_j) p_ij: dq^_i = sum_j A_ij k^_j, dk^_j = sum_i A_ij q^_i,
    dv_j = sum_i p_ij g_i; dq^, dk^ (for the normalised q^, k^) are then taken through the
    normalisation's Jacobian.

    Args:
      q, k, v, hash_bits, key_mask: as `yoso_expectation`.
      g: the loss gradient of the output, `[batch, q_length, heads, d_v]`.
    Returns:
      float32 `(dL/dq [b, n_q, h, d], dL/dk [b, n_k, h, d], dL/dv [b, n_k, h, d_v])`.
    """
    qn, q_norm_vjp = jax.vjp(l2_normalize, q)
    kn, k_norm_vjp = jax.vjp(l2_normalize, k)
    v, g = v.astype(jnp.float32), g.astype(jnp.float32)
    weights = expectation_weights(qn, kn, hash_bits, key_mask=key_mask)
    scaled = 0.5 * hash_bits * jnp.einsum("bqhe,bkhe->bhqk", g, v) * weights
    dqn = jnp.einsum("bhqk,bkhd->bqhd", scaled, kn)
    dkn = jnp.einsum("bhqk,bqhd->bkhd", scaled, qn)
    dv = jnp.einsum("bhqk,bqhe->bkhe", weights, g)
    return q_norm_vjp(dqn)[0], k_norm_vjp(dkn)[0], dv


def random_hyperplanes(key: jax.Array, num_hashes: int, hash_bits: int,
                       head_dim: int) -> jnp.ndarray:
    """Gaussian hyperplane normals, float32 `[num_hashes, hash_bits, head_dim]`."""
    return jax.random.normal(key, (num_hashes, hash_bits, head_dim), jnp.float32)


def simhash_codes(x: jnp.ndarray, planes: jnp.ndarray) -> jnp.ndarray:
    """tau-bit SimHash codes: bit t of hash h is [x . planes[h, t] > 0]. `x [..., d]`, `planes
    [m, tau, d]` -> int32 `[..., m]` in [0, 2^tau)."""
    bits = jnp.einsum("...d,mtd->...mt", x.astype(jnp.float32), planes) > 0
    weights = jnp.left_shift(1, jnp.arange(planes.shape[1], dtype=jnp.int32))
    return jnp.sum(bits.astype(jnp.int32) * weights, axis=-1)


def bucket_slots(q_codes: jnp.ndarray, k_codes: jnp.ndarray, hash_bits: int,
                 segment_ids: Optional[jnp.ndarray] = None
                 ) -> tuple[jnp.ndarray, jnp.ndarray, int]:
    """Each query's and key's bucket (table row) per hash.

    Args:
      q_codes: int32 `[b, n_q, h, m]`; k_codes: int32 `[b, n_k, h, m]` (`simhash_codes`).
      segment_ids: optional int32 `[b, n]` (n_q = n_k = n; 0 = padding).
    Returns:
      `(q_slot [b, n_q, h, m], k_slot [b, n_k, h, m], num_slots)`. Without segment ids the slots
      are the codes (2^tau of them). With them, the (segment, code) pairs are renumbered densely
      per row, head and hash: key j's slot is the first index of its pair among the sorted keys'
      pairs; a query whose pair no key has, or a padding query, gets slot n, where no key is;
      padding keys share a pair no query has.
    """
    if segment_ids is None:
        return q_codes, k_codes, 2 ** hash_bits
    if q_codes.shape[1] != k_codes.shape[1]:
        raise ValueError("segment ids need as many queries as keys")
    n = k_codes.shape[1]
    seg = jnp.asarray(segment_ids, jnp.int32)[:, :, None, None]
    key_ids = jnp.where(seg > 0, seg * 2 ** hash_bits + k_codes, -1)
    query_ids = jnp.where(seg > 0, seg * 2 ** hash_bits + q_codes, -2)

    def rows(x):  # [b, n, h, m] -> [b h m, n]
        return jnp.moveaxis(x, 1, -1).reshape(-1, n)

    def unrows(x):  # [b h m, n] -> [b, n, h, m]
        return jnp.moveaxis(x.reshape(k_codes.shape[:1] + k_codes.shape[2:] + (n,)), -1, 1)

    sorted_keys = jnp.sort(rows(key_ids), axis=-1)
    first = jax.vmap(functools.partial(jnp.searchsorted, side="left"))
    k_slot = first(sorted_keys, rows(key_ids))
    q_first = first(sorted_keys, rows(query_ids))
    hit = jnp.take_along_axis(sorted_keys, jnp.minimum(q_first, n - 1), axis=-1) == rows(query_ids)
    q_slot = jnp.where(hit, q_first, n)
    return unrows(q_slot).astype(jnp.int32), unrows(k_slot).astype(jnp.int32), n + 1


def bucket_sums(values: jnp.ndarray, slots: jnp.ndarray, num_slots: int,
                read_slots: jnp.ndarray) -> jnp.ndarray:
    """Sums of `values [b, n, h, m, *e]` over the tokens sharing a slot (`slots` int32
    `[b, n, h, m]`, per row, head and hash), read at `read_slots [b, n', h, m]` ->
    `[b, n', h, m, *e]`. A table of `b h m num_slots` rows (`jax.ops.segment_sum`)."""
    b, _, h, m = slots.shape
    base = (((jnp.arange(b)[:, None, None, None] * h + jnp.arange(h)[None, None, :, None]) * m
             + jnp.arange(m)) * num_slots)                                     # [b, 1, h, m]
    trailing = values.shape[4:]
    table = jax.ops.segment_sum(values.reshape((-1,) + trailing), (base + slots).reshape(-1),
                                num_segments=b * h * m * num_slots)
    return table[(base + read_slots).reshape(-1)].reshape(read_slots.shape + trailing)


def _lsh_forward(v: jnp.ndarray, q_slot: jnp.ndarray, k_slot: jnp.ndarray,
                 num_slots: int) -> jnp.ndarray:
    """(1/m) sum_hash sum_j 1[slot(q_i) = slot(k_j)] v_j, float32 `[b, n_q, h, d_v]`."""
    per_hash = jnp.broadcast_to(v[:, :, :, None], v.shape[:3] + k_slot.shape[3:] + v.shape[3:])
    return jnp.mean(bucket_sums(per_hash, k_slot, num_slots, q_slot), axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _lsh_cumulation(qn: jnp.ndarray, kn: jnp.ndarray, v: jnp.ndarray, q_slot: jnp.ndarray,
                    k_slot: jnp.ndarray, num_slots: int, hash_bits: int) -> jnp.ndarray:
    """The sampled YOSO of normalised `qn`, `kn` (float32) with the surrogate backward."""
    del qn, kn, hash_bits
    return _lsh_forward(v, q_slot, k_slot, num_slots)


def _lsh_cumulation_fwd(qn, kn, v, q_slot, k_slot, num_slots, hash_bits):
    return _lsh_forward(v, q_slot, k_slot, num_slots), (qn, kn, v, q_slot, k_slot)


def _lsh_cumulation_bwd(num_slots, hash_bits, residuals, g):
    """The surrogate gradients with respect to qn, kn, v, estimated hash by hash (`lax.scan`)
    with the forward's slots."""
    qn, kn, v, q_slot, k_slot = residuals
    g = g.astype(jnp.float32)
    value_keys = v[..., :, None] * kn[..., None, :]             # v_j (x) k_j [b, n_k, h, d_v, d]
    grad_queries = g[..., :, None] * qn[..., None, :]           # g_i (x) q_i [b, n_q, h, d_v, d]

    def one_hash(carry, slots):
        qs, ks = slots[0][..., None], slots[1][..., None]       # [b, n, h, 1]
        dq, dk, dv = carry
        dv = dv + bucket_sums(g[:, :, :, None], qs, num_slots, ks)[:, :, :, 0]
        at_queries = bucket_sums(value_keys[:, :, :, None], ks, num_slots, qs)[:, :, :, 0]
        dq = dq + jnp.einsum("bnhe,bnhed->bnhd", g, at_queries)
        at_keys = bucket_sums(grad_queries[:, :, :, None], qs, num_slots, ks)[:, :, :, 0]
        dk = dk + jnp.einsum("bnhe,bnhed->bnhd", v, at_keys)
        return (dq, dk, dv), None

    zeros = (jnp.zeros_like(qn), jnp.zeros_like(kn), jnp.zeros_like(v))
    (dq, dk, dv), _ = jax.lax.scan(one_hash, zeros,
                                   (jnp.moveaxis(q_slot, 3, 0), jnp.moveaxis(k_slot, 3, 0)))
    num_hashes = q_slot.shape[3]
    scale = 0.5 * hash_bits / num_hashes
    return dq * scale, dk * scale, dv / num_hashes, None, None


_lsh_cumulation.defvjp(_lsh_cumulation_fwd, _lsh_cumulation_bwd)


def yoso_sampled(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, hash_bits: int,
                 num_hashes: int, key: jax.Array, *,
                 segment_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """YOSO's LSH estimate `(1/m) sum_hash sum_j 1[h(q_i) = h(k_j)] v_j`, float32
    `[b, n_q, h, d_v]`, with the paper's surrogate gradient.

    Args:
      q: `[batch, q_length, heads, head_dim]`; k: `[batch, k_length, heads, head_dim]` (both
        L2-normalised here; JAX differentiates the normalisation); v: `[batch, k_length, heads,
        d_v]`.
      hash_bits: tau, bits per code (2^tau buckets); num_hashes: m, independent codes averaged.
      key: draws the hyperplanes `[num_hashes, hash_bits, head_dim]`, shared by batch and heads.
      segment_ids: optional int32 `[batch, length]` (q_length = k_length): a query gathers only
        keys of its own segment; 0 = padding (its keys count for nothing, its queries give 0).
        Segment ids must be below 2^(31 - hash_bits).
    """
    check_hashing(hash_bits, num_hashes)
    qn, kn = l2_normalize(q), l2_normalize(k)
    planes = random_hyperplanes(key, num_hashes, hash_bits, q.shape[-1])
    q_codes = simhash_codes(jax.lax.stop_gradient(qn), planes)
    k_codes = simhash_codes(jax.lax.stop_gradient(kn), planes)
    q_slot, k_slot, num_slots = bucket_slots(q_codes, k_codes, hash_bits, segment_ids)
    return _lsh_cumulation(qn, kn, v.astype(jnp.float32), q_slot, k_slot, num_slots, hash_bits)


class YosoAttention(nn.Module):
    """Bidirectional YOSO self-attention: `x [batch, length, embed]` -> `[batch, length, embed]`.

    q, k, v projections as `SelfAttention`'s ("query", "key", "value": `[embed, heads, kv]`),
    `yoso_sampled` of them, L2-normalised per head, then "out" (`[heads, kv, embed]`).

    Attributes:
      hash_bits: tau (the reference: 8 to 12); num_hashes: m (the reference: 32).
      deterministic: fixed hyperplanes, from `PRNGKey(eval_seed)` folded with a CRC of the
        module's path (evaluation repeats exactly); else fresh ones every call from the
        "dropout" rng.
      causal: must be False: YOSO has no causal form.
      position: a rotary scheme (RoPE, xPos) applied to q and k before hashing, or None.
    """

    num_heads: int
    head_dim: int
    hash_bits: int = 8
    num_hashes: int = 32
    dtype: Dtype = jnp.float32
    use_bias: bool = False
    causal: bool = False
    deterministic: bool = True
    eval_seed: int = 0
    position: Optional[PositionScheme] = None

    def __post_init__(self):
        if self.causal:
            raise ValueError("YosoAttention is bidirectional only: YOSO defines no causal form "
                             "(the paper has no causal variant); use it in encoders")
        check_hashing(self.hash_bits, self.num_hashes)
        super().__post_init__()

    def hash_key(self) -> jax.Array:
        """The key of this call's hyperplanes (see `deterministic`)."""
        if not self.deterministic:
            return self.make_rng("dropout")
        path = "/".join(str(part) for part in self.path)
        return jax.random.fold_in(jax.random.PRNGKey(self.eval_seed),
                                  zlib.crc32(path.encode()) & 0x7FFFFFFF)

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: Optional[jnp.ndarray] = None,
                 segment_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        """`x [batch, length, embed]`, `positions [length]` (read by a rotary `position`
        scheme: the hashes then see rotated q and k, whose angle depends on their distance),
        optional int32 `segment_ids [batch, length]` (0 = padding) -> `[batch, length,
        embed]`."""
        q, k, v = projected_qkv(self, x, positions, num_heads=self.num_heads,
                                head_dim=self.head_dim, dtype=self.dtype,
                                use_bias=self.use_bias, position=self.position)
        q = with_activation_axes(q, ACTIVATION_HEADS)
        out = yoso_sampled(q, k, v, self.hash_bits, self.num_hashes, self.hash_key(),
                           segment_ids=segment_ids)
        out = l2_normalize(out).astype(self.dtype)
        return dense(x.shape[-1], ("heads", "kv", "embed"), dtype=self.dtype, contract=(-2, -1),
                     use_bias=self.use_bias, name="out")(out)


class YosoLayer(DecoderLayer, kw_only=True):
    """A Transformer block whose attention is `YosoAttention` (bidirectional; `hash_bits`,
    `num_hashes`); the rest as `DecoderLayer` (norms, MLP, residual dropout)."""

    hash_bits: int = 8
    num_hashes: int = 32

    def attention(self, h: jnp.ndarray, positions: jnp.ndarray,
                  segment_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        return YosoAttention(num_heads=self.num_heads, head_dim=self.head_dim,
                             hash_bits=self.hash_bits, num_hashes=self.num_hashes,
                             dtype=self.dtype, use_bias=self.use_bias,
                             deterministic=self.deterministic, position=self.position,
                             name="attention")(h, positions, segment_ids)
