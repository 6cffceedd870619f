"""Ripple attention (lexjax.layers.ripple): rings against a hand-worked grid and a double loop;
the summed-area-table programme against the dense O(N^2) form in float64 (outputs and gradients,
with and without padding keys); equal ring weights against plain linear attention written out
directly; the attention module's and the block's contracts and errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lexjax.attention import MaskSpec
from lexjax.layers.ripple import (RippleAttention, RippleLayer, elu_plus_one, ring_index,
                                  ripple_attention, ripple_attention_reference)
from lexjax.positions import NoPE

GRIDS = [(1, 5), (3, 4), (4, 3), (5, 5)]
THRESHOLDS = [1, 2, 9]  # 9: past every ring of these grids


def loop_rings(height, width, threshold):
    """ring[q, k] = min(max(|di|, |dj|), threshold), by a double loop over the grid cells."""
    n = height * width
    ring = np.zeros((n, n), int)
    for q in range(n):
        for k in range(n):
            di, dj = q // width - k // width, q % width - k % width
            ring[q, k] = min(max(abs(di), abs(dj)), threshold)
    return ring


def features(rng, batch, n, heads, m, d, rings, dtype=np.float64):
    """Positive q, k features, values, positive ring weights `[heads, rings]`."""
    return (jnp.asarray(rng.uniform(0.05, 2.0, (batch, n, heads, m)), dtype),
            jnp.asarray(rng.uniform(0.05, 2.0, (batch, n, heads, m)), dtype),
            jnp.asarray(rng.normal(size=(batch, n, heads, d)), dtype),
            jnp.asarray(rng.uniform(0.1, 2.0, (heads, rings)), dtype))


def linear_attention(phi_q, phi_k, v):
    """Plain linear attention, phi(q_i) S / phi(q_i) z with S = sum_k phi(k) v^T, z = sum_k
    phi(k): no rings, no grid."""
    s = np.einsum("bkhm,bkhd->bhmd", phi_k, v)
    z = np.sum(phi_k, axis=1)  # [b, h, m]
    return np.einsum("bqhm,bhmd->bqhd", phi_q, s) / np.einsum("bqhm,bhm->bqh", phi_q, z)[..., None]


# ----------------------------------------------------------------------------------------------
# Rings
# ----------------------------------------------------------------------------------------------

def test_ring_index_hand_worked_3x3():
    want = np.array([[0, 1, 2, 1, 1, 2, 2, 2, 2],
                     [1, 0, 1, 1, 1, 1, 2, 2, 2],
                     [2, 1, 0, 2, 1, 1, 2, 2, 2],
                     [1, 1, 2, 0, 1, 2, 1, 1, 2],
                     [1, 1, 1, 1, 0, 1, 1, 1, 1],
                     [2, 1, 1, 2, 1, 0, 2, 1, 1],
                     [2, 2, 2, 1, 1, 2, 0, 1, 2],
                     [2, 2, 2, 1, 1, 1, 1, 0, 1],
                     [2, 2, 2, 2, 1, 1, 2, 1, 0]])
    np.testing.assert_array_equal(ring_index(3, 3, 2), want)
    np.testing.assert_array_equal(ring_index(3, 3, 5), want)
    np.testing.assert_array_equal(ring_index(3, 3, 1), np.minimum(want, 1))


@pytest.mark.parametrize("grid", GRIDS + [(4, 1), (2, 6)])
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_ring_index_matches_double_loop(grid, threshold):
    got = ring_index(*grid, threshold)
    assert got.shape == (grid[0] * grid[1],) * 2
    np.testing.assert_array_equal(got, loop_rings(*grid, threshold))


def test_ring_index_refuses_bad_grids():
    with pytest.raises(ValueError, match="at least 1 x 1, got 0 x 4"):
        ring_index(0, 4, 2)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        ring_index(2, 2, -1)


# ----------------------------------------------------------------------------------------------
# The summed-area-table programme against the dense form
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("masked", [False, True])
def test_programme_matches_reference_float64(rng, grid, threshold, masked):
    height, width = grid
    n = height * width
    with jax.enable_x64(True):
        args = features(rng, 2, n, 2, 3, 4, threshold + 1)
        key_mask = jnp.asarray(rng.uniform(size=(2, n)) < 0.7).at[:, 0].set(True) if masked \
            else None
        projection = jnp.asarray(rng.normal(size=(2, n, 2, 4)))

        def loss(attention):
            def f(*args):
                out = attention(*args, height=height, width=width, key_mask=key_mask)
                return jnp.sum(out * projection)
            return f

        got = ripple_attention(*args, height=height, width=width, key_mask=key_mask)
        want = ripple_attention_reference(*args, height=height, width=width, key_mask=key_mask)
        assert got.dtype == jnp.float64 and got.shape == (2, n, 2, 4)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        grads = jax.grad(loss(ripple_attention), argnums=(0, 1, 2, 3))(*args)
        want_grads = jax.grad(loss(ripple_attention_reference), argnums=(0, 1, 2, 3))(*args)
        for name, g, w in zip(("q", "k", "v", "ring weights"), grads, want_grads):
            assert np.abs(w).max() > 0, name
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12, err_msg=name)


def test_programme_matches_reference_float32_on_8x8(rng):
    args = features(rng, 1, 64, 2, 8, 8, 4, np.float32)
    got = jax.jit(ripple_attention, static_argnames=("height", "width"))(*args, height=8,
                                                                          width=8)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ripple_attention_reference(*args, height=8, width=8),
                               rtol=1e-4, atol=1e-5)


def test_padding_keys_are_ignored(rng):
    q, k, v, w = features(rng, 1, 12, 2, 3, 4, 3, np.float32)
    key_mask = jnp.asarray([[True] * 9 + [False] * 3])
    out = ripple_attention(q, k, v, w, height=3, width=4, key_mask=key_mask)
    changed = ripple_attention(q, k.at[:, 9:].mul(7.0), v.at[:, 9:].add(5.0), w, height=3,
                               width=4, key_mask=key_mask)
    np.testing.assert_allclose(changed, out, rtol=1e-6)
    unmasked = ripple_attention(q, k, v, w, height=3, width=4)
    assert not np.allclose(unmasked, out)
    empty = ripple_attention(q, k, v, w, height=3, width=4, key_mask=jnp.zeros((1, 12), bool))
    np.testing.assert_array_equal(empty, 0.0)


def test_spatial_weights_matter(rng):
    """With all weight on ring 0 each query returns its own value; on rings <= 1, the mean of
    its 3 x 3 neighbourhood's values weighted by phi(q) . phi(k). (float64: a summed-area table
    rounds relative to the row's total, too coarse in float32 for weights 1e-12 apart.)"""
    with jax.enable_x64(True):
        q, k, v, _ = features(rng, 1, 25, 1, 3, 2, 1)
        own = ripple_attention(q, k, v, jnp.asarray([[1.0, 1e-12, 1e-12]]), height=5, width=5)
        near = ripple_attention(q, k, v, jnp.asarray([[1.0, 1.0, 1e-12]]), height=5, width=5)
    np.testing.assert_allclose(own, v, rtol=1e-8, atol=1e-9)
    centre, neighbours = 12, [6, 7, 8, 11, 12, 13, 16, 17, 18]
    scores = np.einsum("m,km->k", q[0, centre, 0], k[0, neighbours, 0])
    want = scores @ np.asarray(v[0, neighbours, 0]) / scores.sum()
    np.testing.assert_allclose(near[0, centre, 0], want, rtol=1e-8)


