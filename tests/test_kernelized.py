"""Kernelized attention with RPE via FFT (lexjax.layers.kernelized) against float64 numpy
references: the FFT Toeplitz product against a dense loop, the random features' expectation, the
stabilised FFT attention against an unstabilised float64 formula and the dense-bias path, the
approach to softmax attention as the features grow, causal decoding against the forward pass, and
the layer's parameters and projection redraws."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lexjax.layers.kernelized import (KernelizedRPEAttention, banded_causal_multiply,
                                      decode_state_init, decode_step,
                                      dense_kernelized_rpe_attention, kernelized_rpe_attention,
                                      positive_random_features, random_projection,
                                      relative_coefficients, softmax_rpe_attention,
                                      toeplitz_multiply)

# Compiled once per shape: far less CPU time than op-by-op dispatch.
fft_attention = jax.jit(kernelized_rpe_attention, static_argnames=("causal",))
dense_attention = jax.jit(dense_kernelized_rpe_attention, static_argnames=("causal",))
features = jax.jit(positive_random_features, static_argnames=("stabilize",))
toeplitz = jax.jit(toeplitz_multiply, static_argnames=("causal",))
projection = jax.jit(random_projection, static_argnums=(1, 2, 3))


def dense_toeplitz(c: np.ndarray, s: np.ndarray, causal: bool) -> np.ndarray:
    """float64 `y[b, i, h, f] = Σ_j c[h, i − j + n − 1] s[b, j, h, f]` (j ≤ i when causal)."""
    n = s.shape[1]
    y = np.zeros(s.shape)
    for i in range(n):
        for j in range(i + 1 if causal else n):
            y[:, i] += c[None, :, i - j + n - 1, None] * s[:, j]
    return y


def reference_attention(q, k, v, log_bias, w, causal):
    """float64 random-feature attention with no stabilisers: plain φ, c = exp(b) unshifted."""
    q, k, v, log_bias, w = (np.asarray(a, np.float64) for a in (q, k, v, log_bias, w))
    n, d, m = q.shape[1], q.shape[-1], w.shape[1]
    reach = (log_bias.shape[-1] - 1) // 2

    def phi(x):
        x = x * d ** -0.25
        return np.exp(np.einsum("bnhd,hmd->bnhm", x, w)
                      - 0.5 * np.sum(x * x, -1, keepdims=True)) / np.sqrt(m)

    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    c = np.exp(log_bias[:, np.clip(offsets, -reach, reach) + reach])  # [h, n, n]
    if causal:
        c = c * (offsets >= 0)
    a = np.einsum("bihm,bjhm->bhij", phi(q), phi(k)) * c[None]
    return np.einsum("bhij,bjhe->bihe", a, v) / np.sum(a, -1).transpose(0, 2, 1)[..., None]


def inputs(rng, b=2, n=12, h=2, d=4, dv=3, reach=4, scale=1.0):
    q, k = (scale * rng.standard_normal((b, n, h, d)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((b, n, h, dv)).astype(np.float32)
    log_bias = rng.standard_normal((h, 2 * reach + 1)).astype(np.float32)
    return q, k, v, log_bias


@pytest.mark.parametrize("causal", [False, True])
def test_toeplitz_multiply_equals_dense_product(rng, causal):
    for n in (1, 5, 8, 13):
        c = rng.standard_normal((2, 2 * n - 1))
        s = rng.standard_normal((2, n, 2, 3))
        got = toeplitz(jnp.asarray(c, jnp.float32), jnp.asarray(s, jnp.float32), causal=causal)
        assert got.shape == s.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(got, dense_toeplitz(c, s, causal), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("band", [1, 3, 4, 20])
def test_banded_causal_multiply_equals_dense_product(rng, band):
    """Coefficients constant from offset `band` on (a clipped bias): the block-banded product
    plus the prefix sum equals the dense causal Toeplitz product, for lengths below, at and
    above the band and not multiples of it."""
    for n in (1, 4, 11):
        reach = np.minimum(np.abs(np.arange(-(n - 1), n)), band)
        c = rng.standard_normal((2, 2 * band + 1))[:, reach + band]  # c[o] = c[min(o, band)]
        s = rng.standard_normal((2, n, 2, 3))
        got = banded_causal_multiply(jnp.asarray(c, jnp.float32), jnp.asarray(s, jnp.float32),
                                     band)
        np.testing.assert_allclose(got, dense_toeplitz(c, s, True), atol=2e-5, rtol=1e-5)


def test_causal_form_reads_later_tokens_only_through_rounding(rng):
    """Later tokens, even 10 times larger (so the keys' common shift changes), move earlier
    outputs only at float32 rounding level: no FFT, and the shift cancels."""
    q, k, v, log_bias = inputs(rng, n=40)
    changed = [a.copy() for a in (q, k, v)]
    for a in changed:
        a[:, 25:] = 10 * rng.standard_normal(a[:, 25:].shape)
    w = projection(jax.random.PRNGKey(4), 2, 32, 4)
    first = fft_attention(q, k, v, log_bias, w, causal=True)
    second = fft_attention(*changed, log_bias, w, causal=True)
    np.testing.assert_allclose(np.asarray(first[:, :25]), np.asarray(second[:, :25]),
                               rtol=1e-5, atol=1e-6)


def test_toeplitz_multiply_refuses_wrong_coefficient_length():
    with pytest.raises(ValueError, match="do not fit length"):
        toeplitz_multiply(jnp.ones((2, 8)), jnp.ones((1, 5, 2, 3)), causal=True)


def test_random_features_estimate_the_exponential_kernel(rng):
    d, m = 4, 16384
    w = projection(jax.random.PRNGKey(0), 1, m, d)
    q = 0.7 * rng.standard_normal((1, 6, 1, d)).astype(np.float32)
    k = 0.7 * rng.standard_normal((1, 6, 1, d)).astype(np.float32)
    estimate = np.einsum("bnhm,bnhm->bn", features(q, w), features(k, w))
    exact = np.exp(np.sum(q.astype(np.float64) * k, -1)[..., 0] / np.sqrt(d))
    assert np.all(np.asarray(features(q, w)) > 0)
    np.testing.assert_allclose(estimate, exact, rtol=0.05)


def test_orthogonal_projection_rows_are_orthogonal_in_blocks():
    w = np.asarray(projection(jax.random.PRNGKey(1), 2, 10, 4))
    assert w.shape == (2, 10, 4)
    block = w[0, :4] / np.linalg.norm(w[0, :4], axis=-1, keepdims=True)
    np.testing.assert_allclose(block @ block.T, np.eye(4), atol=1e-5)


def test_stabilisers_leave_the_attention_unchanged(rng):
    """The FFT path (query row max, key global max, coefficient max) against the float64 formula
    with none of them, at ordinary scale and where plain float32 would fail: queries 12 times
    larger (their plain features underflow to 0) and a log-bias near 100 (exp overflows)."""
    w = projection(jax.random.PRNGKey(2), 2, 32, 4)
    q, k, v, log_bias = inputs(rng)
    for q_scale, shift in ((1.0, 0.0), (12.0, 100.0)):
        for causal in (False, True):
            got = fft_attention(q * q_scale, k, v, log_bias + shift, w, causal=causal)
            want = reference_attention(q * q_scale, k, v, log_bias + shift, w, causal)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert float(jnp.min(jnp.sum(features(q * 12.0, w, None), -1))) == 0.0  # plain: underflow
    assert float(jnp.max(features(q * 12.0, w, "query"))) == pytest.approx(32 ** -0.5)
    assert float(jnp.max(features(k, w, "key"))) == pytest.approx(32 ** -0.5)
    with pytest.raises(ValueError, match="unknown stabilize"):
        positive_random_features(k, w, "both")


def test_denominator_floor_bounds_fft_noise(rng):
    """Keys sharing a large component spread their feature scales over e^20 and more (and
    underflow in the causal form's data-independent shift): the floor keeps early causal rows
    bounded (shrunk, not NaN or exploded), and the exact causal path still follows the dense
    one."""
    q, k, v, log_bias = inputs(rng)
    u = rng.standard_normal(4).astype(np.float32)
    k = k + 20.0 * u / np.linalg.norm(u)
    w = projection(jax.random.PRNGKey(2), 2, 32, 4)
    got = np.asarray(fft_attention(q, k, v, log_bias, w, causal=True))
    assert np.all(np.isfinite(got)) and np.abs(got).max() <= 1.5 * np.abs(v).max()
    np.testing.assert_allclose(got, dense_attention(q, k, v, log_bias, w, causal=True),
                               atol=0.1 * np.abs(v).max())


@pytest.mark.parametrize("causal", [False, True])
def test_fft_path_equals_dense_bias_path(rng, causal):
    q, k, v, log_bias = inputs(rng)  # n = 12: not a power of two
    w = projection(jax.random.PRNGKey(3), 2, 32, 4)
    got = fft_attention(q, k, v, log_bias, w, causal=causal)
    want = dense_attention(q, k, v, log_bias, w, causal=causal)
    assert got.shape == (2, 12, 2, 3) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_causal_form_ignores_later_tokens_bidirectional_does_not(rng):
    q, k, v, log_bias = inputs(rng)
    q2, k2, v2 = (a.copy() for a in (q, k, v))
    for a in (q2, k2, v2):
        a[:, 7:] = rng.standard_normal(a[:, 7:].shape)
    w = projection(jax.random.PRNGKey(4), 2, 32, 4)
    causal = [fft_attention(*x, log_bias, w, causal=True) for x in ((q, k, v), (q2, k2, v2))]
    np.testing.assert_allclose(causal[0][:, :7], causal[1][:, :7], atol=1e-5, rtol=1e-5)
    both = [fft_attention(*x, log_bias, w, causal=False)
            for x in ((q, k, v), (q2, k2, v2))]
    assert float(jnp.min(jnp.abs(both[0][:, :7] - both[1][:, :7]).max(-1))) > 1e-4


def test_many_features_approach_softmax_attention(rng):
    """Causal (the language-model form; the bidirectional one shares every step but the mask)."""
    q, k, v, log_bias = inputs(rng, b=1, n=12, d=4, dv=3, scale=0.5)
    exact = np.asarray(softmax_rpe_attention(q, k, v, log_bias, causal=True))
    errors = {}
    for m in (64, 4096):
        w = projection(jax.random.PRNGKey(m), 2, m, 4)
        got = np.asarray(fft_attention(q, k, v, log_bias, w, causal=True))
        errors[m] = np.mean(np.linalg.norm(got - exact, axis=-1) / np.linalg.norm(exact, axis=-1))
    assert errors[4096] < 0.35 * errors[64] and errors[4096] < 0.03, errors


def test_relative_coefficients_clip_and_shift(rng):
    q, k, v, log_bias = inputs(rng)  # R = 4
    n = 12
    c = np.asarray(relative_coefficients(log_bias, n, causal=False))
    assert c.shape == (2, 2 * n - 1)
    offsets = np.arange(-(n - 1), n)
    want = np.exp(log_bias[:, np.clip(offsets, -4, 4) + 4] - log_bias.max(-1, keepdims=True))
    np.testing.assert_allclose(c, want, rtol=1e-6)
    np.testing.assert_allclose(c[:, offsets == 11], c[:, offsets == 4], rtol=0)
    np.testing.assert_allclose(c[:, offsets == -11], c[:, offsets == -4], rtol=0)
    causal = np.asarray(relative_coefficients(log_bias, n, causal=True))
    assert np.all(causal[:, offsets < 0] == 0)
    np.testing.assert_allclose(causal.max(-1), 1.0)  # max over the offsets used
    np.testing.assert_allclose(relative_coefficients(log_bias + 40.0, n, causal=True), causal,
                               rtol=1e-5)
    w = projection(jax.random.PRNGKey(5), 2, 32, 4)
    for causal in (False, True):  # the shift cancels (exactly up to float32 rounding of b + 40)
        np.testing.assert_allclose(dense_attention(q, k, v, log_bias + 40.0, w, causal=causal),
                                   dense_attention(q, k, v, log_bias, w, causal=causal),
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fft_attention(q, k, v, log_bias + 40.0, w, causal=False),
                               fft_attention(q, k, v, log_bias, w, causal=False),
                               rtol=1e-5, atol=1e-5)


def test_segment_ids_are_refused(rng):
    q, k, v, log_bias = inputs(rng)
    w = projection(jax.random.PRNGKey(0), 2, 8, 4)
    with pytest.raises(ValueError, match="packed documents"):
        kernelized_rpe_attention(q, k, v, log_bias, w, causal=True,
                                 segment_ids=np.ones((2, 12), np.int32))


def test_gradients_match_the_dense_path(rng):
    q, k, v, log_bias = inputs(rng, b=1, n=9)
    w = projection(jax.random.PRNGKey(6), 2, 8, 4)

    def loss(fn, q, k, v, log_bias):
        return jnp.sum(jnp.sin(fn(q, k, v, log_bias, w, causal=True)))

    got = jax.jit(jax.grad(lambda *a: loss(kernelized_rpe_attention, *a),
                           argnums=(0, 1, 2, 3)))(q, k, v, log_bias)
    want = jax.jit(jax.grad(lambda *a: loss(dense_kernelized_rpe_attention, *a),
                            argnums=(0, 1, 2, 3)))(q, k, v, log_bias)
    for g, h in zip(got, want):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5)


def test_decode_steps_equal_the_causal_forward(rng):
    reach, n = 4, 12  # n > R: the far sum is used
    q, k, v, log_bias = inputs(rng, n=n, reach=reach)
    w = projection(jax.random.PRNGKey(7), 2, 32, 4)
    want = fft_attention(q, k, v, log_bias, w, causal=True)
    state = decode_state_init(2, 2, 32, 3, reach)
    step = jax.jit(decode_step)
    outs = []
    for t in range(n):
        out, state = step(state, q[:, t], k[:, t], v[:, t], log_bias, w)
        outs.append(out)
    np.testing.assert_allclose(jnp.stack(outs, 1), want, rtol=1e-5, atol=1e-5)


def make_layer(**kw):
    return KernelizedRPEAttention(num_heads=2, head_dim=4, num_features=8, max_distance=5, **kw)


@pytest.fixture(scope="module")
def layer_setup():
    """(x [2, 32, 16], variables of `make_layer()` initialised at length 32)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 16))
    return x, jax.jit(make_layer().init)(jax.random.PRNGKey(1), x, jnp.arange(32))


