"""The gated attention unit and its attention cores against direct O(N²) references with explicit
masks (float64 numpy), in outputs and gradients; ragged lengths; decoding: the
cache is created by `init` with `decode=True` (which computes the ordinary forward pass), later
decode calls read and advance it and reproduce the forward pass."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lexjax.layers.gau import GatedAttentionUnit
from lexjax.layers.mixed_chunk import (init_mixed_chunk_cache, mixed_chunk_attention,
                                       mixed_chunk_decode_step, quadratic_attention)
from lexjax.positions import ALiBi, NoPE, RoPE, T5Buckets, XPos

TOL = dict(rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# Independent references (float64 numpy, the paper's formulas with explicit [N, N] masks)
# ----------------------------------------------------------------------------------------------

def relu2(x):
    return np.maximum(x, 0.0) ** 2


def ref_mixed_chunk(qq, kq, ql, kl, v, chunk, causal, slope=0.0):
    """Quadratic part: keys of the query's own chunk (not in its future if causal),
    relu²(q·k / C - slope·(i - j)); linear part: keys of earlier chunks (causal) or of every
    chunk, (q·k / C) with no kernel. Both summed against v."""
    qq, kq, ql, kl, v = (np.asarray(a, np.float64) for a in (qq, kq, ql, kl, v))
    n = v.shape[1]
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    allowed = (j <= i) if causal else np.ones((n, n), bool)
    same_chunk = (i // chunk) == (j // chunk)
    earlier = (j // chunk) < (i // chunk) if causal else np.ones((n, n), bool)
    scores = np.einsum("bis,bjs->bij", qq, kq) / chunk - slope * (i - j)
    quad = np.where(same_chunk & allowed, relu2(scores), 0.0)
    lin = np.where(earlier, np.einsum("bis,bjs->bij", ql, kl) / chunk, 0.0)
    return np.einsum("bij,bje->bie", quad + lin, v)


def ref_quadratic(q, k, v, causal, slope=0.0, length=None):
    """relu²(q·k / T_i - slope·(i - j)), future keys masked, with T_i = `length` (the paper's
    pseudocode `square(relu(qk / seq_len + bias))`, seq_len its fixed training length) or, if
    None, the keys in view (i + 1 causal, N bidirectional)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    n = v.shape[1]
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    t = float(length) if length is not None else (i + 1.0) if causal else float(n)
    kernel = relu2(np.einsum("bis,bjs->bij", q, k) / t - slope * (i - j))
    if causal:
        kernel = np.where(j <= i, kernel, 0.0)
    return np.einsum("bij,bje->bie", kernel, v)