# ----------------------------------------------------------------------------------------------
# Equal ring weights: plain linear attention
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("threshold", [0, 2, 6])
def test_equal_weights_are_linear_attention(rng, threshold):
    with jax.enable_x64(True):
        q, k, v, _ = features(rng, 2, 20, 2, 3, 4, 1)
        weights = jnp.full((2, threshold + 1), 0.3)
        got = ripple_attention(q, k, v, weights, height=4, width=5)
        uneven = ripple_attention(q, k, v, weights.at[:, min(threshold, 1)].set(3.0), height=4,
                                  width=5)
    np.testing.assert_allclose(got, linear_attention(*map(np.asarray, (q, k, v))), rtol=1e-10)
    # a single weight scales out of the ratio; ring 1's own weight changes the output
    assert np.allclose(uneven, got) == (threshold == 0)


def test_shared_rings_module_is_linear_attention(rng):
    x = jnp.asarray(rng.normal(size=(2, 12, 8)), jnp.float32)
    layer = RippleAttention(num_heads=2, head_dim=4, grid_height=3, grid_width=4,
                            shared_rings=True)
    variables = layer.init(jax.random.PRNGKey(0), x)
    params = nn.unbox(variables)["params"]
    assert set(params) == {"query", "key", "value", "out"}  # no ring parameter

    def project(name):
        return np.einsum("bne,ehd->bnhd", x, params[name]["kernel"])

    phi_q, phi_k = (np.asarray(elu_plus_one(jnp.asarray(project(n)))) for n in ("query", "key"))
    heads = linear_attention(phi_q, phi_k, project("value"))
    want = np.einsum("bnhd,hde->bne", heads, params["out"]["kernel"])
    np.testing.assert_allclose(layer.apply(variables, x), want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The module and the block
# ----------------------------------------------------------------------------------------------

def make_attention(**kwargs):
    fields = dict(num_heads=2, head_dim=4, grid_height=3, grid_width=4, ring_threshold=2)
    return RippleAttention(**{**fields, **kwargs})


def test_attention_contract(rng):
    x = jnp.asarray(rng.normal(size=(2, 12, 8)), jnp.float32)
    layer = make_attention()
    variables = jax.jit(layer.init)(jax.random.PRNGKey(0), x)
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["query"]["kernel"]) == ("embed", "heads", "kv")
    assert tuple(specs["out"]["kernel"]) == ("heads", "kv", "embed")
    assert tuple(specs["ring_log_weights"]) == ("heads", "relpos_buckets")
    log_weights = np.asarray(nn.unbox(variables)["params"]["ring_log_weights"])
    np.testing.assert_allclose(log_weights, [[0.0, -0.5, -1.0], [0.0, -1.0, -2.0]])  # decay

    out = jax.jit(layer.apply)(variables, x)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert not np.allclose(layer.apply(variables, x.at[:, -1].add(1.0))[:, 0], out[:, 0])

    seg = jnp.array([[1] * 10 + [0] * 2, [1] * 12], jnp.int32)
    padded = jax.jit(lambda x: layer.apply(variables, x, None, seg))
    np.testing.assert_allclose(padded(x.at[0, 10:].add(5.0))[0, :10], padded(x)[0, :10],
                               rtol=1e-5, atol=1e-6)

    def loss(params, x):
        return jnp.sum(layer.apply({"params": params}, x) ** 2)

    grads = jax.jit(jax.grad(loss))(variables["params"], x)
    ring_grad = nn.unbox(grads)["ring_log_weights"]
    assert ring_grad.shape == (2, 3) and np.all(np.isfinite(ring_grad))
    assert np.abs(ring_grad).max() > 0


