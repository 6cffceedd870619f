"""Luna (lexjax.layers.luna, lexjax.models.luna) against its definitions, written out in float64
numpy one position at a time: the causal prefix form, the bidirectional pack / unpack, and the
model's independence from the scan's chunk size."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lexjax
from lexjax.layers.luna import (LunaAttention, causal_mean_attention, masked_softmax_attention,
                                pack_weights)

TINY = ["NUM_LAYERS=2", "EMBED_DIM=32", "NUM_HEADS=4", "MLP_DIM=64"]


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def reference_causal_luna(q, c, w):
    """a_t = softmax_l((1/t) sum_{j<=t} (q_t . c_j) w_j), out_t = (1/t) sum_{j<=t} (a_t . w_j)
    c_j, position by position (float64): `q, c [b, n, h, d]`, `w [b, n, h, l]`."""
    q, c, w = (np.asarray(a, np.float64) for a in (q, c, w))
    out = np.zeros_like(q)
    for t in range(q.shape[1]):
        scores = np.einsum("bhd,bjhd,bjhl->bhl", q[:, t], c[:, :t + 1], w[:, :t + 1]) / (t + 1)
        a = softmax(scores)
        out[:, t] = np.einsum("bhl,bjhl,bjhd->bhd", a, w[:, :t + 1], c[:, :t + 1]) / (t + 1)
    return out


@pytest.mark.parametrize("n,chunk", [(13, 4), (16, 16), (9, 32)])
def test_causal_mean_attention_is_the_running_mean(n, chunk, rng):
    x, y = rng.standard_normal((2, 2, n, 3, 5))
    z = rng.standard_normal((2, n, 3, 4))
    got = np.asarray(causal_mean_attention(jnp.asarray(x), jnp.asarray(y), jnp.asarray(z), chunk))
    want = np.stack([np.einsum("bhd,bjhd,bjhe->bhe", x[:, t], y[:, :t + 1], z[:, :t + 1])
                     / (t + 1) for t in range(n)], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [3, 8])
def test_causal_luna_equals_the_per_position_loop(chunk, rng):
    q, c = (jnp.asarray(a, jnp.float32) for a in rng.standard_normal((2, 2, 11, 2, 4)))
    w = pack_weights(jnp.asarray(rng.standard_normal((2, 11, 2, 6)), jnp.float32))
    attention = jax.nn.softmax(causal_mean_attention(q, c, w, chunk), axis=-1)
    got = np.asarray(causal_mean_attention(attention, w, c, chunk))
    np.testing.assert_allclose(got, reference_causal_luna(q, c, w), rtol=1e-4, atol=1e-5)


def test_pack_weights_are_softplus_with_beta_ln2():
    x = np.linspace(-5, 5, 11)
    want = np.log1p(np.exp(np.log(2) * x)) / np.log(2)
    np.testing.assert_allclose(np.asarray(pack_weights(jnp.asarray(x))), want, rtol=1e-6)
    assert float(pack_weights(jnp.zeros(()))) == pytest.approx(1.0)


def test_bidirectional_pack_and_unpack_follow_the_paper(rng):
    """C = softmax(P_q X_c^T / sqrt(d)) X_c; Y = softmax(X_q (C W_c)^T / sqrt(d)) (C W_c) W_o,
    from the layer's own parameters, in numpy; padded keys are left out of the packing."""
    heads, d, embed = 2, 4, 8
    x = rng.standard_normal((1, 7, embed)).astype(np.float32)
    p = rng.standard_normal((1, 3, embed)).astype(np.float32)
    valid = np.array([[True] * 5 + [False] * 2])
    layer = LunaAttention(heads, d)
    variables = layer.init(jax.random.PRNGKey(1), x, p, valid)
    got_y, got_c = layer.apply(variables, x, p, jnp.asarray(valid))
    w = {k: np.asarray(v["kernel"], np.float64) for k, v in nn.unbox(variables)["params"].items()}

    def project(a, name):
        return np.einsum("bne,ehd->bnhd", a, w[name])

    ctx = project(x, "pack_context")
    scores = np.einsum("blhd,bnhd->bhln", project(p, "pack_query"), ctx) / np.sqrt(d)
    scores = np.where(valid[:, None, None, :], scores, -np.inf)
    packed = np.einsum("bhln,bnhd->blhd", softmax(scores), ctx).reshape(1, 3, embed)
    unpacked = project(packed, "context")
    scores = np.einsum("bnhd,blhd->bhnl", project(x, "query"), unpacked) / np.sqrt(d)
    y = np.einsum("bhnl,blhd->bnhd", softmax(scores), unpacked)
    y = np.einsum("bnhd,hde->bne", y, w["out"])
    np.testing.assert_allclose(np.asarray(got_c), packed, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_y), y, rtol=1e-4, atol=1e-5)


def test_masked_softmax_attention_ignores_invalid_keys(rng):
    q, k, v = (jnp.asarray(a, jnp.float32) for a in rng.standard_normal((3, 1, 4, 2, 3)))
    valid = jnp.asarray([[True, True, False, False]])
    full = masked_softmax_attention(q, k[:, :2], v[:, :2])
    np.testing.assert_allclose(np.asarray(masked_softmax_attention(q, k, v, valid)),
                               np.asarray(full), rtol=1e-5, atol=1e-6)


def test_the_scan_chunk_size_does_not_change_the_model(rng):
    tokens = jnp.asarray(rng.integers(0, 200, (2, 37)), jnp.int32)
    small = lexjax.build_model(["configs/models/luna.gin"], TINY + ["CHUNK_SIZE=5"])
    large = lexjax.build_model(["configs/models/luna.gin"], TINY + ["CHUNK_SIZE=64"])
    variables = small.init(jax.random.PRNGKey(0), tokens)
    np.testing.assert_allclose(np.asarray(small.apply(variables, tokens)),
                               np.asarray(large.apply(variables, tokens)), rtol=2e-4, atol=2e-4)


def test_luna_refuses_relative_position_schemes():
    with pytest.raises(lexjax.ConfigError, match="absolute scheme"):
        lexjax.build_model(["configs/models/luna.gin", "configs/positions/rope.gin"], TINY)


def test_a_luna_classifier_trains_on_padded_rows(rng):
    """Classification feeds a model that mixes the whole row its padded rows without segment
    ids (Luna refuses them); the loss and its gradient are finite."""
    from lexjax.objectives import Classification
    model = lexjax.build_model(["configs/models/luna_encoder.gin"], TINY + ["NUM_CLASSES=2"])
    tokens = rng.integers(3, 200, (2, 16)).astype(np.int32)
    segments = np.ones_like(tokens)
    segments[1, 10:] = 0
    tokens[1, 10:] = 0
    batch = {"inputs": jnp.asarray(tokens), "segment_ids": jnp.asarray(segments),
             "label": jnp.asarray([0, 1], jnp.int32)}
    params = model.init(jax.random.PRNGKey(0), batch["inputs"])["params"]
    loss, grads = jax.value_and_grad(lambda p: Classification().loss(
        model, p, batch, rng=jax.random.PRNGKey(1))[0])(params)
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
