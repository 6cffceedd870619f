"""GSS and GSS-Transformer built through gin: the decoding cache, the layer pattern, FLOP
accounting against the parameter count, the paper's equations and defaults, dtypes, dropout and
remat. (Causality, training, decoding and packed documents for every model:
tests/test_lm_contract.py.)"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lexjax
from helpers import decode_all, projection_flops
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


def test_decoding_keeps_one_ssm_state_per_layer_and_equals_forward():
    model, variables = initialized("gss")
    toks = tokens(2, 21, seed=3)
    decoded, cache = decode_all(model, variables, toks, prompt=4, max_length=32)
    assert cache["layer_0"]["ssm_state"].shape == (2, 8, 16)  # [batch, H = E/4, N]: O(1) in N
    np.testing.assert_allclose(decoded, jax.jit(model.apply)(variables, toks), rtol=1e-4,
                               atol=1e-4)


def test_decoding_takes_one_token():
    model, variables = initialized("gss")
    with pytest.raises(ValueError, match="one token per call"):
        model.apply({**variables, "cache": model.init_cache(1, 4)}, tokens(1, 2), decode=True,
                    mutable=["cache"])


def test_hybrid_layer_pattern():
    model = lexjax.build_model(["configs/models/gss_transformer.gin"], TINY + ("NUM_LAYERS=6",))
    assert [model.is_attention_layer(i) for i in range(6)] == [False, True, False, False, False,
                                                                True]
    params = initialized("gss_transformer")[1]["params"]
    assert "attention" in params["layer_1"] and "ssm" in params["layer_0"]
    every = GSSTransformer(vocab_size=VOCAB, num_layers=3, embed_dim=16, num_heads=2,
                           mlp_dim=32, attention_every=1)
    assert all(every.is_attention_layer(i) for i in range(3))


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
