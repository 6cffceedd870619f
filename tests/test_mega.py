"""Mega and Mega-chunk built through gin: one Mega layer against the paper's equations (6–15)
written out in numpy, decoding with sharp attention against the full forward (chunked and full,
relative bias and rotary positions), FLOPs, defaults and errors. (Causality, training, decoding
and packed documents for every model: tests/test_lm_contract.py.)"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lexjax
from helpers import decode_all, projection_flops
from lexjax.attention import MaskSpec
from lexjax.layers.ema import ema_flops_per_token
from lexjax.models.mega import MegaLayer
from lexjax.positions import NoPE
from lexjax.training.state import check_logical_axes

VOCAB = 64
TINY = ("NUM_LAYERS=2", "EMBED_DIM=32", "NUM_HEADS=4", "MLP_DIM=64", f"VOCAB_SIZE={VOCAB}",
        "CHUNK_SIZE=8", "lexjax.models.Mega.qk_dim=16", "lexjax.models.Mega.ema_dim=4")
M = "lexjax.models.Mega."


def tokens(batch, length, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, VOCAB, (batch, length)), jnp.int32)


@functools.lru_cache(maxsize=None)
def initialized(*bindings, position="rope"):
    model = lexjax.build_model(["configs/models/mega.gin", f"configs/positions/{position}.gin"],
                               TINY + bindings)
    return model, jax.jit(model.init)(jax.random.PRNGKey(0), tokens(1, 16))


def sharpened(variables):
    """Parameters with N(0, 1) query/key scales, so attention is far from uniform."""
    params = nn.unbox(variables["params"])

    def sharpen(path, x):
        name = jax.tree_util.keystr(path)
        if "qk_scale" in name:
            return jax.random.normal(jax.random.PRNGKey(len(name)), x.shape)
        return x
    return {"params": jax.tree_util.tree_map_with_path(sharpen, params)}


def numpy_mega_layer(x: np.ndarray, params: dict) -> np.ndarray:
    """Eqs. 5–15 in float64 with full causal softmax attention and no position scheme."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), nn.unbox(params))
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    sigmoid = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    e = p["ema"]
    alpha, delta = sigmoid(e["alpha_logit"]), sigmoid(e["delta_logit"])
    eta = e["eta"] / np.sqrt(e["eta"].shape[-1])
    h, x_ema = np.zeros(x.shape[:1] + alpha.shape), []
    for t in range(x.shape[1]):
        h = alpha * e["beta"] * x[:, t, :, None] + (1 - alpha * delta) * h
        x_ema.append(np.sum(eta * h, -1))
    x_ema = np.stack(x_ema, 1)

    def affine(a, name):
        return a @ p[name]["kernel"] + p[name]["bias"]

    z = silu(affine(x_ema, "wz"))
    q = z * p["qk_scale"][0] + p["qk_offset"][0]
    k = z * p["qk_scale"][1] + p["qk_offset"][1]
    v = silu(affine(x, "wv"))
    n = x.shape[1]
    logits = np.einsum("bqz,bkz->bqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    o = attn @ v
    reset = silu(affine(x_ema, "w_reset"))
    update = sigmoid(affine(x_ema, "w_update"))
    candidate = silu(affine(x_ema, "wh") + (reset * o) @ p["uh"]["kernel"])
    return update * candidate + (1 - update) * x


def test_mega_layer_matches_the_papers_equations(rng):
    layer = MegaLayer(qk_dim=6, value_dim=10, ema_dim=3, position=NoPE(), mask=MaskSpec(),
                      attention_impl="reference")
    x = rng.normal(size=(2, 11, 5))
    variables = sharpened(jax.jit(layer.init)(jax.random.PRNGKey(0), jnp.zeros((1, 11, 5)),
                                              jnp.arange(11)))
    got = jax.jit(layer.apply)(variables, jnp.asarray(x, jnp.float32), jnp.arange(11))
    np.testing.assert_allclose(got, numpy_mega_layer(x, variables["params"]), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("bindings,length,slots", [((), 21, 7), ((f"{M}chunk_size=None",), 13, 16)],
                         ids=["chunk", "full"])
def test_decoding_equals_forward(bindings, length, slots):
    """Mega-chunk keeps the EMA state and a ring of chunk - 1 = 7 keys; full Mega every key."""
    model, variables = initialized(*bindings, position="t5")
    variables = sharpened(variables)
    toks = tokens(2, length, seed=5)
    decoded, cache = decode_all(model, variables, toks, prompt=3, max_length=16)
    assert cache["layer_0"]["mega"]["kv_cache"]["keys"].shape == (2, slots, 1, 16)
    assert cache["layer_0"]["mega"]["ema_state"].shape == (2, 32, 4)
    np.testing.assert_allclose(decoded, jax.jit(model.apply)(variables, toks), rtol=1e-4,
                               atol=1e-4)


def test_decoding_with_rotary_positions_equals_forward():
    model, variables = initialized()
    variables = sharpened(variables)
    toks = tokens(1, 11, seed=9)
    decoded, _ = decode_all(model, variables, toks, prompt=3, max_length=16)
    np.testing.assert_allclose(decoded, jax.jit(model.apply)(variables, toks), rtol=1e-4,
                               atol=1e-4)


def test_flops_per_token_counts_every_term():
    model, variables = initialized()
    projections = projection_flops(variables["params"])
    length = 100
    keys = MaskSpec(chunk=8).mean_keys_per_query(length)
    per_layer = ema_flops_per_token(32, 4, length) + 2.0 * (16 + 64) * keys
    want = projections + 2 * per_layer + 2.0 * 32 * VOCAB
    assert model.flops_per_token(length) == pytest.approx(want)
    assert model.mask == MaskSpec(chunk=8)


def test_defaults_axes_and_errors():
    model = lexjax.build_model(["configs/models/mega.gin"])
    assert (model.qk_dim, model.value_features, model.ema_dim, model.mask.chunk) == (
        128, 1024, 16, 256)
    _, variables = initialized()
    check_logical_axes(variables["params"])
    with pytest.raises(lexjax.ConfigError,
                       match=r"chunk_size \(CHUNK_SIZE\) must be a positive int"):
        lexjax.build_model(["configs/models/mega.gin"], TINY + (f"{M}chunk_size=0",))


def test_ffn_is_silu_as_in_the_reference_lm():
    """Inside the model the block's FFN computes wo(silu(wi y)) (the reference LM's
    activation_fn), checked on its captured input and output in float64; another activation
    name is refused."""
    model, variables = initialized()
    assert model.mlp_activation == "silu"
    _, state = model.apply(variables, tokens(2, 12), capture_intermediates=True,
                           mutable=["intermediates"])
    params = nn.unbox(variables["params"])["layer_0"]["ffn"]
    wi, wo = (np.asarray(params[name]["kernel"], np.float64) for name in ("wi", "wo"))
    captured = state["intermediates"]["layer_0"]
    ffn_in = np.asarray(captured["mega_norm"]["__call__"][0], np.float64)  # Y = Norm(Mega(X))
    hidden = ffn_in @ wi
    want = (hidden / (1 + np.exp(-hidden))) @ wo
    np.testing.assert_allclose(np.asarray(captured["ffn"]["__call__"][0]), want, rtol=1e-4,
                               atol=1e-5)
    with pytest.raises(lexjax.ConfigError, match="mlp_activation"):
        lexjax.build_model(["configs/models/mega.gin"], TINY + (f"{M}mlp_activation='swiglu'",))
