"""`attend` and `MaskSpec`: every implementation against an independent float64 numpy softmax
attention whose mask matrix is built here from MaskSpec's documented semantics."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lexjax.attention import IMPLEMENTATIONS, MaskSpec, attend
from lexjax.attention.reference import attend_at_positions


# ----------------------------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------------------------

def ref_visible(q_pos, k_pos, spec_args):
    """Visibility `[len(q_pos), len(k_pos)]` (query, key) from the documented semantics of each
    mask kind, for queries and keys at the given positions."""
    causal = spec_args.get("causal", True)
    q = np.asarray(q_pos)[:, None]
    k = np.asarray(k_pos)[None, :]
    if "window" in spec_args:
        w = spec_args["window"]
        return ((q - w < k) & (k <= q)) if causal else (np.abs(q - k) < w)
    if "chunk" in spec_args:
        c = spec_args["chunk"]
        same = (q // c) == (k // c)
        return (same & (k <= q)) if causal else same
    if "blockwise" in spec_args:
        b = spec_args["blockwise"]
        return (k // b >= q // b - 1) & (k <= q)
    return (k <= q) if causal else np.ones((q.shape[0], k.shape[1]), bool)


def ref_mask(n, spec_args):
    """Visibility `[n, n]` of self-attention over positions 0..n-1."""
    return ref_visible(np.arange(n), np.arange(n), spec_args)


def ref_segment_mask(n, spec_args, segments):
    """`[batch, n, n]`: the mask AND same segment (`segments [batch, n]`)."""
    segments = np.asarray(segments)
    return ref_mask(n, spec_args)[None] & (segments[:, :, None] == segments[:, None, :])


def ref_attention(q, k, v, mask, bias=None):
    """float64 softmax(q k^T / sqrt(d) + bias) v with GQA (query head h uses kv head
    h // (heads / kv_heads)). `mask [q_len, k_len]` or per batch row `[batch, q_len, k_len]`,
    `bias [heads, q_len, k_len]` or None."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias[None]
    mask = mask[:, None] if mask.ndim == 3 else mask[None, None]
    logits = np.where(mask, logits, -np.inf)
    logits = logits - logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def bias_coefficients(kind, heads):
    """Per-head coefficients `[3, heads]` of the test bias family
    bias_h(rel) = c0_h * |rel| + c1_h * sin(0.37 rel + 0.5) + c2_h * rel:
    "alibi" is ALiBi's -slope_h * |rel|; "asym" depends on the sign of rel and differs per head,
    to catch q/k or head mix-ups."""
    c = np.zeros((3, heads))
    if kind == "alibi":
        c[0] = -(2.0 ** (-8.0 * np.arange(1, heads + 1) / heads))
    elif kind == "asym":
        c[1] = np.linspace(0.5, 2.0, heads)
        c[2] = 0.05 * c[1]
    return c


def jax_bias_family(coefficients):
    """The bias callable for `attend` (coefficients may be traced: one compile serves all)."""
    c = jnp.asarray(coefficients, jnp.float32)

    def bias(rel):
        shape = (c.shape[1],) + (1,) * rel.ndim
        r = rel.astype(jnp.float32)
        return (c[0].reshape(shape) * jnp.abs(r) + c[1].reshape(shape) * jnp.sin(0.37 * r + 0.5)
                + c[2].reshape(shape) * r)
    return bias


def np_bias_family(coefficients, n, q_pos=None, k_pos=None):
    """float64 `[heads, n, n]` bias matrix of the same family (or `[heads, q_len, k_len]` for
    queries and keys at positions `q_pos`, `k_pos`)."""
    q_pos = np.arange(n) if q_pos is None else np.asarray(q_pos)
    k_pos = np.arange(n) if k_pos is None else np.asarray(k_pos)
    rel = (q_pos[:, None] - k_pos[None, :]).astype(np.float64)[None]
    c0, c1, c2 = (x[:, None, None] for x in coefficients)
    return c0 * np.abs(rel) + c1 * np.sin(0.37 * rel + 0.5) + c2 * rel


def make_bias(kind, heads):
    """(jax callable rel -> [heads, *rel.shape], numpy builder n -> [heads, n, n] or None)."""
    if kind is None:
        return None, lambda n: None
    c = bias_coefficients(kind, heads)
    return jax_bias_family(c), lambda n: np_bias_family(c, n)


MASKS = {
    "full": {},
    "full_bidir": {"causal": False},
    "window8": {"window": 8},
    "window1": {"window": 1},
    "window13_bidir": {"causal": False, "window": 13},
    "chunk8": {"chunk": 8},
    "chunk6_bidir": {"causal": False, "chunk": 6},
    "blockwise8": {"blockwise": 8},
    "blockwise5": {"blockwise": 5},
}


def _qkv(rng, b, n, heads, kv_heads, d, dtype=jnp.float32):
    q = rng.standard_normal((b, n, heads, d))
    k = rng.standard_normal((b, n, kv_heads, d))
    v = rng.standard_normal((b, n, kv_heads, d))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


# ----------------------------------------------------------------------------------------------
# Outputs and gradients: xla == reference == numpy
# ----------------------------------------------------------------------------------------------

def run(q, k, v, spec, bias=None, impl="xla", block=None):
    """`attend` under jit (one compile per configuration is far cheaper than eager dispatch)."""
    return jax.jit(lambda q, k, v: attend(q, k, v, mask=spec, bias=bias, impl=impl,
                                          block_size=block))(q, k, v)


def compiled_with_bias(spec, impl, block=None):
    """jit(q, k, v, coefficients) -> attend with the bias family; biases change without
    recompiling."""
    return jax.jit(lambda q, k, v, c: attend(q, k, v, mask=spec, bias=jax_bias_family(c),
                                             impl=impl, block_size=block))


@pytest.mark.parametrize("mask_name", sorted(MASKS))
def test_attend_matches_numpy(mask_name, rng):
    """reference and xla (default block) against numpy, without a bias, with ALiBi's and with an
    asymmetric one; GQA (8 query heads, 2 kv heads); a ragged length."""
    b, n, heads, kv_heads, d = 2, 37, 8, 2, 16
    spec_args = MASKS[mask_name]
    spec = MaskSpec(**spec_args)
    mask = ref_mask(n, spec_args)
    q, k, v = _qkv(rng, b, n, heads, kv_heads, d)
    for impl in ("reference", "xla"):
        out = run(q, k, v, spec, None, impl)
        chex.assert_shape(out, (b, n, heads, d))
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out), ref_attention(q, k, v, mask), rtol=1e-5,
                                   atol=2e-5, err_msg=impl)
        with_bias = compiled_with_bias(spec, impl)
        for kind in ("alibi", "asym"):
            c = bias_coefficients(kind, heads)
            want = ref_attention(q, k, v, mask, np_bias_family(c, n))
            np.testing.assert_allclose(np.asarray(with_bias(q, k, v, c)), want, rtol=1e-5,
                                       atol=2e-5, err_msg=f"{impl} {kind}")


