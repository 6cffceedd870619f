"""Global tokens (`MaskSpec.global_tokens`): the mask against a numpy matrix built here from the
documented semantics, blocked XLA attention against the materialized reference (outputs and
gradients), the Pallas kernels' refusal, and MaskSpec's validation."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lexjax.attention import MaskSpec, attend
from lexjax.attention.kernels import HeadBias
from lexjax.positions.alibi import alibi_head_bias, alibi_slopes


def ref_mask(n, window=None, chunk=None, global_tokens=0):
    """Visibility `[n, n]` (query, key) of a bidirectional window or chunk mask plus global
    tokens: the first `global_tokens` positions see, and are seen by, every position."""
    q = np.arange(n)[:, None]
    k = np.arange(n)[None, :]
    local = np.abs(q - k) < window if window is not None else q // chunk == k // chunk
    return local | (q < global_tokens) | (k < global_tokens)


def ref_attention(q, k, v, mask, bias=None):
    """float64 softmax(q k^T / sqrt(d) + bias) v with GQA; `mask [batch, n, n]`,
    `bias [heads, n, n]` or None."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias[None]
    logits = np.where(mask[:, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


def alibi(heads):
    """(ALiBi as a `HeadBias`, numpy builder n -> `[heads, n, n]`)."""
    slopes = alibi_slopes(heads)
    bias = HeadBias(fn=alibi_head_bias, params=jnp.asarray(slopes, jnp.float32)[:, None])
    return bias, lambda n: -slopes[:, None, None] * np.abs(np.subtract.outer(np.arange(n),
                                                                             np.arange(n)))


def asymmetric(heads):
    """(A bias that depends on the sign of q - k and on the head, numpy builder): catches
    swapped query and key positions, which ALiBi's |q - k| cannot."""
    c = np.linspace(0.5, 2.0, heads)

    def bias(rel):
        r = rel.astype(jnp.float32)
        return jnp.asarray(c, jnp.float32).reshape((heads,) + (1,) * rel.ndim) * jnp.sin(
            0.37 * r + 0.5)

    def np_bias(n):
        rel = np.subtract.outer(np.arange(n), np.arange(n)).astype(np.float64)
        return c[:, None, None] * np.sin(0.37 * rel + 0.5)[None]
    return bias, np_bias


BIASES = {"none": lambda heads: (None, lambda n: None), "alibi": alibi, "asym": asymmetric}


def packed_segments(b, n):
    """`[b, n]` documents with boundaries inside and right after the global tokens."""
    rows = [[1] * 2 + [2] * 13 + [3] * (n - 15), [4] * 9 + [5] * 1 + [6] * (n - 10)]
    return jnp.asarray(rows[:b], jnp.int32)


def _qkv(rng, b, n, heads, kv_heads, d):
    shapes = [(b, n, heads, d), (b, n, kv_heads, d), (b, n, kv_heads, d)]
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)


LOCAL = {"window5": {"window": 5}, "chunk8": {"chunk": 8}, "chunk6": {"chunk": 6}}


# ----------------------------------------------------------------------------------------------
# The mask: allows and mean_keys_per_query
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("local", sorted(LOCAL))
@pytest.mark.parametrize("global_tokens", [1, 3, 10])
def test_allows_matches_hand_built_matrix(local, global_tokens):
    n = 41
    pos = jnp.arange(n, dtype=jnp.int32)
    spec = MaskSpec(causal=False, global_tokens=global_tokens, **LOCAL[local])
    got = np.asarray(spec.allows(pos[:, None], pos[None, :]))
    np.testing.assert_array_equal(got, ref_mask(n, global_tokens=global_tokens, **LOCAL[local]))


@pytest.mark.parametrize("local", sorted(LOCAL))
@pytest.mark.parametrize("global_tokens", [1, 3, 10])
def test_mean_keys_per_query_counts_the_matrix(local, global_tokens):
    spec = MaskSpec(causal=False, global_tokens=global_tokens, **LOCAL[local])
    for n in (1, 2, 3, 5, 8, 9, 12, 37, 64):
        want = ref_mask(n, global_tokens=global_tokens, **LOCAL[local]).sum() / n
        assert spec.mean_keys_per_query(n) == pytest.approx(want, rel=1e-12), n


def test_local_geometry_is_the_local_masks():
    """key_blocks_around and max_lookback describe the local mask alone."""
    for args in LOCAL.values():
        local, with_global = MaskSpec(causal=False, **args), MaskSpec(causal=False,
                                                                      global_tokens=3, **args)
        assert with_global.key_blocks_around(8) == local.key_blocks_around(8)
        assert with_global.max_lookback == local.max_lookback
        assert with_global.kind == local.kind and with_global.is_local


# ----------------------------------------------------------------------------------------------
# Blocked XLA == reference (outputs and gradients)
# ----------------------------------------------------------------------------------------------

def _out_and_grads(q, k, v, spec, *, impl, bias, block, segments):
    """(output, (dq, dk, dv) of sum(output * cotangent)), jitted."""
    cotangent = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)

    def loss(q, k, v):
        out = attend(q, k, v, mask=spec, bias=bias, impl=impl, block_size=block,
                     segment_ids=segments)
        return jnp.sum(out * cotangent), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