def test_attention_errors(rng):
    x = jnp.zeros((1, 10, 8))
    with pytest.raises(ValueError, match=r"length 10 != grid_height \* grid_width = 3 \* 4"):
        make_attention().init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="ring_threshold must be >= 1"):
        make_attention(ring_threshold=0)
    with pytest.raises(ValueError, match="unknown feature_map"):
        make_attention(feature_map="relu")
    with pytest.raises(ValueError, match="at least 1 x 1"):
        make_attention(grid_height=0)
    with pytest.raises(ValueError, match=r"ring_weights must be \[heads=2"):
        ripple_attention(*features(rng, 1, 12, 2, 3, 4, 2, np.float32)[:3], jnp.ones((3, 2)),
                         height=3, width=4)


def make_layer(**kwargs):
    fields = dict(num_heads=2, head_dim=4, mlp_dim=16, position=NoPE(),
                  mask=MaskSpec(causal=False), grid_height=3, grid_width=4, ring_threshold=2)
    return RippleLayer(**{**fields, **kwargs})


def test_layer_contract(rng):
    x = jnp.asarray(rng.normal(size=(2, 12, 8)), jnp.float32)
    positions = jnp.arange(12)
    layer = make_layer()
    variables = jax.jit(layer.init)(jax.random.PRNGKey(0), x, positions)
    assert nn.unbox(variables)["params"]["attention"]["ring_log_weights"].shape == (2, 3)
    out, _ = jax.jit(layer.apply)(variables, x, positions)
    assert out.shape == x.shape
    shared = make_layer(shared_rings=True)
    shared_vars = shared.init(jax.random.PRNGKey(0), x, positions)
    assert "ring_log_weights" not in nn.unbox(shared_vars)["params"]["attention"]

    def loss(params):
        return jnp.sum(layer.apply({"params": params}, x, positions)[0] ** 2)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(nn.unbox(grads)))


def test_layer_refuses_causal_and_local_masks():
    with pytest.raises(ValueError, match="bidirectional over the whole grid.*no causal"):
        make_layer(mask=MaskSpec(causal=True))
    with pytest.raises(ValueError, match="use MaskSpec\\(causal=False\\)"):
        make_layer(mask=MaskSpec(causal=False, window=2))