@pytest.mark.parametrize("mask_name,block", [(name, 5) for name in sorted(MASKS)] + [
    ("full", 16), ("window8", 16), ("window13_bidir", 16), ("chunk6_bidir", 16),
    ("blockwise5", 16), ("window8", 3)])
def test_attend_xla_block_sizes(mask_name, block, rng):
    """Blocks not aligned with the mask size (5, 3), larger than it (16), ragged length."""
    b, n, heads, kv_heads, d = 1, 37, 4, 2, 8
    spec_args = MASKS[mask_name]
    q, k, v = _qkv(rng, b, n, heads, kv_heads, d)
    c = bias_coefficients("asym", heads)
    want = ref_attention(q, k, v, ref_mask(n, spec_args), np_bias_family(c, n))
    got = compiled_with_bias(MaskSpec(**spec_args), "xla", block)(q, k, v, c)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("n,block,kv_heads,mask_name", [
    (64, 16, 1, "window8"),  # multi-query attention, aligned length
    (3, None, 4, "chunk8"),  # sequence shorter than one block
    (3, None, 4, "full"),
    (50, 24, 4, "window13_bidir"),
    (29, 8, 4, "blockwise8"),
])
def test_attend_shapes(mask_name, n, block, kv_heads, rng):
    spec_args = MASKS[mask_name]
    q, k, v = _qkv(rng, 1, n, 4, kv_heads, 8)
    jax_bias, np_bias = make_bias("asym", 4)
    want = ref_attention(q, k, v, ref_mask(n, spec_args), np_bias(n))
    got = run(q, k, v, MaskSpec(**spec_args), jax_bias, "xla", block)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-5)


