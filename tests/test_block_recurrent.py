"""Block-Recurrent Transformer and Transformer-XL built through gin: the scanned block loop against
a Python loop, causality (within and across blocks), carried segments against one call, ragged
lengths, decoding against the forward pass, the window attention against the Transformer with
blockwise causal attention, information flow through the state, the gates against their
formulas, FLOP accounting against XLA, and logical axes."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lexjax
from helpers import decode_all
from lexjax.attention import MaskSpec
from lexjax.layers.recurrent import StateGate
from lexjax.models import Transformer
from lexjax.training.state import check_logical_axes

VOCAB = 64
BLOCK = 8
TINY = ("NUM_LAYERS=2", "EMBED_DIM=32", "NUM_HEADS=4", "MLP_DIM=64", f"VOCAB_SIZE={VOCAB}",
        f"CHUNK_SIZE={BLOCK}", "NUM_STATES=6")
BRT = "lexjax.models.BlockRecurrentTransformer"


def tokens(batch, length, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, VOCAB, (batch, length)), jnp.int32)


@functools.lru_cache(maxsize=None)
def initialized(name="block_recurrent", *bindings):
    model = lexjax.build_model([f"configs/models/{name}.gin"], TINY + bindings)
    return model, jax.jit(model.init)(jax.random.PRNGKey(0), tokens(1, 2 * BLOCK))


VARIANTS = [(), (f"{BRT}.gate='lstm'",), (f"{BRT}.state_mlp=True",),
            (f"{BRT}.state_mlp=True", f"{BRT}.single_gate=True"),
            (f"{BRT}.recurrent_layers=(0, 1)", f"{BRT}.num_kv_heads=2",
             f"{BRT}.normalize_keys=False")]


def test_default_recurrent_layer_is_third_from_top():
    model, variables = initialized()
    assert model.recurrent_indices() == (0,)  # max(2 - 3, 0)
    assert "state_update" in variables["params"]["layer_0"]
    assert "state_update" not in variables["params"]["layer_1"]
    assert model.clone(num_layers=12).recurrent_indices() == (9,)  # the paper's layer 10 of 12
    assert model.clone(recurrent_layers=(-1,)).recurrent_indices() == (1,)
    with pytest.raises(ValueError, match="outside"):
        model.clone(recurrent_layers=(5,)).recurrent_indices()
    xl = initialized("transformer_xl")[1]["params"]
    assert not any("state_update" in layer for layer in xl.values() if isinstance(layer, dict))


@pytest.mark.parametrize("bindings", VARIANTS)
def test_scanned_blocks_equal_unrolled_loop(bindings):
    model, variables = initialized("block_recurrent", *bindings)
    toks = tokens(2, 5 * BLOCK, seed=1)
    scanned = jax.jit(model.apply)(variables, toks)
    unrolled = jax.jit(model.clone(unroll_blocks=True).apply)(variables, toks)
    np.testing.assert_allclose(scanned, unrolled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["block_recurrent", "transformer_xl"])
def test_causal_within_and_across_blocks(name):
    model, variables = initialized(name)
    length = 5 * BLOCK
    base = tokens(1, length, seed=2)
    cuts = [0, 3, BLOCK, BLOCK + 5, 4 * BLOCK - 1]  # block starts, block middles, a block end
    batch = jnp.concatenate([base] + [base.at[:, p].set((base[:, p] + 7) % VOCAB) for p in cuts])
    logits = jax.jit(model.apply)(variables, batch)
    for row, p in enumerate(cuts, start=1):
        np.testing.assert_allclose(logits[row, :p], logits[0, :p], atol=1e-5)
        assert float(jnp.max(jnp.abs(logits[row, p:] - logits[0, p:]))) > 1e-4


@pytest.mark.parametrize("bindings", VARIANTS)
def test_carried_segments_equal_one_call(bindings):
    model, variables = initialized("block_recurrent", *bindings)
    toks = tokens(2, 6 * BLOCK, seed=3)
    whole = jax.jit(model.apply)(variables, toks)
    segment = jax.jit(lambda v, t, c: model.apply(v, t, carry=c, return_carry=True))
    carry, pieces = model.init_carry(2), []
    for start, stop in ((0, 2 * BLOCK), (2 * BLOCK, 3 * BLOCK), (3 * BLOCK, 6 * BLOCK)):
        logits, carry = segment(variables, toks[:, start:stop], carry)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), whole, rtol=1e-5, atol=1e-5)
    assert int(carry.position) == 6 * BLOCK
    assert carry.keys.shape == (2, 2, BLOCK, model.num_kv_heads or 4, 8)
    assert carry.states.shape == (len(model.recurrent_indices()), 2, 6, 32)


def test_carry_restarts_from_the_learned_state_at_position_zero():
    model, variables = initialized()
    toks = tokens(1, 2 * BLOCK, seed=4)
    fresh = model.apply(variables, toks)
    junk = model.init_carry(1).replace(states=jnp.full((1, 1, 6, 32), 3.0),
                                       keys=jnp.full((2, 1, BLOCK, 4, 8), 5.0))
    np.testing.assert_allclose(model.apply(variables, toks, carry=junk), fresh, atol=1e-6)
    moved = model.apply(variables, toks, carry=junk.replace(position=jnp.asarray(2 * BLOCK)))
    assert float(jnp.max(jnp.abs(moved - fresh))) > 1e-3


@pytest.mark.parametrize("length", [1, 5, 3 * BLOCK + 3])
def test_ragged_lengths(length):
    model, variables = initialized()
    toks = tokens(2, 4 * BLOCK, seed=5)
    full = model.apply(variables, toks)
    part = model.apply(variables, toks[:, :length])
    assert part.shape == (2, length, VOCAB)
    np.testing.assert_allclose(part, full[:, :length], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of block_size"):
        model.apply(variables, toks[:, :length], return_carry=True)


@pytest.mark.parametrize("bindings", [(), (f"{BRT}.gate='lstm'", f"{BRT}.state_mlp=True")])
def test_decoding_equals_forward(bindings):
    model, variables = initialized("block_recurrent", *bindings)
    length = 3 * BLOCK + 2  # three block boundaries, then part of a block
    toks = tokens(2, length, seed=6)
    decoded, cache = decode_all(model, variables, toks, prompt=3, max_length=length)
    assert cache["layer_0_state"].shape == (2, 6, 32)
    assert cache["layer_0_keys"].shape == (2, 2 * BLOCK, 4, 8)  # previous and current block
    np.testing.assert_allclose(decoded, jax.jit(model.apply)(variables, toks), rtol=1e-4,
                               atol=1e-4)
    with pytest.raises(ValueError, match="one token per call"):
        model.apply({**variables, "cache": cache}, toks[:, :2], decode=True, mutable=["cache"])


def as_transformer_params(params):
    """Transformer-XL parameters renamed to `Transformer`'s layout (the out projection and the
    position scheme under attention)."""
    renamed = {}
    for name, value in params.items():
        if name.startswith("layer_"):
            layer = dict(value)
            attention = dict(layer["attention"], out=layer.pop("out"))
            if "scheme" in attention:
                attention["position"] = attention.pop("scheme")
            layer["attention"] = attention
            renamed[name] = layer
        else:
            renamed[name] = value
    return renamed


@pytest.mark.parametrize("position", ["t5", "rope", "xpos", "alibi"])
def test_window_attention_equals_transformer_with_blockwise_mask(position):
    """Without a carry, Transformer-XL is the Transformer under blockwise causal attention
    (each block sees itself and the previous block): an independent implementation (blocked
    attention with absolute positions) of the same function."""
    xl = lexjax.build_model(["configs/models/transformer_xl.gin",
                             f"configs/positions/{position}.gin"],
                            TINY + (f"{BRT}.normalize_keys=False",))
    toks = tokens(2, 5 * BLOCK, seed=7)
    variables = xl.init(jax.random.PRNGKey(1), toks)
    reference = Transformer(vocab_size=VOCAB, num_layers=2, embed_dim=32, num_heads=4,
                            mlp_dim=64, position=xl.position,
                            mask=MaskSpec(blockwise=BLOCK), attention_impl="reference")
    expected = reference.apply({"params": as_transformer_params(nn.unbox(variables["params"]))},
                               toks)
    np.testing.assert_allclose(xl.apply(variables, toks), expected, rtol=2e-4, atol=2e-4)


def test_state_carries_information_beyond_the_window():
    """Two XL layers see at most two blocks back; the recurrent state reaches further."""
    toks = tokens(1, 6 * BLOCK, seed=8)
    changed = toks.at[:, 1].set((toks[:, 1] + 5) % VOCAB)
    far = slice(4 * BLOCK, None)  # blocks 4-5: beyond two blocks of reach from block 0
    for name, moves in (("transformer_xl", False), ("block_recurrent", True)):
        model, variables = initialized(name)
        delta = jnp.max(jnp.abs(model.apply(variables, toks)[:, far]
                                - model.apply(variables, changed)[:, far]))
        assert (float(delta) > 1e-5) == moves, (name, float(delta))


def test_gates_follow_their_formulas():
    rng = np.random.default_rng(9)
    state = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
    update = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)
    sigmoid = lambda x: 1 / (1 + np.exp(-x))
    fixed = StateGate("fixed")
    p = nn.unbox(fixed.init(jax.random.PRNGKey(0), state, update)["params"])
    z = np.asarray(update) @ p["update"]["kernel"] + p["update"]["bias"]
    g = sigmoid(np.asarray(p["gate_bias"]))
    np.testing.assert_allclose(fixed.apply({"params": p}, state, update),
                               np.asarray(state) * g + z * (1 - g), rtol=1e-5, atol=1e-6)
    lstm = StateGate("lstm")
    p = nn.unbox(lstm.init(jax.random.PRNGKey(0), state, update)["params"])
    lin = {k: np.asarray(update) @ p[k]["kernel"] + p[k]["bias"]
           for k in ("update", "input_gate", "forget_gate")}
    expected = (np.asarray(state) * sigmoid(lin["forget_gate"] + 1)
                + np.tanh(lin["update"]) * sigmoid(lin["input_gate"] - 1))
    np.testing.assert_allclose(lstm.apply({"params": p}, state, update), expected, rtol=1e-5,
                               atol=1e-6)
    single = StateGate("fixed", squash=True)  # meliad's single gate: its FFN ends in tanh
    p = nn.unbox(single.init(jax.random.PRNGKey(0), state, update)["params"])
    z = np.tanh(np.asarray(update) @ p["update"]["kernel"] + p["update"]["bias"])
    g = sigmoid(np.asarray(p["gate_bias"]))
    np.testing.assert_allclose(single.apply({"params": p}, state, update),
                               np.asarray(state) * g + z * (1 - g), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown state gate"):
        StateGate("bias").init(jax.random.PRNGKey(0), state, update)
    for bad, match in (((f"{BRT}.single_gate=True",), "single_gate"),
                       ((f"{BRT}.share_relative_bias=True",), "share_relative_bias")):
        with pytest.raises(lexjax.ConfigError, match=match):
            lexjax.build_model(["configs/models/block_recurrent.gin"], TINY + bad)


def test_normalized_keys_follow_meliad():
    """meliad's attention with normalize_keys (google-research/meliad @cc1aef5,
    transformer/memory/transformer_base.py `normalize_kq`, transformer/attention.py): q and k
    scaled by rsqrt(Σx² + 1e-6), logits |τ_h| (q̂·k̂ + b) (the bias added before the learned
    scale), softmax over visible keys; against float64 numpy."""
    from lexjax.layers.recurrent import attend_span, normalize_keys, tempered
    rng = np.random.default_rng(3)
    q, k, v = (rng.normal(size=(2, 5, 3, 4)) for _ in range(3))
    tau = np.array([0.5, -2.0, 3.0])
    slopes = np.array([0.1, 0.3, 0.7])
    bias = lambda rel: -jnp.asarray(slopes, jnp.float32)[:, None, None] * jnp.abs(rel)  # noqa
    pos = jnp.arange(5)
    tq, tbias = tempered(normalize_keys(jnp.asarray(q, jnp.float32)), bias,
                         jnp.abs(jnp.asarray(tau, jnp.float32)))
    got = attend_span(tq, normalize_keys(jnp.asarray(k, jnp.float32)),
                      jnp.asarray(v, jnp.float32), pos, pos, causal=True, bias=tbias)
    qn = q / np.sqrt(np.sum(q ** 2, -1, keepdims=True) + 1e-6)
    kn = k / np.sqrt(np.sum(k ** 2, -1, keepdims=True) + 1e-6)
    rel = np.arange(5)[:, None] - np.arange(5)[None, :]
    logits = (np.einsum("bqhd,bkhd->bhqk", qn, kn) - slopes[:, None, None] * np.abs(rel))
    logits = np.abs(tau)[:, None, None] * logits
    logits = np.where(rel >= 0, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, np.einsum("bhqk,bkhd->bqhd", probs, v), rtol=1e-5,
                               atol=1e-6)


def test_every_attention_has_a_learned_temperature():
    """normalize_keys (the default): the tokens' window and cross attention and the state's two
    attentions each own a per-head temperature, and each receives a gradient."""
    model, variables = initialized()
    params = nn.unbox(variables["params"])
    toks = tokens(2, 3 * BLOCK, seed=12)
    grads = jax.grad(lambda p: jnp.mean(model.apply({"params": p}, toks) ** 2))(params)
    layer = grads["layer_0"]
    for scale in (layer["attention"]["attention_scale"], layer["attention_scale2"],
                  layer["state_update"]["attention_scale"],
                  layer["state_update"]["attention_scale2"]):
        assert scale.shape == (4,) and float(jnp.max(jnp.abs(scale))) > 0
    assert "attention_scale" not in initialized(
        "block_recurrent", f"{BRT}.normalize_keys=False")[1]["params"]["layer_1"]["attention"]


def test_every_parameter_has_logical_axes():
    for bindings in VARIANTS:
        model = initialized("block_recurrent", *bindings)[0]
        check_logical_axes(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                          jax.ShapeDtypeStruct((1, BLOCK), jnp.int32))["params"])


@pytest.mark.parametrize("name,bindings", [
    ("block_recurrent", ()), ("transformer_xl", ()),
    ("block_recurrent", (f"{BRT}.state_mlp=True", f"{BRT}.single_gate=True"))],
    ids=["block_recurrent", "transformer_xl", "single_gate"])
def test_flops_per_token_matches_xla(name, bindings):
    """The analytic count against XLA's cost analysis of the forward pass (which also counts
    the masked half of each span and elementwise work: within 25%), blocks unrolled (XLA's cost
    analysis counts a scanned loop's body once)."""
    model, variables = initialized(name, "NUM_STATES=8", f"{BRT}.unroll_blocks=True", *bindings)
    length = 8 * BLOCK
    toks = jax.ShapeDtypeStruct((1, length), jnp.int32)
    compiled = jax.jit(model.apply).lower(variables, toks).compile()
    cost = compiled.cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"] / length
    assert 0.75 < model.flops_per_token(length) / xla < 1.25, (model.flops_per_token(length), xla)


def test_bfloat16_is_finite_and_close():
    model, variables = initialized()
    toks = tokens(2, 3 * BLOCK, seed=10)
    low = model.clone(dtype="bfloat16").apply(variables, toks)
    assert low.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(low)))
    np.testing.assert_allclose(low, model.apply(variables, toks), atol=0.15)


def test_transformer_xl_carries_keys_and_values_only():
    model, variables = initialized("transformer_xl")
    toks = tokens(1, 4 * BLOCK, seed=11)
    first, carry = model.apply(variables, toks[:, :2 * BLOCK], return_carry=True)
    second, carry = model.apply(variables, toks[:, 2 * BLOCK:], carry=carry, return_carry=True)
    assert carry.states is None and model.carry_axes().states is None
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), model.apply(variables, toks),
                               rtol=1e-5, atol=1e-5)
