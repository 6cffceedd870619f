"""FLASH and FLASH-Quad language models: gin builds, causality at any length, position schemes,
gradients, decoding equals the forward pass, FLOP accounting, and a tiny run whose loss falls."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lexjax
from lexjax.training.losses import shift_right, token_losses
from lexjax.training.state import check_logical_axes

TINY = ["NUM_LAYERS=1", "EMBED_DIM=16", "MLP_DIM=32", "VOCAB_SIZE=32", "CHUNK_SIZE=4",
        "lexjax.models.Flash.qk_dim=8"]
CONFIGS = {"flash": "configs/models/flash.gin", "flash_quad": "configs/models/flash_quad.gin"}


def build(name, *extra_gins, bindings=()):
    return lexjax.build_model([CONFIGS[name], *extra_gins], TINY + list(bindings))


def lively(variables, rng):
    """Parameters whose query/key scales are O(1), so attention is far from its near-zero init."""
    params = nn.unbox(variables["params"])
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    leaves = [jnp.asarray(rng.normal(size=x.shape) * 0.8, x.dtype)
              if jax.tree_util.keystr(path).endswith("['gamma']") else x for path, x in flat]
    return {"params": jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves)}


def tokens(rng, b, n, vocab=32):
    return jnp.asarray(rng.integers(1, vocab, (b, n)), jnp.int32)


@pytest.mark.parametrize("name", ["flash", "flash_quad"])
def test_builds_from_gin_with_annotated_parameters(name, rng):
    model = build(name)
    assert isinstance(model, lexjax.models.Flash)
    assert model.chunk_size == (4 if name == "flash" else None)
    variables = model.init(jax.random.PRNGKey(0), tokens(rng, 1, 8))
    check_logical_axes(variables["params"])
    units = [k for k in variables["params"] if k.startswith("unit_")]
    assert len(units) == 2  # two GAUs per Transformer-equivalent layer
    gau = nn.unbox(variables["params"])["unit_0"]["gau"]
    assert gau["wu"]["kernel"].shape == (16, 16)  # e = MLP_DIM / 2
    assert gau["wz"]["kernel"].shape == (16, 8)


@pytest.mark.parametrize("name", ["flash", "flash_quad"])
@pytest.mark.parametrize("n", [12, 10])  # whole chunks and a ragged length
def test_causal_at_any_length(name, n, rng):
    model = build(name)
    variables = lively(model.init(jax.random.PRNGKey(0), tokens(rng, 1, 8)), rng)
    x = tokens(rng, 2, n)
    y = model.apply(variables, x)
    assert y.shape == (2, n, 32) and y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))
    cut = 5
    y2 = model.apply(variables, x.at[:, cut:].set((x[:, cut:] + 3) % 32))
    np.testing.assert_allclose(y[:, :cut], y2[:, :cut], rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(y[:, cut:] - y2[:, cut:]))) > 1e-4


@pytest.mark.parametrize("scheme", ["nope", "sinusoidal", "learned", "xpos", "alibi", "sandwich",
                                    "kerple", "t5"])
def test_every_position_scheme_runs_causally(scheme, rng):
    model = build("flash", f"configs/positions/{scheme}.gin")
    variables = lively(model.init(jax.random.PRNGKey(0), tokens(rng, 1, 8)), rng)
    x = tokens(rng, 1, 9)
    y = model.apply(variables, x)
    y2 = model.apply(variables, x.at[:, 6:].set(1))
    assert bool(jnp.all(jnp.isfinite(y)))
    np.testing.assert_allclose(y[:, :6], y2[:, :6], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["flash", "flash_quad"])
def test_gradients_finite_and_reach_the_attention(name, rng):
    model = build(name, bindings=["lexjax.models.Flash.remat_policy='full'"])
    variables = lively(model.init(jax.random.PRNGKey(0), tokens(rng, 1, 8)), rng)
    x = tokens(rng, 2, 11)

    def loss(params):
        return jnp.mean(token_losses(model.apply({"params": params}, shift_right(x)), x))

    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    for unit in ("unit_0", "unit_1"):
        assert float(jnp.max(jnp.abs(grads[unit]["gau"]["gamma"]))) > 0


@pytest.mark.parametrize("scheme", ["rope", "t5", "sinusoidal"])
def test_decoding_reproduces_the_forward_pass(scheme, rng):
    """Token-by-token decoding over three chunks and a partial fourth (ragged) equals the full
    forward pass; the cache keeps one chunk of keys/values and the cross-chunk state."""
    model = build("flash", f"configs/positions/{scheme}.gin")
    variables = lively(model.init(jax.random.PRNGKey(0), tokens(rng, 1, 8)), rng)
    x = tokens(rng, 2, 14)
    full = model.apply(variables, x)

    step = jax.jit(lambda cache, token: model.apply({**variables, "cache": cache}, token,
                                                    decode=True, mutable=["cache"]))
    cache = model.init_cache(2)
    assert cache["unit_0"]["gau"]["keys"].shape == (2, 4, 8)
    logits = []
    for t in range(x.shape[1]):
        out, state = step(cache, x[:, t:t + 1])
        cache = state["cache"]
        logits.append(out)
    assert int(cache["index"]) == 14
    np.testing.assert_allclose(jnp.concatenate(logits, 1), full, rtol=1e-4, atol=1e-4)


def test_decoding_refuses_flash_quad_and_several_tokens(rng):
    quad = build("flash_quad")
    with pytest.raises(ValueError, match="decoding"):
        quad.init_cache(1)
    model = build("flash")
    variables = model.init(jax.random.PRNGKey(0), tokens(rng, 1, 8))
    with pytest.raises(ValueError, match="one token"):
        model.apply({**variables, "cache": model.init_cache(1)}, tokens(rng, 1, 2), decode=True,
                    mutable=["cache"])


def test_flops_per_token_by_hand():
    model = build("flash")  # d=16, e=16, s=8, C=4, 2 units, vocab 32
    d, e, s, c = 16, 16, 8, 4
    unit = d * (3 * e + s) + (s + e) * (c + 1) / 2 + 2 * s * e
    assert model.flops_per_token(64) == pytest.approx(2 * (2 * unit + d * 32))
    assert model.flops_per_token(4096) == model.flops_per_token(64)  # linear in length
    quad = build("flash_quad")
    unit = d * (3 * e + s) + (s + e) * (64 + 1) / 2
    assert quad.flops_per_token(64) == pytest.approx(2 * (2 * unit + d * 32))


def test_bad_chunk_size_is_a_clear_error(rng):
    model = build("flash", bindings=["CHUNK_SIZE=0"])
    with pytest.raises(ValueError, match="chunk_size"):
        model.init(jax.random.PRNGKey(0), tokens(rng, 1, 8))


@pytest.mark.parametrize("name", ["flash", "flash_quad"])
def test_tiny_training_run_loss_falls(name, rng):
    model = build(name)
    pattern = np.tile(np.arange(1, 9), 4)[None, :24]  # a periodic sequence: attention helps
    batch = jnp.asarray(np.repeat(pattern, 4, 0), jnp.int32)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), batch)["params"])
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state):
        def loss(p):
            return jnp.mean(token_losses(model.apply({"params": p}, shift_right(batch),
                                                     deterministic=False), batch))
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    losses = []
    for _ in range(40):
        params, opt_state, value = train_step(params, opt_state)
        losses.append(float(value))
    assert losses[-1] < 0.5 * losses[0], losses