def test_attend_auto_is_xla(rng):
    q, k, v = _qkv(rng, 1, 20, 2, 1, 8)
    spec = MaskSpec(window=4)
    want = ref_attention(q, k, v, ref_mask(20, {"window": 4}))
    got = jax.jit(lambda q, k, v: attend(q, k, v, mask=spec))(q, k, v)  # impl="auto"
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("mask_name,bias_kind,block", [
    ("full", None, 8), ("full_bidir", "asym", None), ("window8", "asym", 5),
    ("window13_bidir", "asym", 5), ("chunk8", "alibi", None), ("chunk6_bidir", "asym", 4),
    ("blockwise8", "asym", 5),
])
def test_attend_gradients_xla_equal_reference(mask_name, bias_kind, block, rng):
    b, n, heads, kv_heads, d = 1, 29, 4, 2, 8
    spec = MaskSpec(**MASKS[mask_name])
    q, k, v = _qkv(rng, b, n, heads, kv_heads, d)
    cotangent = jnp.asarray(rng.standard_normal((b, n, heads, d)), jnp.float32)
    jax_bias, _ = make_bias(bias_kind, heads)

    def grads(impl):
        def loss(q, k, v):
            out = attend(q, k, v, mask=spec, bias=jax_bias, impl=impl, block_size=block)
            return jnp.sum(out * cotangent)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    want = grads("reference")
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in want)
    assert all(float(jnp.max(jnp.abs(g))) > 1e-3 for g in want)
    chex.assert_trees_all_close(grads("xla"), want, rtol=1e-4, atol=1e-5)


def test_attend_gradient_matches_finite_differences(rng):
    """The reference gradient itself, against central differences of the numpy float64 model."""
    n, heads, d = 7, 2, 4
    spec_args = {"window": 3}
    q, k, v = (np.asarray(x, np.float64) for x in _qkv(rng, 1, n, heads, heads, d))
    w = rng.standard_normal((1, n, heads, d))
    mask = ref_mask(n, spec_args)
    f = lambda q_: np.sum(ref_attention(q_, k, v, mask) * w)
    g = jax.jit(jax.grad(lambda q_: jnp.sum(attend(q_, jnp.asarray(k, jnp.float32),
                                                   jnp.asarray(v, jnp.float32),
                                                   mask=MaskSpec(**spec_args), impl="xla") * w)))(
        jnp.asarray(q, jnp.float32))
    eps = 1e-6
    fd = np.zeros_like(q)
    for idx in np.ndindex(q.shape):
        e = np.zeros_like(q)
        e[idx] = eps
        fd[idx] = (f(q + e) - f(q - e)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(g), fd, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Packed documents (segment ids): reference == numpy, xla == reference (outputs and gradients)
# ----------------------------------------------------------------------------------------------

# window1 is left out: a query sees only itself, so segments change nothing.
SEGMENT_MASKS = sorted(set(MASKS) - {"window1"})


def packed_segments(n):
    """Two rows of documents with different boundaries (not aligned with any block or mask
    size): row 0 three documents, row 1 four with a one-token document and non-sorted ids."""
    rows = [[0] * 5 + [1] * 14 + [2] * (n - 19),
            [3] * 11 + [7] * 1 + [2] * 12 + [5] * (n - 24)]
    return jnp.asarray(rows, jnp.int32)


@pytest.mark.parametrize("mask_name", SEGMENT_MASKS)
def test_reference_with_segments_matches_numpy(mask_name, rng):
    """A query sees only keys its mask allows AND of its own segment; GQA, asymmetric bias."""
    b, n, heads, kv_heads, d = 2, 37, 4, 2, 8
    spec_args = MASKS[mask_name]
    q, k, v = _qkv(rng, b, n, heads, kv_heads, d)
    segments = packed_segments(n)
    c = bias_coefficients("asym", heads)
    got = jax.jit(lambda q, k, v, s: attend(q, k, v, mask=MaskSpec(**spec_args),
                                            bias=jax_bias_family(c), impl="reference",
                                            segment_ids=s))(q, k, v, segments)
    want = ref_attention(q, k, v, ref_segment_mask(n, spec_args, segments),
                         np_bias_family(c, n))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-5)
    # The segments matter: without them the answer differs.
    assert np.max(np.abs(want - ref_attention(q, k, v, ref_mask(n, spec_args),
                                              np_bias_family(c, n)))) > 1e-2


