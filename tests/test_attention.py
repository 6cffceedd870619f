"""`attend` and `MaskSpec`: every implementation against an independent float64 numpy softmax
attention whose mask matrix is built here from MaskSpec's documented semantics."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lexjax.attention import IMPLEMENTATIONS, MaskSpec, attend


# ----------------------------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------------------------

def ref_mask(n, spec_args):
    """Visibility `[n, n]` (query, key) from the documented semantics of each mask kind."""
    causal = spec_args.get("causal", True)
    q = np.arange(n)[:, None]
    k = np.arange(n)[None, :]
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
    return (k <= q) if causal else np.ones((n, n), bool)


def ref_attention(q, k, v, mask, bias=None):
    """float64 softmax(q k^T / sqrt(d) + bias) v with GQA (query head h uses kv head
    h // (heads / kv_heads)). `mask [n, n]`, `bias [heads, n, n]` or None."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias[None]
    logits = np.where(mask[None, None], logits, -np.inf)
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


def np_bias_family(coefficients, n):
    """float64 `[heads, n, n]` bias matrix of the same family."""
    rel = (np.arange(n)[:, None] - np.arange(n)[None, :]).astype(np.float64)[None]
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
