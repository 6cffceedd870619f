"""Position schemes against independent float64 numpy references written from the papers
(RoPE, xPos, ALiBi, Sandwich, KERPLE, T5), hand-worked values, invariances and numerical safety."""
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lexjax
from lexjax import positions as P

MODEL_GIN = "configs/models/transformer.gin"
TINY_BINDINGS = ["NUM_LAYERS=2", "EMBED_DIM=32", "NUM_HEADS=4", "MLP_DIM=64", "VOCAB_SIZE=64"]


# ----------------------------------------------------------------------------------------------
# Independent references (float64 numpy, written from the papers' formulas)
# ----------------------------------------------------------------------------------------------

def ref_alibi_slopes(n):
    """Press et al.: 2^a heads -> geometric sequence with start = ratio = 2^(-8/n); otherwise
    p = 2^floor(log2 n) and slopes(p) + slopes(2p)[0::2][:n - p]."""
    def power_of_two(m):
        return [2.0 ** (-8.0 * (i + 1) / m) for i in range(m)]
    p = 1
    while 2 * p <= n:
        p *= 2
    if p == n:
        return np.array(power_of_two(n))
    return np.array(power_of_two(p) + power_of_two(2 * p)[0::2][:n - p])


def ref_sinusoidal(pos, d, base=10000.0):
    """PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(p / base^(2i/d))."""
    pe = np.zeros((len(pos), d))
    for i in range(d // 2):
        pe[:, 2 * i] = np.sin(pos / base ** (2 * i / d))
        pe[:, 2 * i + 1] = np.cos(pos / base ** (2 * i / d))
    return pe


def ref_rope(x, pos, base=10000.0):
    """Interleaved pairs as complex numbers: (x[2i] + i x[2i+1]) * exp(i p theta_i),
    theta_i = base^(-2i/d). `x [..., length, heads, d]`, `pos [..., length]`."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    theta = base ** (-2.0 * np.arange(d // 2) / d)
    z = x[..., 0::2] + 1j * x[..., 1::2]
    z = z * np.exp(1j * np.asarray(pos, np.float64)[..., None, None] * theta)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def ref_xpos_zeta(d, gamma=0.4):
    """zeta_i = (i / (d/2) + gamma) / (1 + gamma), i = 0 .. d/2 - 1 (LeX eq. 9)."""
    return np.array([(i / (d / 2) + gamma) / (1 + gamma) for i in range(d // 2)])


def ref_xpos_scores(q, k, q_pos, k_pos, base=10000.0, scale_base=512.0):
    """sum_i Re[q_i conj(k_i) e^{i (n - m) theta_i}] * zeta_i^((n - m)/B) for every (n, m);
    `q [n, d]`, `k [m, d]` (one head) -> `[n, m]`."""
    d = q.shape[-1]
    theta = base ** (-2.0 * np.arange(d // 2) / d)
    zeta = ref_xpos_zeta(d)
    qc = q[:, 0::2] + 1j * q[:, 1::2]
    kc = k[:, 0::2] + 1j * k[:, 1::2]
    dist = (np.asarray(q_pos, np.float64)[:, None] - np.asarray(k_pos, np.float64)[None, :])
    terms = (qc[:, None, :] * np.conj(kc)[None, :, :] * np.exp(1j * dist[..., None] * theta)).real
    return np.sum(terms * zeta ** (dist[..., None] / scale_base), axis=-1)


def ref_sandwich(rel, num_heads, dprime, base=10000.0, compression=8.0):
    """(sum_{i=1}^{d'/2} cos(rel / base^(2i/d')) - d'/2) / (8h/H), h = 1..H -> [H, *rel.shape]."""
    rel = np.asarray(rel, np.float64)
    inner = sum(np.cos(rel / base ** (2.0 * i / dprime)) for i in range(1, dprime // 2 + 1))
    inner = inner - dprime / 2
    return np.stack([inner / (compression * h / num_heads) for h in range(1, num_heads + 1)])


def ref_softplus(x):
    return np.logaddexp(0.0, np.asarray(x, np.float64))


def ref_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def ref_mtf_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """A port of Mesh TensorFlow's `_relative_position_bucket` (relative_position = k - q)."""
    ret = np.zeros_like(relative_position)
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).astype(relative_position.dtype) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # log(0) would only occur where is_small (whose value np.where keeps); avoid the warning.
    n_large = np.maximum(n, 1).astype(np.float64)
    val_if_large = max_exact + (np.log(n_large / max_exact) / math.log(max_distance / max_exact)
                                * (num_buckets - max_exact)).astype(relative_position.dtype)
    val_if_large = np.minimum(val_if_large, num_buckets - 1)
    return ret + np.where(is_small, n, val_if_large)


def rotate(scheme, q, k, q_pos, k_pos):
    """`scheme.rotate` under jit (one compile instead of many eager ops), float32 inputs."""
    return jax.jit(scheme.rotate)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(q_pos, jnp.int32),
                                  jnp.asarray(k_pos, jnp.int32))


def unboxed_params(variables):
    return jax.tree_util.tree_map(np.asarray, nn.unbox(variables)["params"])


# ----------------------------------------------------------------------------------------------
# ALiBi
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads", [1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 48])
def test_alibi_slopes_match_paper_recipe(heads):
    got = np.asarray(P.alibi_slopes(heads), np.float64)
    chex.assert_shape(got, (heads,))
    np.testing.assert_allclose(got, ref_alibi_slopes(heads), rtol=1e-12)


def test_alibi_slopes_hand_values():
    np.testing.assert_allclose(P.alibi_slopes(8), [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64,
                                                   1 / 128, 1 / 256], rtol=1e-12)
    twelve = P.alibi_slopes(12)
    np.testing.assert_allclose(twelve[:8], 2.0 ** -np.arange(1, 9), rtol=1e-12)
    np.testing.assert_allclose(twelve[8:], [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5],
                               rtol=1e-12)
    np.testing.assert_allclose(P.alibi_slopes(16), 2.0 ** -(0.5 * np.arange(1, 17)), rtol=1e-12)
    np.testing.assert_allclose(P.alibi_slopes(6), [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8],
                               rtol=1e-12)
    np.testing.assert_allclose(P.alibi_slopes(20)[16:],
                               [2 ** -0.25, 2 ** -0.75, 2 ** -1.25, 2 ** -1.75], rtol=1e-12)


def test_alibi_slopes_rejects_non_positive_heads():
    with pytest.raises(ValueError):
        P.alibi_slopes(0)


@pytest.mark.parametrize("heads", [4, 12])
def test_alibi_bias_is_minus_slope_times_distance(heads, rng):
    rel = rng.integers(-300, 300, size=(5, 7)).astype(np.int32)
    rel[0, 0] = 0
    got = np.asarray(P.ALiBi().relative_bias(heads, 16)(jnp.asarray(rel)))
    want = -ref_alibi_slopes(heads)[:, None, None] * np.abs(rel)[None].astype(np.float64)
    chex.assert_shape(got, (heads, 5, 7))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.all(got[:, 0, 0] == 0)


def test_alibi_under_causal_mask_equals_reference_code_formulation(rng):
    """The reference code adds slope * k (identical rows); under a causal mask the softmax is the
    same as with -slope * |q - k|."""
    n, heads = 12, 4
    logits = rng.standard_normal((heads, n, n))
    causal = np.tril(np.ones((n, n), bool))
    slopes = ref_alibi_slopes(heads)[:, None, None]
    rel = np.arange(n)[:, None] - np.arange(n)[None, :]
    ours = np.asarray(P.ALiBi().relative_bias(heads, 8)(jnp.asarray(rel, jnp.int32)), np.float64)

    def softmax(x):
        x = np.where(causal, x, -np.inf)
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    paper = softmax(logits + slopes * np.arange(n)[None, None, :])
    np.testing.assert_allclose(softmax(logits + ours), paper, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Absolute schemes: NoPE, sinusoidal, learned
# ----------------------------------------------------------------------------------------------

def test_nope_has_no_hooks(rng):
    scheme = P.NoPE()
    q = jnp.asarray(rng.standard_normal((1, 4, 2, 8)), jnp.float32)
    pos = jnp.arange(4)
    assert scheme.embed(pos, 8) is None
    assert scheme.relative_bias(2, 8) is None
    q2, k2 = scheme.rotate(q, q, pos, pos)
    assert q2 is q and k2 is q


@pytest.mark.parametrize("d", [2, 8, 64])
def test_sinusoidal_matches_original_formula(d):
    pos = np.arange(0, 1024, 7)
    got = np.asarray(P.sinusoidal_table(jnp.asarray(pos, jnp.int32), d), np.float64)
    chex.assert_shape(got, (len(pos), d))
    np.testing.assert_allclose(got, ref_sinusoidal(pos, d), atol=2e-4)
    # The module hook gives the same table, also for [batch, length] positions.
    batched = np.stack([pos, pos + 3])
    emb = np.asarray(P.Sinusoidal().embed(jnp.asarray(batched, jnp.int32), d), np.float64)
    chex.assert_shape(emb, (2, len(pos), d))
    np.testing.assert_allclose(emb[1], ref_sinusoidal(pos + 3, d), atol=2e-4)


def test_sinusoidal_hand_values():
    got = np.asarray(P.sinusoidal_table(jnp.asarray([0, 1], jnp.int32), 4))
    # d = 4: frequencies 1 and 1/100.
    np.testing.assert_allclose(got[0], [0, 1, 0, 1], atol=1e-7)
    np.testing.assert_allclose(got[1], [math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)],
                               atol=1e-7)
    with pytest.raises(ValueError):
        P.sinusoidal_table(jnp.arange(3), 5)


def test_learned_table_shape_and_lookup():
    scheme = P.Learned(max_length=16)
    pos = jnp.arange(10, dtype=jnp.int32)
    variables = scheme.init(jax.random.PRNGKey(0), pos, 8, method=P.Learned.embed)
    table = unboxed_params(variables)["embedding"]
    chex.assert_shape(table, (16, 8))
    out = scheme.apply(variables, pos, 8, method=P.Learned.embed)
    chex.assert_shape(out, (10, 8))
    np.testing.assert_array_equal(np.asarray(out), table[:10])
    box = variables["params"]["embedding"]
    assert isinstance(box, nn.Partitioned) and box.names == ("abs_positions", "embed")


def test_learned_too_long_raises_clear_error():
    scheme = P.Learned(max_length=16)
    variables = scheme.init(jax.random.PRNGKey(0), jnp.arange(16), 8, method=P.Learned.embed)
    with pytest.raises(ValueError, match=r"16 positions.*17"):
        scheme.apply(variables, jnp.arange(17), 8, method=P.Learned.embed)


def test_learned_too_long_raises_through_the_model():
    model = lexjax.build_model([MODEL_GIN, "configs/positions/learned.gin"],
                               TINY_BINDINGS + ["MAX_POSITIONS=16"])
    tokens = jnp.zeros((1, 16), jnp.int32)
    # Tracing is enough (the error is raised while tracing): no compilation needed.
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
    chex.assert_shape(jax.eval_shape(model.apply, variables, tokens), (1, 16, 64))
    with pytest.raises(ValueError, match=r"16 positions.*20"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 20), jnp.int32))