@pytest.mark.parametrize("mask_name,block", [(name, 8) for name in SEGMENT_MASKS] + [
    ("full", 16), ("window13_bidir", 5), ("chunk6_bidir", 4)])
def test_xla_with_segments_equals_reference(mask_name, block, rng):
    """Blocked attention (local spans; for full masks the map over query blocks, since the block
    is shorter than the ragged length) under segment ids: outputs and dq, dk, dv."""
    b, n, heads, kv_heads, d = 2, 37, 4, 2, 8
    spec = MaskSpec(**MASKS[mask_name])
    q, k, v = _qkv(rng, b, n, heads, kv_heads, d)
    segments = packed_segments(n)
    cotangent = jnp.asarray(rng.standard_normal((b, n, heads, d)), jnp.float32)
    jax_bias, _ = make_bias("asym", heads)

    def out_and_grads(impl):
        def f(q, k, v):
            return attend(q, k, v, mask=spec, bias=jax_bias, impl=impl, block_size=block,
                          segment_ids=segments)

        def run(q, k, v):
            out, pullback = jax.vjp(f, q, k, v)
            return out, pullback(cotangent)
        return jax.jit(run)(q, k, v)

    want_out, want_grads = out_and_grads("reference")
    got_out, got_grads = out_and_grads("xla")
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), rtol=1e-5, atol=2e-5)
    assert all(float(jnp.max(jnp.abs(g))) > 1e-3 for g in want_grads)
    chex.assert_trees_all_close(got_grads, want_grads, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# attend_at_positions: queries and keys at explicit positions
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask_name", ["full", "full_bidir", "window8", "chunk6_bidir",
                                       "blockwise5"])
def test_attend_at_positions_matches_numpy(mask_name, rng):
    """Non-contiguous query and key positions (keys also after the queries), different
    lengths, a per-row `k_valid`, grouped-query heads (6 query heads over 2 kv heads), an
    asymmetric bias of q_pos - k_pos; with and without segments."""
    b, heads, kv_heads, d = 2, 6, 2, 8
    q_pos = np.asarray([3, 7, 8, 15, 20, 26], np.int32)
    k_pos = np.asarray([0, 2, 3, 5, 7, 8, 11, 14, 15, 19, 20, 22, 26, 31], np.int32)
    q = jnp.asarray(rng.standard_normal((b, len(q_pos), heads, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, len(k_pos), kv_heads, d)), jnp.float32)
            for _ in range(2))
    k_valid = rng.random((b, len(k_pos))) < 0.6
    k_valid[:, np.isin(k_pos, q_pos)] = True  # every query sees at least itself
    q_segments = np.asarray([[0, 0, 1, 1, 1, 2], [4, 4, 4, 4, 9, 9]], np.int32)
    k_segments = np.asarray([[0, 0, 0, 1, 0, 1, 1, 1, 1, 2, 1, 2, 2, 2],
                             [4, 4, 4, 4, 4, 4, 9, 4, 4, 9, 9, 9, 9, 4]], np.int32)
    assert all((q_segments[r] == k_segments[r][np.searchsorted(k_pos, q_pos)]).all()
               for r in range(b))
    spec_args = MASKS[mask_name]
    c = bias_coefficients("asym", heads)
    bias = np_bias_family(c, None, q_pos, k_pos)
    visible = ref_visible(q_pos, k_pos, spec_args)[None] & k_valid[:, None, :]

    f = jax.jit(lambda q, k, v, kv, qs, ks: attend_at_positions(
        q, k, v, jnp.asarray(q_pos), jnp.asarray(k_pos), mask=MaskSpec(**spec_args),
        bias=jax_bias_family(c), k_valid=kv, q_segments=qs, k_segments=ks))
    got = f(q, k, v, jnp.asarray(k_valid), None, None)
    chex.assert_shape(got, (b, len(q_pos), heads, d))
    np.testing.assert_allclose(np.asarray(got), ref_attention(q, k, v, visible, bias),
                               rtol=1e-5, atol=2e-5)
    got = f(q, k, v, jnp.asarray(k_valid), jnp.asarray(q_segments), jnp.asarray(k_segments))
    same = q_segments[:, :, None] == k_segments[:, None, :]
    np.testing.assert_allclose(np.asarray(got), ref_attention(q, k, v, visible & same, bias),
                               rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("mask_name", ["full", "window8", "chunk8", "blockwise8"])
def test_attend_bfloat16(mask_name, rng):
    b, n, heads, kv_heads, d = 1, 40, 4, 2, 16
    spec_args = MASKS[mask_name]
    q, k, v = _qkv(rng, b, n, heads, kv_heads, d, jnp.bfloat16)
    jax_bias, np_bias = make_bias("alibi", heads)
    want = ref_attention(np.asarray(q, np.float32), np.asarray(k, np.float32),
                         np.asarray(v, np.float32), ref_mask(n, spec_args), np_bias(n))
    outs = {impl: run(q, k, v, MaskSpec(**spec_args), jax_bias, impl)
            for impl in ("reference", "xla")}
    for impl, out in outs.items():
        assert out.dtype == jnp.bfloat16, impl
        np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=2e-2, atol=3e-2,
                                   err_msg=impl)
    np.testing.assert_allclose(np.asarray(outs["xla"], np.float32),
                               np.asarray(outs["reference"], np.float32), rtol=2e-2, atol=2e-2)


