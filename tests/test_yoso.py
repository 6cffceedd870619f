"""YOSO (lexjax.layers.yoso): YOSO-E against the formula in a float64 numpy loop; the LSH estimate
against YOSO-E (error ~ 1/m, unbiased); SimHash collision rates against (1 - theta/pi)^tau;
segment ids (packed documents equal documents alone, padding ignored); the custom backward
against the expectation of the paper's surrogate gradient, itself against an independent numpy
loop; the attention layer's contract."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lexjax.layers.yoso import (YosoAttention, collision_probability, random_hyperplanes,
                                simhash_codes, yoso_expectation,
                                yoso_expectation_surrogate_grads, yoso_sampled)

sampled = jax.jit(yoso_sampled, static_argnums=(3, 4))
expectation = jax.jit(yoso_expectation, static_argnums=3)
surrogate_grads = jax.jit(yoso_expectation_surrogate_grads, static_argnums=4)


def arrays(rng, *shapes):
    return [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]


# ----------------------------------------------------------------------------------------------
# Independent references (float64 numpy loops over i, j)
# ----------------------------------------------------------------------------------------------

def unit(x):
    return x / np.linalg.norm(x)


def ref_expectation(q, k, v, tau, mask=None):
    """out[b, i, h] = sum_j mask[b, i, j] (1 - arccos(q^.k^)/pi)^tau v[b, j, h]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, nq, h, _ = q.shape
    nk = k.shape[1]
    mask = np.ones((b, nq, nk), bool) if mask is None else np.broadcast_to(mask, (b, nq, nk))
    out = np.zeros((b, nq, h, v.shape[-1]))
    for bi in range(b):
        for hi in range(h):
            for i in range(nq):
                for j in range(nk):
                    if mask[bi, i, j]:
                        cos = np.clip(unit(q[bi, i, hi]) @ unit(k[bi, j, hi]), -1, 1)
                        out[bi, i, hi] += (1 - np.arccos(cos) / np.pi) ** tau * v[bi, j, hi]
    return out


def ref_surrogate_grads(q, k, v, g, tau):
    """The paper's surrogate, w.r.t. q^, k^ with p_ij for B: dq^_i = sum_j (tau/2)(g_i.v_j) p_ij
    k^_j, dk^_j = sum_i (tau/2)(g_i.v_j) p_ij q^_i, dv_j = sum_i p_ij g_i; then through the
    normalisation x -> x/|x|, whose transposed Jacobian is u -> (u - x^ (x^.u)) / |x|."""
    q, k, v, g = (np.asarray(a, np.float64) for a in (q, k, v, g))
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    b, n, h, _ = q.shape
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                for j in range(k.shape[1]):
                    qh, kh = unit(q[bi, i, hi]), unit(k[bi, j, hi])
                    p = (1 - np.arccos(np.clip(qh @ kh, -1, 1)) / np.pi) ** tau
                    a = tau / 2 * (g[bi, i, hi] @ v[bi, j, hi]) * p
                    dq[bi, i, hi] += a * kh
                    dk[bi, j, hi] += a * qh
                    dv[bi, j, hi] += p * g[bi, i, hi]

    def through_norm(x, u):
        xh = x / np.linalg.norm(x, axis=-1, keepdims=True)
        return (u - xh * np.sum(xh * u, -1, keepdims=True)) / np.linalg.norm(x, axis=-1,
                                                                              keepdims=True)
    return through_norm(q, dq), through_norm(k, dk), dv


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


# ----------------------------------------------------------------------------------------------
# YOSO-E and the estimate
# ----------------------------------------------------------------------------------------------

def test_expectation_matches_formula_with_key_mask(rng):
    q, k, v = arrays(rng, (2, 3, 2, 3), (2, 4, 2, 3), (2, 4, 2, 2))
    np.testing.assert_allclose(expectation(q, k, v, 3), ref_expectation(q, k, v, 3),
                               rtol=1e-5, atol=1e-6)
    mask = rng.random((2, 3, 4)) < 0.6
    np.testing.assert_allclose(expectation(q, k, v, 3, key_mask=mask),
                               ref_expectation(q, k, v, 3, mask), rtol=1e-5, atol=1e-6)
    key_only = rng.random((2, 1, 4)) < 0.5                      # broadcast over queries
    np.testing.assert_allclose(expectation(q, k, v, 3, key_mask=key_only),
                               ref_expectation(q, k, v, 3, key_only), rtol=1e-5, atol=1e-6)


def test_sampled_converges_to_expectation_like_one_over_m(rng):
    q, k, v = arrays(rng, (1, 8, 2, 4), (1, 8, 2, 4), (1, 8, 2, 4))
    exact = np.asarray(expectation(q, k, v, 2))
    keys = jax.random.split(jax.random.PRNGKey(1), 8)
    errors, outs = {}, {}
    for m in (16, 64, 256):
        outs[m] = np.asarray(jax.vmap(lambda key, m=m: sampled(q, k, v, 2, m, key))(keys))
        errors[m] = np.mean((outs[m] - exact) ** 2)
    assert errors[16] > errors[64] > errors[256]
    assert errors[16] / errors[256] > 4                          # ~16 for error^2 ~ 1/m
    # unbiased: the mean of 8 independent estimates is ~8x closer in squared error
    assert np.mean((outs[256].mean(0) - exact) ** 2) < errors[256] / 3