# ----------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------

def _scores(q, k):
    """`q [1, n, h, d]`, `k [1, m, h, d]` -> float64 `[h, n, m]`."""
    return np.einsum("nhd,mhd->hnm", np.asarray(q, np.float64)[0], np.asarray(k, np.float64)[0])


@pytest.mark.parametrize("scheme", [P.RoPE(), P.XPos()], ids=["rope", "xpos"])
def test_rotary_scores_depend_only_on_distance(scheme, rng):
    """The same q and k vectors placed at every position: score(n, m) == score(n + s, m + s)."""
    n, heads, d = 96, 3, 16
    q0 = rng.standard_normal((heads, d))
    k0 = rng.standard_normal((heads, d))
    q = jnp.asarray(np.broadcast_to(q0, (1, n, heads, d)), jnp.float32)
    k = jnp.asarray(np.broadcast_to(k0, (1, n, heads, d)), jnp.float32)
    pos = jnp.arange(n, dtype=jnp.int32) + 5
    qr, kr = rotate(scheme, q, k, pos, pos)
    s = _scores(qr, kr)
    for shift in (1, 7, 40):
        np.testing.assert_allclose(s[:, shift:, shift:], s[:, :-shift, :-shift], atol=2e-4,
                                   rtol=1e-4)
    # ... but do change with the distance.
    assert np.max(np.abs(s[:, 10, 10] - s[:, 10, 3])) > 1e-2