def test_attend_under_jit_with_static_mask(rng):
    q, k, v = _qkv(rng, 1, 24, 2, 2, 8)
    spec = MaskSpec(window=5)
    f = jax.jit(lambda q, k, v, spec: attend(q, k, v, mask=spec, impl="xla"),
                static_argnames="spec")
    want = ref_attention(q, k, v, ref_mask(24, {"window": 5}))
    np.testing.assert_allclose(np.asarray(f(q, k, v, spec=spec)), want, rtol=1e-5, atol=2e-5)
    assert hash(spec) == hash(MaskSpec(window=5)) and spec == MaskSpec(window=5)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(window=4, chunk=4), "at most one"), (dict(window=4, blockwise=4), "at most one"),
    (dict(chunk=2, blockwise=2), "at most one"), (dict(window=0), "window must be a positive"),
    (dict(window=-3), "window must be a positive"), (dict(chunk=0), "chunk must be a positive"),
    (dict(blockwise=-1), "blockwise must be a positive"), (dict(window=2.5), "positive int"),
    (dict(blockwise=4, causal=False), "causal"), (dict(window=True), "positive int"),
])
def test_maskspec_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskSpec(**kwargs)


def test_maskspec_takes_numpy_ints_as_ints():
    spec = MaskSpec(window=np.int64(16))
    assert spec == MaskSpec(window=16) and hash(spec) == hash(MaskSpec(window=16))
    assert type(spec.window) is int and spec.key_blocks_around(8) == (2, 0)


def test_maskspec_kind_and_locality():
    assert MaskSpec().kind == "full" and not MaskSpec().is_local
    assert MaskSpec(causal=False).kind == "full"
    assert MaskSpec(window=3).kind == "window" and MaskSpec(window=3).is_local
    assert MaskSpec(chunk=3).kind == "chunk" and MaskSpec(blockwise=3).kind == "blockwise"
    with pytest.raises(ValueError):
        MaskSpec().key_blocks_around(8)


@pytest.mark.parametrize("kind", ["full", "window", "window_bidir", "chunk", "chunk_bidir",
                                  "blockwise"])
def test_maskspec_max_lookback_is_the_largest_allowed_distance(kind):
    """Brute force over positions 0..63: the largest query - key that `allows` permits."""
    pos = jnp.arange(64, dtype=jnp.int32)
    sizes = [None] if kind == "full" else [1, 2, 3, 5, 8, 13, 32]
    for size in sizes:
        spec_args = {} if size is None else {kind.split("_")[0]: size}
        if kind.endswith("bidir"):
            spec_args["causal"] = False
        spec = MaskSpec(**spec_args)
        allowed = np.asarray(spec.allows(pos[:, None], pos[None, :]))
        rel = np.arange(64)[:, None] - np.arange(64)[None, :]
        largest = int(rel[allowed].max())
        if size is None:
            assert spec.max_lookback is None and largest == 63  # unbounded: grows with length
        else:
            assert spec.max_lookback == largest, (spec_args, spec.max_lookback, largest)
    assert MaskSpec(causal=False).max_lookback is None