def ref_rope(x, pos, base=10000.0):
    """Interleaved RoPE as complex rotation: (x[2i] + i x[2i+1]) · exp(i p base^(-2i/d))."""
    d = x.shape[-1]
    z = x[..., 0::2] + 1j * x[..., 1::2]
    z = z * np.exp(1j * pos[:, None] * base ** (-2.0 * np.arange(d // 2) / d))
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def silu(x):
    return x / (1.0 + np.exp(-x))


def slope_bias(slope):
    """A one-head relative bias -slope·rel, differentiable in `slope`."""
    return lambda rel: (-slope * rel.astype(jnp.float32))[None]


def inputs(rng, b, n, s, e):
    return [jnp.asarray(rng.normal(size=(b, n, f)), jnp.float32) for f in (s, s, s, s, e)]


# ----------------------------------------------------------------------------------------------
# Mixed chunk attention (FLASH)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [16, 13, 3])  # whole chunks, ragged, shorter than one chunk
def test_mixed_chunk_equals_direct_formula(rng, causal, n):
    qq, kq, ql, kl, v = inputs(rng, 2, n, 6, 5)
    out = mixed_chunk_attention(qq, kq, ql, kl, v, chunk_size=4, causal=causal,
                                bias=slope_bias(0.3))
    np.testing.assert_allclose(out, ref_mixed_chunk(qq, kq, ql, kl, v, 4, causal, slope=0.3),
                               **TOL)


def dense_mixed_chunk(qq, kq, ql, kl, v, slope, chunk, causal):
    """The O(N²) masked formula in jnp (float32), for gradient comparisons."""
    n = v.shape[1]
    i, j = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    allowed = (j <= i) if causal else jnp.ones((n, n), bool)
    earlier = (j // chunk) < (i // chunk) if causal else jnp.ones((n, n), bool)
    scores = jnp.einsum("bis,bjs->bij", qq, kq) / chunk - slope * (i - j)
    quad = jnp.where(((i // chunk) == (j // chunk)) & allowed, jax.nn.relu(scores) ** 2, 0.0)
    lin = jnp.where(earlier, jnp.einsum("bis,bjs->bij", ql, kl) / chunk, 0.0)
    return jnp.einsum("bij,bje->bie", quad + lin, v)


@pytest.mark.parametrize("causal", [True, False])
def test_mixed_chunk_gradients_equal_direct_formula(rng, causal):
    args = inputs(rng, 1, 11, 4, 3) + [jnp.asarray(0.2, jnp.float32)]
    weights = jnp.asarray(rng.normal(size=(1, 11, 3)), jnp.float32)

    def loss_fast(qq, kq, ql, kl, v, slope):
        out = mixed_chunk_attention(qq, kq, ql, kl, v, chunk_size=4, causal=causal,
                                    bias=slope_bias(slope))
        return jnp.sum(out * weights)

    def loss_dense(*a):
        return jnp.sum(dense_mixed_chunk(*a, chunk=4, causal=causal) * weights)

    fast = jax.grad(loss_fast, argnums=range(6))(*args)
    dense = jax.grad(loss_dense, argnums=range(6))(*args)
    for got, want in zip(fast, dense):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_mixed_chunk_is_causal_across_chunks(rng):
    qq, kq, ql, kl, v = inputs(rng, 1, 12, 4, 3)
    out = mixed_chunk_attention(qq, kq, ql, kl, v, chunk_size=4, causal=True)
    changed = [x.at[:, 6:].set(7.0) for x in (qq, kq, ql, kl, v)]
    out2 = mixed_chunk_attention(*changed, chunk_size=4, causal=True)
    np.testing.assert_allclose(out[:, :6], out2[:, :6], rtol=0, atol=0)
    assert float(jnp.max(jnp.abs(out[:, 6:] - out2[:, 6:]))) > 1e-3


def test_mixed_chunk_bfloat16_stays_close(rng):
    qq, kq, ql, kl, v = inputs(rng, 1, 40, 8, 8)
    full = mixed_chunk_attention(qq, kq, ql, kl, v, chunk_size=8, causal=True)
    half = mixed_chunk_attention(*(x.astype(jnp.bfloat16) for x in (qq, kq, ql, kl, v)),
                                 chunk_size=8, causal=True)
    assert half.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(full)))
    assert float(jnp.max(jnp.abs(half.astype(jnp.float32) - full))) < 0.05 * scale


def test_decode_steps_equal_mixed_chunk_forward(rng):
    qq, kq, ql, kl, v = inputs(rng, 2, 10, 4, 3)
    full = mixed_chunk_attention(qq, kq, ql, kl, v, chunk_size=4, causal=True,
                                 bias=slope_bias(0.1))
    cache = init_mixed_chunk_cache(2, 4, 4, 3)
    step = jax.jit(lambda c, t, *xs: mixed_chunk_decode_step(c, *xs, t, chunk_size=4,
                                                             bias=slope_bias(0.1)))
    outs = []
    for t in range(10):
        out, cache = step(cache, jnp.asarray(t, jnp.int32), qq[:, t], kq[:, t], ql[:, t],
                          kl[:, t], v[:, t])
        outs.append(out)
        assert cache["keys"].shape == (2, 4, 4)  # O(chunk) memory at every step
    np.testing.assert_allclose(jnp.stack(outs, 1), full, **TOL)


def test_rejects_bad_chunk_size(rng):
    with pytest.raises(ValueError, match="chunk_size"):
        mixed_chunk_attention(*inputs(rng, 1, 4, 2, 2), chunk_size=0, causal=True)


# ----------------------------------------------------------------------------------------------
# Quadratic attention (FLASH-Quad)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [None, 16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block_size", [None, 4, 5])
def test_quadratic_equals_direct_formula(rng, causal, block_size, length):
    q, k, _, _, v = inputs(rng, 2, 13, 6, 5)
    out = quadratic_attention(q, k, v, causal=causal, bias=slope_bias(0.05),
                              block_size=block_size, length=length)
    np.testing.assert_allclose(out, ref_quadratic(q, k, v, causal, slope=0.05, length=length),
                               **TOL)


def test_quadratic_blocked_gradients_equal_unblocked(rng):
    q, k, _, _, v = inputs(rng, 1, 11, 4, 3)

    def loss(q, k, v, block):
        return jnp.sum(quadratic_attention(q, k, v, causal=True, block_size=block) ** 2)

    blocked = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, 4)
    plain = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, None)
    for got, want in zip(blocked, plain):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [None, 16])
def test_quadratic_prefix_does_not_depend_on_length(rng, length):
    """T is a constant or counts the keys in view, never the row's length: a prefix gives the
    same outputs."""
    q, k, _, _, v = inputs(rng, 1, 12, 4, 3)
    full = quadratic_attention(q, k, v, causal=True, length=length)
    prefix = quadratic_attention(q[:, :7], k[:, :7], v[:, :7], causal=True, length=length)
    np.testing.assert_allclose(full[:, :7], prefix, **TOL)


# ----------------------------------------------------------------------------------------------
# The GAU module against the paper's formula, parameter by parameter
# ----------------------------------------------------------------------------------------------

def gau_params(gau, x, rng):
    """Initialised parameters with O(1) scales and offsets, so attention is far from zero."""
    params = nn.unbox(gau.init(jax.random.PRNGKey(1), x, jnp.arange(x.shape[1]))["params"])
    params["gamma"] = jnp.asarray(rng.normal(size=params["gamma"].shape) * 0.7, jnp.float32)
    params["beta"] = jnp.asarray(rng.normal(size=params["beta"].shape) * 0.3, jnp.float32)
    return params


def ref_gau(params, x, chunk_size, causal):
    """U, V, Z = SiLU projections; per-dim scale+offset of Z; RoPE on every query and key;
    (U ⊙ Â) W_o with Â the quadratic (chunk_size None) or mixed chunk attention."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    pos = np.arange(x.shape[1], dtype=np.float64)
    u = silu(x @ p["wu"]["kernel"])
    v = silu(x @ p["wv"]["kernel"])
    z = silu(x @ p["wz"]["kernel"])
    qk = [ref_rope(z * g + b, pos) for g, b in zip(p["gamma"], p["beta"])]
    if chunk_size is None:
        attended = ref_quadratic(qk[0], qk[1], v, causal)
    else:
        attended = ref_mixed_chunk(*qk, v, chunk_size, causal)
    return (u * attended) @ p["wo"]["kernel"]


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_gau_equals_paper_formula(rng, chunk_size, causal):
    """FLASH-Quad is the GAU with full quadratic attention; FLASH swaps in mixed chunk attention
    over four transforms (q_quad, k_quad, q_lin, k_lin) of the one shared Z."""
    x = jnp.asarray(rng.normal(size=(2, 10, 8)), jnp.float32)
    gau = GatedAttentionUnit(expansion_dim=12, qk_dim=6, position=RoPE(), chunk_size=chunk_size,
                             causal=causal)
    params = gau_params(gau, x, rng)
    assert params["gamma"].shape == (2 if chunk_size is None else 4, 6)
    out = gau.apply({"params": params}, x, jnp.arange(10))
    np.testing.assert_allclose(out, ref_gau(params, x, chunk_size, causal), rtol=1e-4, atol=1e-5)


def test_gau_parameter_count_is_half_a_transformer_block():
    """d(2e + s) + ed + 2·4·s with e = 2d: 6d² + ds + 8s, against 12d² for attention + MLP."""
    d, s = 16, 8
    gau = GatedAttentionUnit(expansion_dim=2 * d, qk_dim=s, position=NoPE(), chunk_size=4)
    params = gau.init(jax.random.PRNGKey(0), jnp.ones((1, 4, d)), jnp.arange(4))["params"]
    count = sum(a.size for a in jax.tree_util.tree_leaves(nn.unbox(params)))
    assert count == 6 * d * d + d * s + 8 * s


@pytest.mark.parametrize("position, score_bias, slope", [
    (ALiBi(), None, 2.0 ** -8), (NoPE(), ALiBi(), 2.0 ** -8), (ALiBi(), ALiBi(), 2.0 ** -7)])
def test_gau_relative_biases_add_inside_the_kernel(rng, position, score_bias, slope):
    """The position scheme's and `score_bias`'s relative biases add up to the paper's b inside
    relu²: with ALiBi (one head: slope 2^-8) each contributes -2^-8·(i - j)."""
    x = jnp.asarray(rng.normal(size=(1, 9, 8)), jnp.float32)
    gau = GatedAttentionUnit(expansion_dim=8, qk_dim=6, position=position, chunk_size=None,
                             score_bias=score_bias)
    params = gau_params(gau, x, rng)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    xs = np.asarray(x, np.float64)
    z = silu(xs @ p["wz"]["kernel"])
    q, k = (z * g + b for g, b in zip(p["gamma"], p["beta"]))
    attended = ref_quadratic(q, k, silu(xs @ p["wv"]["kernel"]), True, slope=slope)
    want = (silu(xs @ p["wu"]["kernel"]) * attended) @ p["wo"]["kernel"]
    np.testing.assert_allclose(gau.apply({"params": params}, x, jnp.arange(9)), want,
                               rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Decoding: `init(..., decode=True)` creates the cache, later calls reproduce the forward pass
# ----------------------------------------------------------------------------------------------

DECODE_SCHEMES = {
    "rope": dict(position=RoPE()),
    "xpos": dict(position=XPos()),
    "t5_bias": dict(position=NoPE(), score_bias=T5Buckets(num_buckets=8, max_distance=16)),
    "alibi_rope": dict(position=RoPE(), score_bias=ALiBi()),
    "rope_fixed_t": dict(position=RoPE(), quadratic_length=8),  # the paper's constant T
}


def decoding_setup(rng, chunk_size, scheme, n=11):
    """(forward GAU, decoding GAU, params with O(1) gamma/beta, the cache made by init, x)."""
    x = jnp.asarray(rng.normal(size=(2, n, 8)), jnp.float32)
    kwargs = dict(expansion_dim=12, qk_dim=6, chunk_size=chunk_size, **DECODE_SCHEMES[scheme])
    forward, decoding = GatedAttentionUnit(**kwargs), GatedAttentionUnit(decode=True, **kwargs)
    # The cache is created by init under decode=True, from the full-length input.
    init_out, variables = decoding.init_with_output(jax.random.PRNGKey(1), x, jnp.arange(n))
    params = nn.unbox(variables["params"])
    # ... and that call is the ordinary forward pass.
    np.testing.assert_allclose(init_out, forward.apply({"params": params}, x, jnp.arange(n)),
                               rtol=1e-5, atol=1e-6)
    params["gamma"] = jnp.asarray(rng.normal(size=params["gamma"].shape) * 0.7, jnp.float32)
    params["beta"] = jnp.asarray(rng.normal(size=params["beta"].shape) * 0.3, jnp.float32)
    assert all(not np.any(leaf) for leaf in jax.tree_util.tree_leaves(variables["cache"]))
    return forward, decoding, params, variables["cache"], x


def decode_in_calls(decoding, params, cache, x, tokens_per_call):
    """Decodes x in consecutive calls of the given numbers of tokens; outputs concatenated."""
    step = jax.jit(lambda params, cache, xs, pos: decoding.apply(
        {"params": params, "cache": cache}, xs, pos, mutable=["cache"]))
    outs, t = [], 0
    for m in tokens_per_call:
        out, mutated = step(params, cache, x[:, t:t + m], jnp.arange(t, t + m, dtype=jnp.int32))
        cache = mutated["cache"]
        outs.append(out)
        t += m
    assert t == x.shape[1]
    return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("scheme", sorted(DECODE_SCHEMES))
def test_flash_quad_decoding_equals_forward(rng, scheme):
    """FLASH-Quad keeps every key (unrotated) and value: several tokens per call (a prompt, then
    single tokens and pairs) and one token per call both equal the forward pass, for rotary
    (RoPE, XPos) and relative-bias schemes."""
    forward, decoding, params, cache, x = decoding_setup(rng, None, scheme)
    n = x.shape[1]
    assert cache["kv_cache"]["keys"].shape == (2, n, 1, 6)  # keys of every position
    assert cache["kv_cache"]["values"].shape == (2, n, 1, 12)
    want = forward.apply({"params": params}, x, jnp.arange(n))
    for calls in ([4, 1, 3, 1, 2], [1] * n):
        got, _ = decode_in_calls(decoding, params, cache, x, calls)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=str(calls))
    # The comparison is not vacuous: the outputs depend on earlier tokens.
    changed = forward.apply({"params": params}, x.at[:, 0].set(1.0), jnp.arange(n))
    assert float(jnp.max(jnp.abs(changed[:, -1] - want[:, -1]))) > 1e-3


@pytest.mark.parametrize("scheme", ["rope", "t5_bias"])
def test_flash_decoding_one_token_per_call_equals_forward(rng, scheme):
    """FLASH (mixed chunk) decodes one token per call from the cache init creates; a ragged
    length crosses two chunk boundaries."""
    forward, decoding, params, cache, x = decoding_setup(rng, 4, scheme, n=10)
    assert cache["keys"].shape == (2, 4, 6)  # O(chunk) memory
    want = forward.apply({"params": params}, x, jnp.arange(10))
    got, _ = decode_in_calls(decoding, params, cache, x, [1] * 10)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_gau_decoding_rejects_what_it_cannot_reproduce():
    x = jnp.ones((1, 8, 8))
    positions = jnp.arange(8, dtype=jnp.int32)
    # FLASH with XPos: refused when the cache is created.
    flash_xpos = GatedAttentionUnit(expansion_dim=8, qk_dim=4, chunk_size=4, decode=True,
                                    position=XPos())
    with pytest.raises(ValueError, match="XPos"):
        flash_xpos.init(jax.random.PRNGKey(0), x, positions)
    # FLASH takes one token per call once the cache exists.
    flash = GatedAttentionUnit(expansion_dim=8, qk_dim=4, chunk_size=4, decode=True)
    variables = flash.init(jax.random.PRNGKey(0), x, positions)
    with pytest.raises(ValueError, match="one token per call"):
        flash.apply(variables, x[:, :2], positions[:2], mutable=["cache"])
    # Neither decodes bidirectionally.
    for chunk_size in (None, 4):
        gau = GatedAttentionUnit(expansion_dim=8, qk_dim=4, chunk_size=chunk_size, decode=True,
                                 causal=False)
        with pytest.raises(ValueError, match="causal"):
            gau.init(jax.random.PRNGKey(0), x, positions)