@pytest.mark.parametrize("theta", [0.3, 1.2, 2.2])
def test_code_collision_rate(theta):
    tau, m = 3, 20000
    a = np.zeros(5, np.float32)
    a[0] = 1.0
    b = np.zeros(5, np.float32)
    b[0], b[1] = np.cos(theta), np.sin(theta)
    planes = random_hyperplanes(jax.random.PRNGKey(7), m, tau, 5)
    codes = np.asarray(simhash_codes(jnp.stack([a, b]), planes))   # [2, m]
    assert codes.min() >= 0 and codes.max() < 2 ** tau
    rate = np.mean(codes[0] == codes[1])
    expected = (1 - theta / np.pi) ** tau
    assert abs(rate - expected) < 4 * np.sqrt(expected * (1 - expected) / m) + 1e-3
    np.testing.assert_allclose(collision_probability(jnp.float32(np.cos(theta)), tau),
                               expected, rtol=1e-5)


def test_segments_keep_documents_apart_and_ignore_padding(rng):
    q, k, v = arrays(rng, (1, 10, 2, 4), (1, 10, 2, 4), (1, 10, 2, 3))
    seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0, 0, 0]], jnp.int32)
    key = jax.random.PRNGKey(3)
    out = np.asarray(sampled(q, k, v, 2, 4, key, segment_ids=seg))
    for lo, hi in ((0, 4), (4, 7)):
        alone = sampled(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], 2, 4, key)
        np.testing.assert_allclose(out[:, lo:hi], alone, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[:, 7:], 0.0)               # padding queries read nothing
    # with few buckets, codes collide across documents: without segment ids the rows mix
    plain = sampled(q, k, v, 2, 4, key)
    assert not np.allclose(plain[:, :7], out[:, :7])
    # padding keys count for nothing, in the output and in the gradients
    changed = [x.at[:, 7:].set(x[:, 7:] * 3 + 1) for x in (q, k, v)]
    out2 = sampled(*changed, 2, 4, key, segment_ids=seg)
    np.testing.assert_array_equal(np.asarray(out2)[:, :7], out[:, :7])
    grads = jax.jit(jax.grad(
        lambda k, v: jnp.sum(yoso_sampled(q, k, v, 2, 4, key, segment_ids=seg)),
        argnums=(0, 1)))(k, v)
    for grad in grads:
        np.testing.assert_array_equal(np.asarray(grad)[:, 7:], 0.0)
    # one segment is the plain estimate
    whole = sampled(q, k, v, 2, 4, key, segment_ids=jnp.ones((1, 10), jnp.int32))
    np.testing.assert_allclose(whole, plain, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The surrogate backward
# ----------------------------------------------------------------------------------------------

def test_surrogate_expectation_matches_paper_loop_and_exact_value_gradient(rng):
    q, k, v, g = arrays(rng, (2, 4, 2, 3), (2, 4, 2, 3), (2, 4, 2, 2), (2, 4, 2, 2))
    got = surrogate_grads(q, k, v, g, 3)
    for a, b in zip(got, ref_surrogate_grads(q, k, v, g, 3)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # dL/dv is the exact gradient of YOSO-E
    _, vjp = jax.vjp(lambda v: expectation(q, k, v, 3), v)
    np.testing.assert_allclose(got[2], vjp(g)[0], rtol=1e-5, atol=1e-6)


def test_sampled_backward_approaches_surrogate_expectation(rng):
    q, k, v, g = arrays(rng, *[(1, 6, 2, 4)] * 4)
    expected = surrogate_grads(q, k, v, g, 2)
    _, vjp = jax.vjp(lambda a, b, c: sampled(a, b, c, 2, 2048, jax.random.PRNGKey(0)), q, k, v)
    for got, want in zip(vjp(g), expected):
        assert rel_err(got, want) < 0.1


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------

def make_layer(**kwargs):
    return YosoAttention(num_heads=2, head_dim=4, hash_bits=3, num_hashes=8, **kwargs)


def test_layer_contract(rng):
    x = jnp.asarray(rng.normal(size=(2, 8, 16)), jnp.float32)
    positions = jnp.arange(8)
    layer = make_layer()
    variables = jax.jit(layer.init)(jax.random.PRNGKey(0), x, positions)
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["query"]["kernel"]) == ("embed", "heads", "kv")
    assert tuple(specs["out"]["kernel"]) == ("heads", "kv", "embed")
    apply = jax.jit(layer.apply)
    out = apply(variables, x, positions)
    assert out.shape == x.shape
    np.testing.assert_array_equal(out, apply(variables, x, positions))        # repeatable
    late = apply(variables, x.at[:, -1].add(1.0), positions)
    assert not np.allclose(late[:, 0], out[:, 0])                              # bidirectional

    train = jax.jit(lambda x, key: make_layer(deterministic=False).apply(
        variables, x, positions, rngs={"dropout": key}))
    first = train(x, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(first, train(x, jax.random.PRNGKey(1)))
    assert not np.allclose(first, train(x, jax.random.PRNGKey(2)))             # fresh hashes
    assert not np.allclose(first, out)

    seg = jnp.array([[1] * 6 + [0] * 2, [1] * 8], jnp.int32)
    with_segments = jax.jit(lambda x: layer.apply(variables, x, positions, seg))
    np.testing.assert_allclose(with_segments(x.at[0, 6:].add(5.0))[0, :6],
                               with_segments(x)[0, :6], rtol=1e-6, atol=1e-6)


def test_causal_refused():
    with pytest.raises(ValueError, match="bidirectional only.*encoders"):
        make_layer(causal=True)