@pytest.mark.parametrize("local,global_tokens,block,bias_kind,heads,kv_heads", [
    ("window5", 1, 8, "alibi", 4, 2),
    ("window5", 3, None, "asym", 4, 2),
    ("window5", 3, 8, "none", 2, 2),   # plain multi-head attention (group axis dropped)
    ("chunk8", 1, None, "asym", 4, 1),
    ("chunk8", 3, 8, "alibi", 4, 2),
    ("chunk6", 3, 8, "asym", 2, 2),    # chunks not aligned with the blocks
    ("chunk6", 10, 4, "asym", 4, 2),   # global tokens spanning several blocks
])
@pytest.mark.parametrize("segmented", [False, True], ids=["one_document", "packed"])
def test_xla_equals_reference(local, global_tokens, block, bias_kind, heads, kv_heads,
                              segmented, rng):
    """Ragged length 37; outputs also against numpy float64; dq, dk, dv against the reference."""
    b, n, d = 2, 37, 8
    spec = MaskSpec(causal=False, global_tokens=global_tokens, **LOCAL[local])
    q, k, v = _qkv(rng, b, n, heads, kv_heads, d)
    bias, np_bias = BIASES[bias_kind](heads)
    segments = packed_segments(b, n) if segmented else None
    mask = ref_mask(n, global_tokens=global_tokens, **LOCAL[local])[None]
    if segmented:
        mask = mask & (np.asarray(segments)[:, :, None] == np.asarray(segments)[:, None, :])
    want_out, want_grads = _out_and_grads(q, k, v, spec, impl="reference", bias=bias,
                                          block=block, segments=segments)
    got_out, got_grads = _out_and_grads(q, k, v, spec, impl="xla", bias=bias, block=block,
                                        segments=segments)
    np.testing.assert_allclose(np.asarray(want_out), ref_attention(q, k, v, mask, np_bias(n)),
                               rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), rtol=1e-5, atol=1e-5)
    assert all(float(jnp.max(jnp.abs(g))) > 1e-3 for g in want_grads)
    chex.assert_trees_all_close(got_grads, want_grads, rtol=1e-4, atol=1e-5)


def test_xla_with_more_global_tokens_than_positions(rng):
    """Every position global: full bidirectional attention."""
    q, k, v = _qkv(rng, 1, 5, 2, 1, 8)
    got = attend(q, k, v, mask=MaskSpec(causal=False, window=2, global_tokens=8), impl="xla")
    want = ref_attention(q, k, v, np.ones((1, 5, 5), bool))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-5)


def test_global_tokens_change_the_output(rng):
    """Non-global queries of a chunk far from the start read the global keys."""
    q, k, v = _qkv(rng, 1, 24, 2, 2, 8)
    local = attend(q, k, v, mask=MaskSpec(causal=False, chunk=8), impl="xla")
    with_global = attend(q, k, v, mask=MaskSpec(causal=False, chunk=8, global_tokens=2),
                         impl="xla")
    assert float(jnp.min(jnp.max(jnp.abs(with_global - local)[0, 8:], axis=(1, 2)))) > 1e-4


def _temp_bytes(impl, n, spec, heads=2, d=32):
    shape = jax.ShapeDtypeStruct((1, n, heads, d), jnp.float32)
    fn = jax.jit(lambda q, k, v: attend(q, k, v, mask=spec, impl=impl))
    return fn.lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes


def test_blocked_memory_stays_linear_with_global_tokens():
    spec = MaskSpec(causal=False, window=32, global_tokens=4)
    ref = _temp_bytes("reference", 2048, spec)
    xla = _temp_bytes("xla", 2048, spec)
    assert xla < 0.25 * ref, (xla, ref)
    assert _temp_bytes("xla", 4096, spec) < 2.5 * xla


# ----------------------------------------------------------------------------------------------
# Implementations that refuse, and "auto"
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["pallas", "pallas_tpu", "pallas_gpu"])
def test_pallas_kernels_refuse_global_tokens(impl, rng):
    q, k, v = _qkv(rng, 1, 16, 2, 2, 8)
    spec = MaskSpec(causal=False, window=4, global_tokens=2)
    with pytest.raises(ValueError, match="global tokens are not supported by the Pallas "
                                         "kernels yet; use attention_impl='xla'"):
        attend(q, k, v, mask=spec, impl=impl)


def test_auto_attends_global_tokens_with_xla(rng):
    q, k, v = _qkv(rng, 1, 20, 2, 1, 8)
    spec = MaskSpec(causal=False, chunk=8, global_tokens=3)
    want = ref_attention(q, k, v, ref_mask(20, chunk=8, global_tokens=3)[None])
    got = jax.jit(lambda q, k, v: attend(q, k, v, mask=spec))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(causal=False, window=4, global_tokens=-1), "non-negative int"),
    (dict(causal=False, window=4, global_tokens=1.0), "non-negative int"),
    (dict(causal=False, window=4, global_tokens=True), "non-negative int"),
    (dict(window=4, global_tokens=2), "needs causal=False"),
    (dict(chunk=4, global_tokens=2), "needs causal=False"),
    (dict(blockwise=4, global_tokens=2), "needs causal=False"),
    (dict(global_tokens=2), "needs causal=False"),
    (dict(causal=False, global_tokens=2),
     r"global tokens only add to a local mask \(window or chunk\)"),
])
def test_maskspec_rejects_bad_global_tokens(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskSpec(**kwargs)


def test_maskspec_global_tokens_numpy_int_and_hash():
    spec = MaskSpec(causal=False, chunk=8, global_tokens=np.int32(3))
    same = MaskSpec(causal=False, chunk=8, global_tokens=3)
    assert type(spec.global_tokens) is int and spec == same and hash(spec) == hash(same)
    assert spec != MaskSpec(causal=False, chunk=8)
    assert MaskSpec(global_tokens=np.int64(0)) == MaskSpec()