def test_rope_preserves_norms(rng):
    x = jnp.asarray(rng.standard_normal((2, 50, 3, 32)), jnp.float32)
    pos = jnp.arange(50, dtype=jnp.int32) * 37
    qr, kr = rotate(P.RoPE(), x, x, pos, pos)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(qr), axis=-1),
                               np.linalg.norm(np.asarray(x), axis=-1), rtol=1e-5)
    # Pairwise: each interleaved pair keeps its own norm.
    pair_norm = lambda a: np.hypot(np.asarray(a)[..., 0::2], np.asarray(a)[..., 1::2])
    np.testing.assert_allclose(pair_norm(kr), pair_norm(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d", [2, 8, 64])
def test_rope_matches_interleaved_pair_rotation(d, rng):
    q = rng.standard_normal((2, 40, 3, d)).astype(np.float32)
    k = rng.standard_normal((2, 24, 3, d)).astype(np.float32)
    q_pos = np.arange(40) * 3 + 11
    k_pos = np.arange(24)
    qr, kr = rotate(P.RoPE(), q, k, q_pos, k_pos)
    chex.assert_shape([qr, kr], [q.shape, k.shape])
    np.testing.assert_allclose(np.asarray(qr), ref_rope(q, q_pos), atol=1e-4)
    np.testing.assert_allclose(np.asarray(kr), ref_rope(k, k_pos), atol=2e-5)


def test_rope_per_batch_positions(rng):
    q = rng.standard_normal((2, 10, 2, 8)).astype(np.float32)
    pos = np.stack([np.arange(10), np.arange(10) + 100])
    qr, _ = rotate(P.RoPE(), q, q, pos, pos)
    np.testing.assert_allclose(np.asarray(qr), ref_rope(q, pos), atol=2e-5)


def test_rope_hand_values():
    # d = 4, position 1: pair 0 rotates by 1 rad, pair 1 by 10000^(-1/2) = 0.01 rad.
    x = jnp.asarray([[[[1.0, 0.0, 0.0, 1.0]]]], jnp.float32)
    out, _ = P.RoPE().rotate(x, x, jnp.array([1]), jnp.array([1]))
    np.testing.assert_allclose(np.asarray(out)[0, 0, 0],
                               [math.cos(1), math.sin(1), -math.sin(0.01), math.cos(0.01)],
                               atol=1e-7)
    with pytest.raises(ValueError):
        P.RoPE().rotate(jnp.ones((1, 2, 1, 5)), jnp.ones((1, 2, 1, 5)), jnp.arange(2),
                        jnp.arange(2))


@pytest.mark.parametrize("scheme", [P.RoPE(), P.XPos()], ids=["rope", "xpos"])
def test_rotary_numpy_positions_give_constant_tables_and_the_same_rotation(scheme, rng):
    """Positions known at trace time (numpy) build the tables in numpy, as constants of the
    compiled step; the rotation equals the one from traced positions."""
    cos, sin = P.rotation_tables(P.rotary_angles(np.arange(6, dtype=np.int32), 8, 10000.0))
    assert isinstance(cos, np.ndarray) and isinstance(sin, np.ndarray)
    chex.assert_shape([cos, sin], (6, 1, 8))
    q = jnp.asarray(rng.standard_normal((2, 30, 3, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 30, 3, 16)), jnp.float32)
    pos = np.arange(30, dtype=np.int32) + 7
    constant = jax.jit(lambda q, k: scheme.rotate(q, k, pos, pos))(q, k)
    traced = rotate(scheme, q, k, pos, pos)
    for a, b in zip(constant, traced):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_rope_keeps_dtype():
    x = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    qr, kr = P.RoPE().rotate(x, x, jnp.arange(4), jnp.arange(4))
    assert qr.dtype == jnp.bfloat16 and kr.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------------------------
# xPos
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [8, 64, 128])
def test_xpos_decay_base(d):
    np.testing.assert_allclose(P.xpos_decay_base(d, 0.4), ref_xpos_zeta(d), rtol=1e-6)


def test_xpos_decay_base_hand_values():
    zeta = P.xpos_decay_base(64, 0.4)
    np.testing.assert_allclose([zeta[0], zeta[-1]], [0.4 / 1.4, (62 + 25.6) / 89.6], rtol=1e-6)
    np.testing.assert_allclose([zeta[0], zeta[-1]], [0.2857, 0.9777], atol=1e-4)  # hand-worked


@pytest.mark.parametrize("offset", [0, 1000])
@pytest.mark.parametrize("d", [8, 32])
def test_xpos_scores_match_paper_formula(offset, d, rng):
    n = 80
    q = rng.standard_normal((1, n, 2, d)).astype(np.float32)
    k = rng.standard_normal((1, n, 2, d)).astype(np.float32)
    pos = np.arange(n) + offset
    qr, kr = rotate(P.XPos(), q, k, pos, pos)
    got = _scores(qr, kr)
    for h in range(2):
        want = ref_xpos_scores(q[0, :, h].astype(np.float64), k[0, :, h].astype(np.float64),
                               pos, pos)
        np.testing.assert_allclose(got[h], want, rtol=1e-4, atol=5e-4)


def test_xpos_decays_with_distance_relative_to_rope(rng):
    """At distance 512 pair i is damped by exactly zeta_i relative to RoPE."""
    d = 8
    x = rng.standard_normal((1, 600, 1, d)).astype(np.float32)
    pos = jnp.arange(600, dtype=jnp.int32)
    xq, xk = rotate(P.XPos(), x, x, pos, pos)
    rq, rk = rotate(P.RoPE(), x, x, pos, pos)
    n, m = 580, 68
    pair = lambda a, b: (np.asarray(a, np.float64)[0, n, 0].reshape(-1, 2)
                         * np.asarray(b, np.float64)[0, m, 0].reshape(-1, 2)).sum(-1)
    np.testing.assert_allclose(pair(xq, xk), pair(rq, rk) * ref_xpos_zeta(d), rtol=1e-4,
                               atol=1e-6)


def test_xpos_is_numerically_safe_at_64k(rng):
    """One call of length 65536 (head_dim 64): all values finite; at distance 0 near the end the
    score equals plain RoPE's (zeta^0 = 1); per pair, the xPos score is RoPE's times
    zeta_i^((n - m)/512)."""
    n, d = 65536, 64
    q = jnp.asarray(rng.standard_normal((1, n, 1, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, n, 1, d)), jnp.float32)
    pos = jnp.arange(n, dtype=jnp.int32)
    xq, xk = rotate(P.XPos(), q, k, pos, pos)
    assert bool(jnp.all(jnp.isfinite(xq))) and bool(jnp.all(jnp.isfinite(xk)))
    rq, rk = rotate(P.RoPE(), q, k, pos, pos)
    xq, xk, rq, rk = (np.asarray(a, np.float64)[0, :, 0] for a in (xq, xk, rq, rk))
    zeta = ref_xpos_zeta(d)
    for a, b in [(65535, 65535), (65534, 65534), (0, 0), (1, 1), (32767, 32767)]:
        np.testing.assert_allclose(xq[a] @ xk[b], rq[a] @ rk[b], rtol=1e-4)
    for a, b in [(65535, 65530), (65535, 64000), (65535, 65024), (1000, 0), (40000, 39000)]:
        pairs = (rq[a].reshape(-1, 2) * rk[b].reshape(-1, 2)).sum(-1)
        want = np.sum(pairs * zeta ** ((a - b) / 512))
        np.testing.assert_allclose(xq[a] @ xk[b], want, rtol=1e-4, atol=1e-5)


def ref_bca_xpos_attention(q, k, v, queries, block):
    """LeX's blockwise causal attention with xPos, float64, for the query positions `queries`:
    query n sees keys m <= n of its block and the previous one, scores from distances only
    (`ref_xpos_scores`); `q, k, v [n, d]` (one head) -> `[len(queries), d]`."""
    out = []
    for n in queries:
        keys = np.arange(max(0, (n // block - 1) * block), n + 1)
        scores = ref_xpos_scores(q[n:n + 1], k[keys], [n], keys)[0] / math.sqrt(q.shape[-1])
        weights = np.exp(scores - scores.max())
        out.append(weights @ v[keys] / weights.sum())
    return np.stack(out)


def test_xpos_under_bca_is_finite_and_exact_at_a_million_tokens(rng):
    """Rotated block by block (`rotates_per_block`), xPos under blockwise causal attention is
    finite at 2^20 tokens (rotated over the whole sequence its scales leave float32 past ~72K)
    and equals LeX's formula in float64 at the start, the middle and the end."""
    n, d, block = 2 ** 20, 8, 16
    q, k, v = (rng.standard_normal((1, n, 1, d)).astype(np.float32) for _ in range(3))
    out = jax.jit(lambda q, k, v: lexjax.attention.attend(
        q, k, v, mask=lexjax.attention.MaskSpec(blockwise=block), impl="xla",
        rotation=P.XPos().rotate))(q, k, v)
    out = np.asarray(out[0, :, 0])
    assert np.isfinite(out).all()
    queries = np.concatenate([np.arange(0, 40), n // 2 + np.arange(-20, 20), n - 1 - np.arange(40)])
    want = ref_bca_xpos_attention(*(x[0, :, 0].astype(np.float64) for x in (q, k, v)), queries,
                                  block)
    np.testing.assert_allclose(out[queries], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask", [lexjax.attention.MaskSpec(blockwise=32),
                                  lexjax.attention.MaskSpec(window=40),
                                  lexjax.attention.MaskSpec(chunk=32),
                                  lexjax.attention.MaskSpec()], ids=lambda mask: mask.kind)
@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_deferred_rotation_equals_rotating_first(mask, impl, rng):
    """`attend(..., rotation=...)` (per block where the mask is local) equals attending to q
    and k rotated over the whole sequence, for xPos and RoPE, grouped-query heads and packed
    segments, where the global rotation is still finite (160 tokens)."""
    n = 160
    q = jnp.asarray(rng.standard_normal((2, n, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, n, 2, 16)), jnp.float32) for _ in range(2))
    segments = jnp.asarray(np.repeat([[1, 2]], 2, axis=0).repeat(n // 2, axis=1), jnp.int32)
    positions = np.arange(n, dtype=np.int32)
    for scheme in (P.XPos(), P.RoPE()):
        deferred = lexjax.attention.attend(q, k, v, mask=mask, impl=impl, segment_ids=segments,
                                           block_size=32, rotation=scheme.rotate)
        qr, kr = scheme.rotate(q, k, positions, positions)
        first = lexjax.attention.attend(qr, kr, v, mask=mask, impl=impl, segment_ids=segments,
                                        block_size=32)
        np.testing.assert_allclose(np.asarray(deferred), np.asarray(first), rtol=2e-5,
                                   atol=2e-5)


# ----------------------------------------------------------------------------------------------
# Sandwich
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads,head_dim,dim", [(8, 16, None), (4, 64, None), (3, 16, 32)])
def test_sandwich_bias_matches_formula(heads, head_dim, dim):
    rel = np.arange(-1024, 1025, 3).astype(np.int32).reshape(1, -1)
    bias = P.Sandwich(dim=dim).relative_bias(heads, head_dim)(jnp.asarray(rel))
    chex.assert_shape(bias, (heads,) + rel.shape)
    want = ref_sandwich(rel, heads, dim or head_dim)
    np.testing.assert_allclose(np.asarray(bias, np.float64), want, atol=1e-3, rtol=1e-5)


def test_sandwich_bias_diagonal_zero_non_positive_and_steepest_first_head():
    heads = 8
    rel = jnp.arange(-300, 301, dtype=jnp.int32)
    bias = np.asarray(P.Sandwich().relative_bias(heads, 32)(rel))
    zero = 300
    np.testing.assert_allclose(bias[:, zero], 0.0, atol=1e-6)
    assert np.all(bias <= 1e-6)
    assert np.all(bias[:, zero + 1] < 0)
    # Head h divides by 8h/H: head 1 is 8x steeper than head 8.
    np.testing.assert_allclose(bias[0], 8 * bias[-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bias, bias[:, ::-1], atol=1e-5)  # symmetric in rel
    # Hand value: d' = 2, H = 1: bias = (cos(rel / 10000) - 1) / 8.
    one = np.asarray(P.Sandwich().relative_bias(1, 2)(jnp.array([5000], jnp.int32)))
    np.testing.assert_allclose(one, [[(math.cos(0.5) - 1) / 8]], rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# KERPLE
# ----------------------------------------------------------------------------------------------

def _kerple(variant, heads=6, seed=0):
    scheme = P.Kerple(variant=variant)
    variables = scheme.init(jax.random.PRNGKey(seed), heads, 16, method=P.Kerple.relative_bias)
    return scheme, variables


def _kerple_bias(scheme, variables, rel, heads=6):
    return scheme.apply(variables, heads, 16, rel,
                        method=lambda m, h, d, r: m.relative_bias(h, d)(r))


def _kerple_r(variant, params):
    r1 = ref_softplus(params["raw_r1"])
    r2 = ref_softplus(params["raw_r2"]) if variant == "log" else 2 * ref_sigmoid(params["raw_r2"])
    return r1, r2


@pytest.mark.parametrize("variant", ["log", "power"])
def test_kerple_bias_matches_formula(variant, rng):
    scheme, variables = _kerple(variant)
    r1, r2 = _kerple_r(variant, unboxed_params(variables))
    rel = rng.integers(-2000, 2000, size=(4, 33)).astype(np.int32)
    rel[:, 0] = 0
    rel[:, 1] = 1
    rel[:, 2] = -1
    got = np.asarray(_kerple_bias(scheme, variables, jnp.asarray(rel)), np.float64)
    chex.assert_shape(got, (6, 4, 33))
    dist = np.abs(rel).astype(np.float64)[None]
    if variant == "log":
        want = -r1[:, None, None] * np.log(1 + r2[:, None, None] * dist)
    else:
        want = -r1[:, None, None] * dist ** r2[:, None, None]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    assert np.all(got[:, :, 0] == 0) and np.all(got <= 0)


@pytest.mark.parametrize("variant", ["log", "power"])
def test_kerple_parameters_positive_after_init(variant):
    heads = 16
    init = jax.vmap(lambda key: P.Kerple(variant=variant).init(
        key, heads, 16, method=P.Kerple.relative_bias))
    params = unboxed_params(init(jax.random.split(jax.random.PRNGKey(1), 32)))
    r1, r2 = _kerple_r(variant, params)
    chex.assert_shape([r1, r2], [(32, heads)] * 2)
    r1_high = 2.0 if variant == "log" else 1.0
    r2_high = 1.0 if variant == "log" else 2.0
    assert np.all(r1 > 0) and np.all(r2 > 0)
    assert np.all(r1 >= 0.01 - 1e-4) and np.all(r1 <= r1_high + 1e-4)
    assert np.all(r2 >= 0.01 - 1e-4) and np.all(r2 <= r2_high + 1e-4)
    if variant == "power":
        assert np.all(r2 <= 2.0)
    # Different heads / seeds really are drawn, not constant.
    assert np.std(r1) > 0.05 and np.std(r2) > 0.05


@pytest.mark.parametrize("variant", ["log", "power"])
def test_kerple_gradient_finite_at_zero_distance(variant):
    scheme, variables = _kerple(variant)
    params = nn.unbox(variables)["params"]
    rel = jnp.arange(-6, 7, dtype=jnp.int32)  # contains 0 (and +-1, where |rel|^r2 = 1)

    def loss(p):
        return jnp.sum(_kerple_bias(scheme, {"params": p}, rel))
    grads = unboxed_params({"params": jax.grad(loss)(params)})
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    # Against the analytic gradient through the reparameterisation.
    raw = unboxed_params(variables)
    r1, r2 = _kerple_r(variant, raw)
    dist = np.abs(np.arange(-6, 7)).astype(np.float64)
    if variant == "log":
        d_r1 = -np.log1p(r2[:, None] * dist).sum(-1)
        d_r2 = (-r1[:, None] * dist / (1 + r2[:, None] * dist)).sum(-1)
        dr2_draw = ref_sigmoid(raw["raw_r2"])
    else:
        safe = np.where(dist > 0, dist, 1.0)
        d_r1 = -(np.where(dist > 0, safe ** r2[:, None], 0.0)).sum(-1)
        d_r2 = (-r1[:, None] * safe ** r2[:, None] * np.log(safe)).sum(-1)
        s = ref_sigmoid(raw["raw_r2"])
        dr2_draw = 2 * s * (1 - s)
    np.testing.assert_allclose(grads["raw_r1"], d_r1 * ref_sigmoid(raw["raw_r1"]), rtol=1e-4)
    np.testing.assert_allclose(grads["raw_r2"], d_r2 * dr2_draw, rtol=1e-4)


def test_kerple_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        P.Kerple(variant="cubic").init(jax.random.PRNGKey(0), 2, 8,
                                       method=P.Kerple.relative_bias)


# ----------------------------------------------------------------------------------------------
# T5 buckets
# ----------------------------------------------------------------------------------------------

_T5_REL = np.concatenate([np.arange(-300, 301), [-10 ** 6, -4097, 4097, 10 ** 6]]).astype(np.int32)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64), (64, 256), (32, 100),
                                                      (8, 20)])
def test_t5_buckets_match_mesh_tensorflow(bidirectional, num_buckets, max_distance):
    got = np.asarray(P.relative_position_bucket(jnp.asarray(_T5_REL), bidirectional=bidirectional,
                                                num_buckets=num_buckets,
                                                max_distance=max_distance))
    # lexjax takes rel = q - k; Mesh TF takes relative_position = k - q.
    want = ref_mtf_bucket(-_T5_REL.astype(np.int64), bidirectional, num_buckets, max_distance)
    np.testing.assert_array_equal(got, want)
    assert got.min() >= 0 and got.max() == num_buckets - 1


def test_t5_buckets_hand_values():
    span = np.arange(-5000, 5001)
    tables = {bi: np.asarray(P.relative_position_bucket(
        jnp.asarray(span, jnp.int32), bidirectional=bi, num_buckets=32, max_distance=128))
        for bi in (False, True)}

    def bucket(rel, bidirectional):
        return tables[bidirectional][np.asarray(rel) + 5000]
    # Causal: exact for 0..15, future keys (rel < 0) share bucket 0, >= 128 in the last bucket.
    np.testing.assert_array_equal(bucket(np.arange(16), False), np.arange(16))
    np.testing.assert_array_equal(bucket([-1, -5, -1000], False), [0, 0, 0])
    np.testing.assert_array_equal(bucket([128, 129, 5000], False), [31, 31, 31])
    # Beyond: bucket 16 + floor(16 log(n/16) / log 8); bucket 21 starts at 16 * 2^(15/16) = 30.6.
    np.testing.assert_array_equal(bucket([16, 17, 30, 31, 64, 127], False),
                                  [16, 16, 20, 21, 26, 31])
    # Bidirectional: 16 buckets a side, exact 0..7; keys in the future (rel < 0) from bucket 16.
    np.testing.assert_array_equal(bucket(np.arange(8), True), np.arange(8))
    np.testing.assert_array_equal(bucket(-np.arange(1, 8), True), 16 + np.arange(1, 8))
    np.testing.assert_array_equal(bucket([128, -128], True), [15, 31])


def test_t5_bias_looks_up_the_table(rng):
    heads = 4
    scheme = P.T5Buckets()
    variables = scheme.init(jax.random.PRNGKey(0), heads, 16, method=P.T5Buckets.relative_bias)
    table = unboxed_params(variables)["rel_embedding"]
    chex.assert_shape(table, (32, heads))
    rel = rng.integers(-200, 200, size=(3, 9)).astype(np.int32)
    got = scheme.apply(variables, heads, 16, jnp.asarray(rel),
                       method=lambda m, h, d, r: m.relative_bias(h, d)(r))
    want = np.moveaxis(table[ref_mtf_bucket(-rel.astype(np.int64), False, 32, 128)], -1, 0)
    np.testing.assert_array_equal(np.asarray(got), want)


# ----------------------------------------------------------------------------------------------
# RoPE and ALiBi options for converted checkpoints
# ----------------------------------------------------------------------------------------------

def ref_llama3_frequencies(d, base, factor, low, high, original):
    """Llama 3.1's rule written out per frequency (float64): long wavelengths divided by
    `factor`, short ones kept, a linear blend in 1/wavelength between."""
    out = []
    for i in range(d // 2):
        freq = base ** (-2.0 * i / d)
        wavelength = 2 * math.pi / freq
        if wavelength < original / high:
            out.append(freq)
        elif wavelength > original / low:
            out.append(freq / factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_partial_rope_rotates_the_leading_channels_only(fraction, rng):
    d = 16
    rotated = int(d * fraction)
    q = rng.standard_normal((2, 12, 3, d)).astype(np.float32)
    pos = np.arange(12) + 5
    qr, _ = rotate(P.RoPE(fraction=fraction), q, q, pos, pos)
    qr = np.asarray(qr)
    np.testing.assert_array_equal(qr[..., rotated:], q[..., rotated:])
    np.testing.assert_allclose(qr[..., :rotated], ref_rope(q[..., :rotated], pos), atol=2e-5)


def test_rope_fraction_must_rotate_an_even_number_of_channels():
    q = np.zeros((1, 4, 1, 10), np.float32)
    with pytest.raises(ValueError, match="even number of channels"):
        rotate(P.RoPE(fraction=0.5), q, q, np.arange(4), np.arange(4))


def test_rope_interpolation_divides_positions(rng):
    q = rng.standard_normal((1, 16, 2, 8)).astype(np.float32)
    pos = np.arange(16)
    qr, _ = rotate(P.RoPE(interpolation=4.0), q, q, pos, pos)
    np.testing.assert_allclose(np.asarray(qr), ref_rope(q, pos / 4.0), atol=2e-5)


def test_llama3_frequencies_match_the_rule_written_out():
    args = (8.0, 1.0, 4.0, 64)
    got = P.RoPE(base=10000.0, llama3_scaling=args).frequencies(32)
    want = ref_llama3_frequencies(32, 10000.0, *args)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0] == pytest.approx(1.0) and got[-1] == pytest.approx(want[-1])
    assert np.any(got != P.RoPE().frequencies(32))  # the scaling changes the long wavelengths


def test_max_wavelength_frequencies_match_perceiver_ar(rng):
    """Perceiver AR's rotary (google-research/perceiver-ar @168e6f2, `_make_rotation_matrices`):
    freq = W ** ((2 / d) * linspace(0, d/2, d/2)), theta = 1 / freq, pairs interleaved; its
    wavelengths run from 1 to W inclusive."""
    d, wavelength = 12, 8192.0
    bands = d // 2
    want = 1.0 / wavelength ** ((2.0 / d) * np.linspace(0, bands, bands))
    got = P.RoPE(max_wavelength=wavelength).frequencies(d)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0] == 1.0 and got[-1] == pytest.approx(1 / wavelength)
    q = rng.standard_normal((1, 20, 2, d)).astype(np.float32)
    pos = np.arange(20)
    qr, _ = rotate(P.RoPE(max_wavelength=wavelength), q, q, pos, pos)
    z = (q[..., 0::2] + 1j * q[..., 1::2]) * np.exp(1j * pos[None, :, None, None] * want)
    np.testing.assert_allclose(np.asarray(qr)[..., 0::2], z.real, atol=2e-5)
    np.testing.assert_allclose(np.asarray(qr)[..., 1::2], z.imag, atol=2e-5)
    with pytest.raises(ValueError, match="max_wavelength"):
        P.RoPE(max_wavelength=1.0).frequencies(d)


def test_alibi_explicit_slopes(rng):
    slopes = (0.5, 0.125, 0.25)
    rel = rng.integers(-50, 50, size=(4, 6)).astype(np.int32)
    got = np.asarray(P.ALiBi(slopes=slopes).relative_bias(3, 16)(jnp.asarray(rel)))
    np.testing.assert_allclose(got, -np.array(slopes)[:, None, None] * np.abs(rel), rtol=1e-6)
    with pytest.raises(ValueError, match="3 values for 4 heads"):
        P.ALiBi(slopes=slopes).relative_bias(4, 16)