@pytest.mark.parametrize("spec_args", list(MASKS.values()), ids=list(MASKS))
def test_maskspec_allows_matches_semantics(spec_args):
    n = 41
    pos = jnp.arange(n, dtype=jnp.int32)
    got = np.asarray(MaskSpec(**spec_args).allows(pos[:, None], pos[None, :]))
    np.testing.assert_array_equal(got, ref_mask(n, spec_args))


def test_attend_shape_errors(rng):
    q, k, v = _qkv(rng, 1, 8, 8, 2, 4)
    with pytest.raises(ValueError, match="batch, length, heads, head_dim"):
        attend(q[0], k[0], v[0])
    _, k3, v3 = _qkv(rng, 1, 8, 8, 3, 4)
    with pytest.raises(ValueError, match="multiple"):
        attend(q, k3, v3)
    with pytest.raises(ValueError):
        attend(q, k, v[:, :, :1])  # k and v disagree on kv heads
    with pytest.raises(ValueError):
        attend(q, k[..., :2], v)  # head_dim of q and k differ


def test_attend_unknown_impl_lists_available(rng):
    q, k, v = _qkv(rng, 1, 8, 2, 2, 4)
    with pytest.raises(ValueError, match="no_such_impl") as info:
        attend(q, k, v, impl="no_such_impl")
    for name in list(IMPLEMENTATIONS) + ["auto"]:
        assert name in str(info.value)
    assert "reference" in str(info.value) and "xla" in str(info.value)


# ----------------------------------------------------------------------------------------------
# key_blocks_around: tight and sufficient, by brute force
# ----------------------------------------------------------------------------------------------

def brute_force_key_blocks(spec_args, block):
    """(before, after) over every alignment: the furthest key blocks any query of a block sees.

    All masks are periodic in the position with period lcm(block, size); query blocks far from
    the start (so no key is cut off by position 0) over two periods cover every case."""
    size = next(v for key, v in spec_args.items() if key != "causal")
    period = block * size // math.gcd(block, size)
    start = ((3 * size + 3 * block) // period + 1) * period  # a multiple of the period
    q = np.arange(start, start + 2 * period)
    k = np.arange(0, start + 2 * period + 3 * size + 3 * block)
    visible = ref_mask(len(k), spec_args)[q]  # rows: queries, columns: keys
    before = after = 0
    for row, qpos in zip(visible, q):
        keys = np.nonzero(row)[0]
        qb = qpos // block
        before = max(before, qb - keys.min() // block)
        after = max(after, keys.max() // block - qb)
    return before, after


def _block_cases():
    rng = np.random.default_rng(123)
    cases = [(1, 1), (1, 7), (7, 1), (8, 8), (8, 16), (16, 8), (6, 4), (4, 6), (12, 8), (5, 3)]
    cases += [tuple(int(x) for x in rng.integers(1, 33, size=2)) for _ in range(40)]
    return cases


@pytest.mark.parametrize("kind", ["window", "window_bidir", "chunk", "chunk_bidir", "blockwise"])
def test_key_blocks_around_is_tight_and_sufficient(kind):
    for block, size in _block_cases():
        spec_args = {kind.split("_")[0]: size}
        if kind.endswith("bidir"):
            spec_args["causal"] = False
        got = MaskSpec(**spec_args).key_blocks_around(block)
        assert got == brute_force_key_blocks(spec_args, block), (spec_args, block)


# ----------------------------------------------------------------------------------------------
# Memory: blocked local attention is O(N * w), not O(N^2) (compiled temp sizes, no timing)
# ----------------------------------------------------------------------------------------------

def _temp_bytes(impl, n, spec, heads=2, d=32):
    shape = jax.ShapeDtypeStruct((1, n, heads, d), jnp.float32)
    fn = jax.jit(lambda q, k, v: attend(q, k, v, mask=spec, impl=impl))
    return fn.lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes


def test_blocked_window_attention_memory_is_well_below_reference():
    spec = MaskSpec(window=64)
    ref = _temp_bytes("reference", 2048, spec)
    xla = _temp_bytes("xla", 2048, spec)
    assert ref >= 2 * 2048 * 2048 * 4  # the reference holds at least the [heads, N, N] logits
    assert xla < 0.25 * ref, (xla, ref)
    # ... and grows linearly: doubling N at most ~doubles the blocked temp memory.
    xla_long = _temp_bytes("xla", 4096, spec)
    assert xla_long < 2.5 * xla, (xla, xla_long)
