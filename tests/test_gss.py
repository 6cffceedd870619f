"""GSS and GSS-Transformer built through gin: causality at ragged lengths, incremental decoding
against the full forward, the layer pattern, FLOP accounting against the parameter count,
logical axes, dtypes, dropout and a tiny training run."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lexjax
from lexjax.layers.ssm import fft_conv_flops
from lexjax.models import GSSTransformer
from lexjax.models.gss import GSSLayer
from lexjax.training.state import check_logical_axes

VOCAB = 64
TINY = ("NUM_LAYERS=2", "EMBED_DIM=32", "NUM_HEADS=4", "MLP_DIM=64", f"VOCAB_SIZE={VOCAB}",
        "CHUNK_SIZE=8")
SMALL_SSM = ("lexjax.models.GSS.state_dim=16", "lexjax.models.GSSTransformer.state_dim=16")


def tokens(batch, length, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, VOCAB, (batch, length)), jnp.int32)


@functools.lru_cache(maxsize=None)
def initialized(name, *bindings):
    model = lexjax.build_model([f"configs/models/{name}.gin"], TINY + SMALL_SSM + bindings)
    return model, jax.jit(model.init)(jax.random.PRNGKey(0), tokens(1, 16))


def assert_causal(model, variables, length, positions):
    """Changing the token at each of `positions` (one sequence each) leaves the logits before it
    unchanged and moves the logits from it on."""
    base = tokens(1, length, seed=length)
    batch = jnp.concatenate([base] + [base.at[:, p].set((base[:, p] + 7) % VOCAB)
                                      for p in positions])
    logits = jax.jit(model.apply)(variables, batch)
    assert logits.shape == (len(batch), length, VOCAB) and logits.dtype == jnp.float32
    for i, p in enumerate(positions, start=1):
        np.testing.assert_allclose(logits[i, :p], logits[0, :p], atol=2e-5)
        assert float(jnp.max(jnp.abs(logits[i, p:] - logits[0, p:]))) > 1e-3


@pytest.mark.parametrize("name", ["gss", "gss_transformer"])
def test_causal_at_ragged_lengths(name):
    model, variables = initialized(name)
    assert_causal(model, variables, 1, [0])
    assert_causal(model, variables, 30, [0, 3, 12, 29])  # chunks of 8: a ragged last chunk


def test_decoding_equals_forward():
    model, variables = initialized("gss")
    toks = tokens(2, 21, seed=3)
    full = jax.jit(model.apply)(variables, toks)
    step = jax.jit(lambda v, t: model.apply(v, t, decode=True, mutable=["cache"]))
    cache, outs = model.init_cache(2), []
    assert cache["layer_0"]["ssm_state"].shape == (2, 8, 16)  # [batch, H = E/4, N]
    for t in range(21):
        logits, updated = step({"params": variables["params"], "cache": cache}, toks[:, t:t + 1])
        cache = updated["cache"]
        outs.append(logits[:, 0])
    np.testing.assert_allclose(jnp.stack(outs, 1), full, rtol=1e-4, atol=1e-4)


def test_decoding_takes_one_token():
    model, variables = initialized("gss")
    with pytest.raises(ValueError, match="one token per call"):
        model.apply({"params": variables["params"], "cache": model.init_cache(1)}, tokens(1, 2),
                    decode=True, mutable=["cache"])


def test_hybrid_layer_pattern():
    model = lexjax.build_model(["configs/models/gss_transformer.gin"], TINY + ("NUM_LAYERS=6",))
    assert [model.is_attention_layer(i) for i in range(6)] == [False, True, False, False, False,
                                                                True]
    params = initialized("gss_transformer")[1]["params"]
    assert "attention" in params["layer_1"] and "ssm" in params["layer_0"]
    every = GSSTransformer(VOCAB, 3, 16, 2, 32, attention_every=1)
    assert all(every.is_attention_layer(i) for i in range(3))


def projection_flops(params) -> float:
    """2 FLOPs per weight of every projection kernel (the per-token matmul cost)."""
    leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]
    return sum(2.0 * leaf.size for path, leaf in leaves
               if jax.tree_util.keystr(path).endswith("['kernel']"))


def test_flops_per_token_counts_projections_ssm_and_logits():
    model, variables = initialized("gss")
    h, n = model.ssm_channels, model.state_dim
    length = 128
    ssm = 4.0 * h * n + h * (fft_conv_flops(length) + 2)
    want = projection_flops(variables["params"]) + model.num_layers * ssm + 2.0 * 32 * VOCAB
    assert model.flops_per_token(length) == pytest.approx(want)


def test_paper_defaults_and_axes():
    model = lexjax.build_model(["configs/models/gss.gin"])
    assert (model.embed_dim, model.mlp_dim, model.ssm_channels, model.state_dim) == (
        1024, 4096, 256, 512)
    for name in ("gss", "gss_transformer"):
        _, variables = initialized(name)
        check_logical_axes(variables["params"])


def test_bfloat16_compute():
    model = lexjax.build_model(["configs/models/gss.gin"],
                               TINY + SMALL_SSM + ('DTYPE="bfloat16"',))
    fp32, variables = initialized("gss")
    toks = tokens(2, 16)
    low, high = jax.jit(model.apply)(variables, toks), jax.jit(fp32.apply)(variables, toks)
    assert low.dtype == jnp.float32
    assert float(jnp.mean(jnp.abs(low - high))) < 0.1 * float(jnp.mean(jnp.abs(high)))


def test_dropout_only_when_not_deterministic():
    model, variables = initialized("gss", "lexjax.models.GSS.dropout_rate=0.5")
    toks = tokens(2, 16)
    apply = jax.jit(model.apply, static_argnames="deterministic")
    plain = apply(variables, toks, deterministic=True)
    np.testing.assert_allclose(plain, jax.jit(initialized("gss")[0].apply)(variables, toks),
                               atol=1e-5)
    noisy = apply(variables, toks, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert float(jnp.max(jnp.abs(noisy - plain))) > 1e-3


def test_gss_layer_matches_the_papers_equations(rng):
    """One layer against the pseudocode written out in numpy (float64)."""
    layer = GSSLayer(expansion_dim=12, ssm_dim=4, state_dim=5)
    x = rng.normal(size=(1, 9, 6))
    variables = jax.jit(layer.init)(jax.random.PRNGKey(0), jnp.zeros((1, 9, 6)))
    got = jax.jit(layer.apply)(variables, jnp.asarray(x, jnp.float32))
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), nn.unbox(variables["params"]))

    def ln(a, scale, bias):
        mu, var = a.mean(-1, keepdims=True), a.var(-1, keepdims=True)
        return (a - mu) / np.sqrt(var + 1e-6) * scale + bias

    def gelu(a):
        return np.asarray(jax.nn.gelu(jnp.asarray(a, jnp.float32)), np.float64)

    xt = ln(x, p["norm"]["scale"], p["norm"]["bias"])
    u = gelu(xt @ p["wu"]["kernel"])
    v = ln(gelu(xt @ p["wv"]["kernel"]), p["ssm_norm"]["scale"], p["ssm_norm"]["bias"])
    s = p["ssm"]
    lam = -np.exp(s["lambda_log_neg_re"]) + 1j * np.exp(s["lambda_log_im"])
    c = (s["c_re"] + 1j * s["c_im"]) * (np.exp(lam) - 1) / lam
    kernel = np.einsum("hn,nl->hl", c, np.exp(lam[:, None] * np.arange(9))).real
    y = np.stack([sum(kernel[:, t - j] * v[0, j] for j in range(t + 1)) for t in range(9)])[None]
    y = y + s["d"] * v
    want = ((y @ p["wy"]["kernel"]) * u) @ p["wo"]["kernel"] + x
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_finite_at_long_length():
    model, variables = initialized("gss")
    logits = jax.jit(model.apply)(variables, tokens(1, 8192))
    assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("name", ["gss", "gss_transformer"])
def test_tiny_training_run_loss_falls(name):
    model, variables = initialized(name)
    params = nn.unbox(variables["params"])
    toks = tokens(4, 32, seed=7)
    optimizer = optax.adam(3e-3)

    def loss_fn(p):
        logits = model.apply({"params": p}, toks[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()

    @jax.jit
    def step(p, state):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    state = optimizer.init(params)
    losses = []
    for _ in range(25):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.5


def test_remat_gives_the_same_gradients():
    model, variables = initialized("gss_transformer")
    remat = lexjax.build_model(["configs/models/gss_transformer.gin"],
                               TINY + SMALL_SSM
                               + ('lexjax.models.GSSTransformer.remat_policy="full"',))
    params, toks = nn.unbox(variables["params"]), tokens(2, 20)

    def grads(m):
        return jax.jit(jax.grad(lambda p: jnp.mean(m.apply({"params": p}, toks) ** 2)))(params)

    for got, want in zip(jax.tree_util.tree_leaves(grads(remat)),
                         jax.tree_util.tree_leaves(grads(model))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