def test_layer_shapes_axes_and_length_independence(layer_setup):
    x, variables = layer_setup
    leaves = jax.tree_util.tree_leaves(variables["params"],
                                       is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
    box = variables["params"]["relative_log_bias"]
    assert box.names == ("heads", "relpos_buckets") and box.value.shape == (2, 11)
    assert set(variables["params"]) == {"query", "key", "value", "out", "relative_log_bias"}
    apply = jax.jit(make_layer().apply)
    long = jax.random.normal(jax.random.PRNGKey(2), (2, 100, 16))
    y = apply(variables, long, jnp.arange(100))
    assert y.shape == (2, 100, 16) and bool(jnp.all(jnp.isfinite(y)))
    np.testing.assert_array_equal(apply(variables, long, jnp.arange(100)), y)  # fixed projection
    with pytest.raises(ValueError, match="packed documents"):
        apply(variables, x, jnp.arange(32), jnp.ones((2, 32), jnp.int32))


def test_layer_projection_redraws(layer_setup):
    x, variables = layer_setup
    want = jax.jit(make_layer().apply)(variables, x)
    train = jax.jit(make_layer(redraw="per_step", deterministic=False).apply)
    draws = [train(variables, x, rngs={"dropout": jax.random.PRNGKey(s)}) for s in (1, 2)]
    assert float(jnp.max(jnp.abs(draws[0] - draws[1]))) > 1e-4
    np.testing.assert_array_equal(train(variables, x, rngs={"dropout": jax.random.PRNGKey(1)}),
                                  draws[0])
    np.testing.assert_allclose(jax.jit(make_layer(redraw="per_step").apply)(variables, x), want,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        jax.jit(make_layer(deterministic=False).apply)(
            variables, x, rngs={"dropout": jax.random.PRNGKey(3)}), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="unknown redraw"):
        make_layer(redraw="sometimes")
