"""SPADE built through gin: masks, the state-space branch in the bottom layer only and reaching
past the attention window, decoding with window and chunk attention, FLOPs, defaults. (Causality,
training, decoding and packed documents for every model: tests/test_lm_contract.py.)"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lexjax
from helpers import decode_all, projection_flops
from lexjax.attention import MaskSpec
from lexjax.layers.ssm import ssm_flops_per_token
from lexjax.training.state import check_logical_axes

VOCAB = 64
TINY = ("NUM_LAYERS=2", "EMBED_DIM=32", "NUM_HEADS=4", "MLP_DIM=64", f"VOCAB_SIZE={VOCAB}",
        "CHUNK_SIZE=8", "lexjax.models.Spade.state_dim=8")
S = "lexjax.models.Spade."


def tokens(batch, length, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, VOCAB, (batch, length)), jnp.int32)


@functools.lru_cache(maxsize=None)
def initialized(*bindings):
    model = lexjax.build_model(["configs/models/spade.gin"], TINY + bindings)
    return model, jax.jit(model.init)(jax.random.PRNGKey(0), tokens(1, 16))


@pytest.mark.parametrize("local", ["window", "chunk"])
def test_decoding_keeps_a_ring_of_the_local_span_and_equals_forward(local):
    """Every layer caches the keys of the last chunk_size - 1 = 7 tokens; the bottom layer also
    its SSM state."""
    model, variables = initialized(f'{S}local_attention="{local}"')
    toks = tokens(2, 27, seed=2)
    decoded, cache = decode_all(model, variables, toks, prompt=4, max_length=32)
    assert cache["layer_1"]["attention"]["kv_cache"]["keys"].shape == (2, 7, 4, 8)
    assert cache["layer_0"]["ssm_state"].shape == (2, 32, 8)
    np.testing.assert_allclose(decoded, jax.jit(model.apply)(variables, toks), rtol=1e-4,
                               atol=1e-4)


def test_masks_and_bad_local_kind():
    window, _ = initialized()
    assert window.mask == MaskSpec(window=8)
    assert initialized(f'{S}local_attention="chunk"')[0].mask == MaskSpec(chunk=8)
    with pytest.raises(ValueError, match="local_attention"):
        lexjax.build_model(["configs/models/spade.gin"],
                           TINY + (f'{S}local_attention="ring"',)).mask


def test_state_space_branch_only_in_the_bottom_layer():
    _, variables = initialized("NUM_LAYERS=3")
    params = variables["params"]
    assert {"ssm", "global_norm", "local_norm", "combine"} <= set(params["layer_0"])
    assert all("ssm" not in params[f"layer_{i}"] for i in (1, 2))
    assert nn.unbox(params["layer_0"]["ssm"])["c_re"].shape == (32, 8)  # one SSM per channel


def test_bottom_layer_global_path_carries_information_past_the_window():
    """Attention sees 8 tokens; the SSM sees everything. With the attention branch's output
    projection zeroed, the bottom layer still reacts to a token far outside the window."""
    model, variables = initialized("NUM_LAYERS=1")
    params = nn.unbox(variables["params"])
    params["layer_0"]["attention"]["out"]["kernel"] = jnp.zeros_like(
        params["layer_0"]["attention"]["out"]["kernel"])
    toks = tokens(1, 40)
    other = toks.at[:, 0].set((toks[:, 0] + 7) % VOCAB)
    apply = jax.jit(model.apply)
    a, b = apply({"params": params}, toks), apply({"params": params}, other)
    assert float(jnp.max(jnp.abs(a[:, 30:] - b[:, 30:]))) > 1e-4
    combine = params["layer_0"]["combine"]["kernel"]  # [global; local] -> embed
    params["layer_0"]["combine"]["kernel"] = combine.at[:32].set(0.0)
    a, b = apply({"params": params}, toks), apply({"params": params}, other)
    np.testing.assert_allclose(a[:, 1:], b[:, 1:], atol=1e-6)  # the model is now pointwise


def test_flops_per_token_counts_every_term():
    model, variables = initialized()
    projections = projection_flops(variables["params"])
    length = 100
    attention = 2 * 2.0 * 32 * MaskSpec(window=8).mean_keys_per_query(length)  # 4 heads x 8
    want = (projections + 2 * attention + ssm_flops_per_token(32, 8, length)
            + 2.0 * 32 * VOCAB)
    assert model.flops_per_token(length) == pytest.approx(want)


def test_reference_defaults_and_axes():
    model = lexjax.build_model(["configs/models/spade.gin"])
    assert (model.chunk_size, model.local_attention, model.state_dim, model.ssm_variant) == (
        512, "window", 32, "dss_exp")
    assert type(model.position).__name__ == "T5Buckets"
    _, variables = initialized()
    check_logical_axes(variables["params"])
    # One T5 table for every layer (the reference hands layer 0's position bias up the stack).
    paths = [jax.tree_util.keystr(p)
             for p, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]]
    assert [p for p in paths if "rel_embedding" in p] == [
        "['shared_position']['rel_embedding'].value"]


def test_global_branch_is_the_bare_state_space_model(rng):
    """The reference's S4 module is built with use_pointwise=False
    (microsoft/EfficientLongSequenceModeling @0819294, spade-modules/s4.py): the global branch is
    K ∗ x̃ + D ⊙ x̃ with no activation or projection, x̃ the layer's pre-norm input. Checked in
    float64 (direct causal convolution) against the global norm's output inside the model."""
    from lexjax.layers.ssm import DiagonalSSM
    model, variables = initialized("NUM_LAYERS=1")
    toks = tokens(2, 19, seed=6)
    _, state = model.apply(variables, toks, capture_intermediates=True,
                           mutable=["intermediates"])
    captured = state["intermediates"]["layer_0"]
    u = np.asarray(captured["pre_attention_norm"]["__call__"][0], np.float64)  # [b, n, d]
    params = nn.unbox(variables["params"])["layer_0"]
    ssm = DiagonalSSM(32, 8, variant="dss_exp")
    kernel = np.asarray(ssm.apply({"params": params["ssm"]}, 19, method=ssm.kernel), np.float64)
    g = np.stack([np.einsum("cs,bsc->bc", kernel[:, t::-1], u[:, :t + 1])
                  for t in range(19)], axis=1) + np.asarray(params["ssm"]["d"]) * u
    mean, var = g.mean(-1, keepdims=True), g.var(-1, keepdims=True)
    norm = params["global_norm"]
    want = (g - mean) / np.sqrt(var + 1e-6) * np.asarray(norm["scale"]) + np.asarray(norm["bias"])
    np.testing.assert_allclose(np.asarray(captured["global_norm"]["__call__"][0]), want,
                               rtol=1e-3, atol=1e-4)
    assert "ssm_out" not in params and nn.unbox(params["ssm"])["c_re"].shape == (32, 8)
