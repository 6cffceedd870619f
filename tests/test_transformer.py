"""The Transformer LM built through gin: every position scheme, causality, length extrapolation,
scan / remat equivalence, logical axis names, dtypes, model features, masks (window, chunk, BCA)
and dropout.

Parameters do not depend on the mask, the attention implementation, dropout, remat or the compute
dtype, so one initialization per position scheme is shared by all the variants (cached below):
it keeps the number of compilations, hence the runtime, small.
"""
import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lexjax
from lexjax.attention import MaskSpec
from lexjax.positions import (ALiBi, Kerple, Learned, NoPE, RoPE, Sandwich, Sinusoidal, T5Buckets,
                              XPos)

MODEL_GIN = "configs/models/transformer.gin"
VOCAB = 64
TINY_BINDINGS = ("NUM_LAYERS=2", "EMBED_DIM=32", "NUM_HEADS=4", "MLP_DIM=64", f"VOCAB_SIZE={VOCAB}",
                 "MAX_POSITIONS=16")
SCHEMES = {"nope": NoPE, "sinusoidal": Sinusoidal, "learned": Learned, "rope": RoPE, "xpos": XPos,
           "alibi": ALiBi, "sandwich": Sandwich, "kerple": Kerple, "t5": T5Buckets}
AXIS_NAMES = {"embed", "mlp", "heads", "kv_heads", "kv", "vocab", "layers", "relpos_buckets",
              "abs_positions"}
B, N = 2, 16  # init batch and length
F = "lexjax.models.Transformer."


def build(scheme="rope", *bindings, features=()):
    files = [MODEL_GIN, f"configs/positions/{scheme}.gin"] + [f"configs/features/{f}.gin"
                                                               for f in features]
    return lexjax.build_model(files, TINY_BINDINGS + tuple(bindings))


def tokens(batch=B, length=N, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, length)), jnp.int32)


@functools.lru_cache(maxsize=None)
def initialized(scheme, *bindings):
    """(model, boxed variables) of a tiny model; cached for the whole module."""
    model = build(scheme, *bindings)
    return model, model.init(jax.random.PRNGKey(0), tokens())


def jit_apply(model, **kwargs):
    return jax.jit(lambda variables, toks: model.apply(variables, toks, **kwargs))


def changed_pair(toks, position):
    """The batch `toks` followed by a copy whose token at `position` differs."""
    other = toks.at[:, position].set((toks[:, position] + 1) % VOCAB)
    return jnp.concatenate([toks, other])


def position_changes(logits):
    """For a batch from `changed_pair`: max |difference| of the logits at each position `[N]`."""
    half = logits.shape[0] // 2
    return np.asarray(jnp.max(jnp.abs(logits[:half] - logits[half:]), axis=(0, 2)))


def assert_causal(changes, position, atol=1e-5):
    assert np.all(changes[:position] <= atol), changes
    assert np.all(changes[position:] > 1e-6), changes


def param_leaves(variables):
    return jax.tree_util.tree_leaves_with_path(
        variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))


def assert_all_params_annotated(variables):
    for path, leaf in param_leaves(variables):
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.Partitioned), f"{name} has no logical axis names"
        assert len(leaf.names) == leaf.value.ndim, (name, leaf.names, leaf.value.shape)
        assert set(leaf.names) <= AXIS_NAMES, (name, leaf.names)
    for spec in jax.tree_util.tree_leaves(nn.get_partition_spec(variables)["params"]):
        assert None not in tuple(spec)


# ----------------------------------------------------------------------------------------------
# Every position scheme
# ----------------------------------------------------------------------------------------------

CHANGED = 37  # the token changed in `scheme_logits`' second half of the batch


def long_tokens(scheme):
    """4x the init length (learned: its whole table), and a copy with one token changed."""
    length = N if scheme == "learned" else 4 * N
    return changed_pair(tokens(1, length, seed=1), CHANGED if length > CHANGED else 9)


@functools.lru_cache(maxsize=None)
def scheme_logits(scheme):
    model, variables = initialized(scheme)
    return jit_apply(model)(variables, long_tokens(scheme))


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_scheme_logits_shape_finite_and_causal(scheme):
    model, _ = initialized(scheme)
    assert isinstance(model.position, SCHEMES[scheme])
    assert model.num_layers == 2 and model.embed_dim == 32 and model.vocab_size == VOCAB
    toks = long_tokens(scheme)
    logits = scheme_logits(scheme)
    chex.assert_shape(logits, toks.shape + (VOCAB,))
    assert logits.dtype == jnp.float32
    chex.assert_tree_all_finite(logits)
    assert_causal(position_changes(logits), CHANGED if toks.shape[1] > CHANGED else 9)


@pytest.mark.parametrize("scheme", sorted(set(SCHEMES) - {"learned"}))
def test_scheme_runs_at_four_times_the_init_length(scheme):
    _, variables = initialized(scheme)
    assert jax.tree_util.tree_leaves(variables)  # initialized at length N ...
    chex.assert_shape(scheme_logits(scheme), (2, 4 * N, VOCAB))  # ... applied at 4N
    chex.assert_tree_all_finite(scheme_logits(scheme))


def test_learned_positions_refuse_longer_inputs():
    model, variables = initialized("learned")
    with pytest.raises(ValueError, match="16 positions"):
        jax.eval_shape(model.apply, variables, tokens(1, N + 1))


@functools.lru_cache(maxsize=None)
def _nope_apply():
    return jit_apply(initialized("nope")[0])


@pytest.mark.parametrize("scheme", ["rope", "xpos", "alibi", "sandwich", "sinusoidal"])
def test_position_schemes_change_the_logits(scheme):
    """With the same parameters, the scheme's logits differ from NoPE's (positions matter), except
    at position 0 (distance 0 only) for the relative schemes."""
    _, variables = initialized(scheme)
    base = _nope_apply()(variables, long_tokens(scheme))
    logits = scheme_logits(scheme)
    assert float(jnp.max(jnp.abs(logits - base))) > 1e-3
    if scheme != "sinusoidal":
        np.testing.assert_allclose(logits[:, 0], base[:, 0], atol=1e-5)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_every_parameter_has_logical_axis_names(scheme):
    _, variables = initialized(scheme)
    assert_all_params_annotated(variables)
    names = {n for _, leaf in param_leaves(variables) for n in leaf.names}
    if scheme == "learned":
        assert "abs_positions" in names
    if scheme == "t5":
        assert "relpos_buckets" in names


# ----------------------------------------------------------------------------------------------
# scan over layers, remat
# ----------------------------------------------------------------------------------------------

def restack(params, num_layers=2):
    """Unrolled `layer_i` params -> scanned `layers` params (leading layer axis)."""
    out = {k: v for k, v in params.items() if not k.startswith("layer_")}
    out["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs),
                                           *[params[f"layer_{i}"] for i in range(num_layers)])
    return out


@pytest.mark.parametrize("scheme", ["kerple"])
def test_scan_layers_equals_unrolled(scheme):
    model, variables = initialized(scheme)
    scanned = build(scheme, F + "scan_layers=True")
    toks = changed_pair(tokens(), 6)
    # Same parameter structure (up to stacking), logical axes with a leading `layers` axis, and
    # every layer initialized on its own (not copies of one draw).
    scanned_variables = jax.jit(scanned.init)(jax.random.PRNGKey(0), tokens())
    assert_all_params_annotated(scanned_variables)
    stacked = restack(nn.unbox(variables)["params"])
    chex.assert_trees_all_equal_shapes(nn.unbox(scanned_variables)["params"], stacked)
    for path, leaf in param_leaves(scanned_variables):
        name = jax.tree_util.keystr(path)
        if "layers" in name:
            assert leaf.names[0] == "layers", (name, leaf.names)
            if "kernel" in name or "raw_" in name:
                assert not np.allclose(leaf.value[0], leaf.value[1]), f"{name}: layers identical"
    want = jit_apply(model)(variables, toks)
    got = jit_apply(scanned)({"params": stacked}, toks)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    assert_causal(position_changes(got), 6)


def _loss(model):
    toks = tokens()

    def loss(params):
        logits = model.apply({"params": params}, toks)
        nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits)[:, :-1],
                                            toks[:, 1:, None], axis=-1))
        return nll, logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@functools.lru_cache(maxsize=None)
def _baseline_value_and_grad():
    model, variables = initialized("t5")
    return _loss(model)(nn.unbox(variables)["params"])


@pytest.mark.parametrize("policy,scan", [("full", False), ("dots_no_batch", False),
                                         ("dots", True)])
def test_remat_policies_give_same_logits_and_gradients(policy, scan):
    _, variables = initialized("t5")
    params = nn.unbox(variables)["params"]
    bindings = [F + f"remat_policy='{policy}'"]
    if scan:
        bindings.append(F + "scan_layers=True")
        params = restack(params)
    (value, logits), grads = _loss(build("t5", *bindings))(params)
    (want_value, want_logits), want_grads = _baseline_value_and_grad()
    if scan:
        want_grads = restack(want_grads)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    chex.assert_trees_all_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(grads, want_grads, rtol=1e-4, atol=1e-7)
    assert float(jnp.max(jnp.abs(grads["layers" if scan else "layer_0"]["attention"]["position"]
                                 ["rel_embedding"]))) > 0


def test_bad_inputs_raise_clear_errors():
    model, _ = initialized("rope")
    with pytest.raises(ValueError, match="batch, length"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((N,), jnp.int32))
    with pytest.raises(ValueError, match="remat_policy"):
        jax.eval_shape(build("rope", F + "remat_policy='some'").init, jax.random.PRNGKey(0),
                       tokens())


# ----------------------------------------------------------------------------------------------
# dtypes and model features
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["xpos"])
def test_bfloat16_compute(scheme):
    _, variables = initialized(scheme)
    model16 = build(scheme, "DTYPE='bfloat16'")
    abstract = jax.eval_shape(model16.init, jax.random.PRNGKey(0), tokens())
    for _, leaf in param_leaves(abstract):
        assert leaf.value.dtype == jnp.float32
    logits = jit_apply(model16)(variables, long_tokens(scheme))
    assert logits.dtype == jnp.float32
    chex.assert_tree_all_finite(logits)
    want = scheme_logits(scheme)
    scale = float(jnp.std(want))
    assert float(jnp.max(jnp.abs(logits - want))) < 0.1 * scale + 0.05
    assert_causal(position_changes(logits), CHANGED, atol=1e-2)


def test_model_features_gqa_swiglu_layernorm_untied():
    bindings = [F + "num_kv_heads=2", F + "mlp_activation='swiglu'", F + "norm='layernorm'",
                F + "tie_embeddings=False"]
    model = build("alibi", *bindings)
    variables = model.init(jax.random.PRNGKey(0), tokens())
    assert_all_params_annotated(variables)
    params = nn.unbox(variables)["params"]
    attention = params["layer_0"]["attention"]
    chex.assert_shape([attention["query"]["kernel"], attention["key"]["kernel"],
                       attention["value"]["kernel"]], [(32, 4, 8), (32, 2, 8), (32, 2, 8)])
    assert "wi_gate" in params["layer_0"]["mlp"]
    assert set(params["final_norm"]) == {"scale", "bias"}
    chex.assert_shape(params["logits"]["kernel"], (32, VOCAB))
    logits = jit_apply(model)(variables, changed_pair(tokens(), 5))
    chex.assert_shape(logits, (2 * B, N, VOCAB))
    chex.assert_tree_all_finite(logits)
    assert_causal(position_changes(logits), 5)


@pytest.mark.parametrize("activation,formula", [
    ("gelu", lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))),
    ("gelu_exact", lambda h: 0.5 * h * (1 + np.vectorize(math.erf)(h / np.sqrt(2)))),
    ("squared_relu", lambda h: np.maximum(h, 0.0) ** 2),
    ("silu", lambda h: h / (1 + np.exp(-h))),
])
def test_mlp_activations_match_their_formulas(activation, formula, rng):
    """wo(f(wi x)) in float64 for every element-wise activation (squared ReLU: Perceiver AR's
    `sq_relu`; SiLU: Mega's FFN)."""
    from lexjax.layers.mlp import MLP
    x = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
    mlp = MLP(16, activation)
    params = nn.unbox(mlp.init(jax.random.PRNGKey(0), x))["params"]
    wi, wo = (np.asarray(params[name]["kernel"], np.float64) for name in ("wi", "wo"))
    want = formula(np.asarray(x, np.float64) @ wi) @ wo
    np.testing.assert_allclose(np.asarray(mlp.apply({"params": params}, x)), want, rtol=1e-4,
                               atol=1e-5)


def test_unknown_mlp_activation_is_refused_clearly():
    with pytest.raises(lexjax.ConfigError, match="mlp_activation"):
        build("alibi", F + "mlp_activation='relu3'")


@pytest.mark.parametrize("binding,check", [
    (F + "num_kv_heads=1",
     lambda p: p["layer_0"]["attention"]["key"]["kernel"].shape == (32, 1, 8)),
    (F + "mlp_activation='swiglu'", lambda p: "wi_gate" in p["layer_1"]["mlp"]),
    (F + "norm='layernorm'", lambda p: "bias" in p["layer_0"]["pre_mlp_norm"]),
    (F + "tie_embeddings=False", lambda p: p["logits"]["kernel"].shape == (32, VOCAB)),
    (F + "head_dim=16", lambda p: p["layer_0"]["attention"]["out"]["kernel"].shape == (4, 16, 32)),
])
def test_each_feature_changes_the_parameters(binding, check):
    abstract = jax.eval_shape(build("rope", binding).init, jax.random.PRNGKey(0), tokens())
    assert_all_params_annotated(abstract)
    assert check(nn.unbox(abstract)["params"])


# ----------------------------------------------------------------------------------------------
# Masks in the model: window, chunk, BCA; attention implementations
# ----------------------------------------------------------------------------------------------

MASK_WINDOW8 = (F + "mask=@lexjax.attention.MaskSpec()", "lexjax.attention.MaskSpec.window=8")
MASK_CHUNK8 = (F + "mask=@lexjax.attention.MaskSpec()", "lexjax.attention.MaskSpec.chunk=8")


@pytest.mark.parametrize("layers,impl,s", [(1, "xla", 5), (1, "reference", 5), (2, "xla", 3)])
def test_window_mask_receptive_field(layers, impl, s):
    """Logits at t see tokens t-7 .. t per layer of window 8: a token at s moves positions
    s .. s + 7 * layers only."""
    _, variables = initialized("rope", f"NUM_LAYERS={layers}")
    windowed = build("rope", f"NUM_LAYERS={layers}", *MASK_WINDOW8,
                     F + f"attention_impl='{impl}'")
    assert windowed.mask == MaskSpec(window=8)
    changes = position_changes(jit_apply(windowed)(variables, changed_pair(tokens(length=32), s)))
    reach = s + 7 * layers + 1
    assert np.all(changes[:s] <= 1e-5) and np.all(changes[reach:] <= 1e-5), changes
    assert np.all(changes[s:reach] > 1e-6), changes


def test_chunk_mask_never_crosses_chunks():
    _, variables = initialized("alibi")
    chunked = build("alibi", *MASK_CHUNK8)
    assert chunked.mask == MaskSpec(chunk=8)
    changes = position_changes(jit_apply(chunked)(variables, changed_pair(tokens(length=32), 10)))
    assert np.all(changes[:10] <= 1e-5) and np.all(changes[16:] <= 1e-5), changes
    assert np.all(changes[10:16] > 1e-6), changes


def test_bca_changes_inference_logits_only_from_the_third_block():
    """BCA with block 8: a query in block j sees blocks j-1 and j. Queries in blocks 0 and 1
    (positions < 16) see every causal key anyway, so their logits equal plain causal attention's;
    from position 16 on keys of block j-2 and earlier are hidden."""
    plain, variables = initialized("xpos")
    bca = build("xpos", "BCA_BLOCK=8", features=["bca"])
    assert bca.inference_mask == MaskSpec(blockwise=8) and bca.mask == MaskSpec()
    toks = changed_pair(tokens(length=40, seed=3), 3)
    want = jit_apply(plain)(variables, toks)
    got = jit_apply(bca)(variables, toks)
    diff = np.asarray(jnp.max(jnp.abs(got - want), axis=(0, 2)))
    assert np.all(diff[:16] <= 1e-5), diff
    assert np.all(diff[16:] > 1e-5), diff
    # A token in block 0 reaches block 1 in the first layer and block 2 in the second, no further.
    changes = position_changes(got)
    assert np.all(changes[:3] <= 1e-5) and np.all(changes[24:] <= 1e-5), changes
    assert np.all(changes[3:24] > 1e-6), changes
    # Training (deterministic=False) keeps the ordinary causal mask.
    train = jit_apply(bca, deterministic=False)(variables, toks)
    np.testing.assert_allclose(train, want, atol=1e-5)
    # Reference and blocked attention agree inside the model.
    ref = jit_apply(build("xpos", "BCA_BLOCK=8", F + "attention_impl='reference'",
                          features=["bca"]))(variables, toks)
    np.testing.assert_allclose(ref, got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme,mask", [("t5", ()), ("kerple", MASK_WINDOW8),
                                         ("sandwich", MASK_CHUNK8)])
def test_attention_impls_agree_in_the_model(scheme, mask):
    _, variables = initialized(scheme)
    toks = tokens(length=24, seed=4)
    outs = [jit_apply(build(scheme, *mask, F + f"attention_impl='{impl}'",
                            F + "attention_block_size=8"))(variables, toks)
            for impl in ("xla", "reference")]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------

def test_dropout():
    model, variables = initialized("rope")
    dropping = build("rope", F + "dropout_rate=0.2")
    toks = long_tokens("rope")
    plain = scheme_logits("rope")
    # Deterministic: no rng needed, and dropout is off.
    np.testing.assert_allclose(jit_apply(dropping)(variables, toks), plain, atol=1e-6)
    train = jax.jit(lambda v, t, key: dropping.apply(v, t, deterministic=False,
                                                     rngs={"dropout": key}))
    a = train(variables, toks, jax.random.PRNGKey(1))
    b = train(variables, toks, jax.random.PRNGKey(1))
    c = train(variables, toks, jax.random.PRNGKey(2))
    chex.assert_tree_all_finite(a)
    assert float(jnp.max(jnp.abs(a - plain))) > 1e-3
    np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3
    # Still causal with a fixed dropout rng: row 1 is row 0 with token CHANGED replaced, but the
    # rows draw different masks, so compare two calls whose rows are swapped instead.
    swapped = train(variables, toks[::-1], jax.random.PRNGKey(1))
    np.testing.assert_allclose(swapped[0, :CHANGED], a[0, :CHANGED], atol=1e-5)
    assert float(jnp.max(jnp.abs(swapped[0, CHANGED:] - a[0, CHANGED:]))) > 1e-6


# ----------------------------------------------------------------------------------------------
# Decoding (a key/value cache) and packed documents, for every position scheme
# ----------------------------------------------------------------------------------------------

DECODE_MASKS = {"full": (), "window": MASK_WINDOW8}


@pytest.mark.parametrize("mask", sorted(DECODE_MASKS))
@pytest.mark.parametrize("scheme", sorted(set(SCHEMES) - {"learned"}))
def test_decoding_equals_the_forward_pass_past_the_init_length(scheme, mask):
    """Prefill 7 tokens, then decode to 3x the init length (N = 16) with two query heads per
    key/value head; a window mask decodes from a ring of 7 cached keys."""
    model = build(scheme, F + "num_kv_heads=2", *DECODE_MASKS[mask])
    variables = model.init(jax.random.PRNGKey(0), tokens())
    toks = tokens(1, 3 * N, seed=5)
    want = jit_apply(model)(variables, toks)
    logits, cache = jax.jit(lambda v, p: model.prefill(v, p, max_length=3 * N))(
        variables, toks[:, :7])
    np.testing.assert_allclose(logits, want[:, :7], atol=2e-5)
    if mask == "window":
        assert cache["layer_0"]["attention"]["kv_cache"]["keys"].shape[1] == 7
    step = jax.jit(model.decode_step)
    for t in range(7, 3 * N):
        logits, cache = step(variables, cache, toks[:, t])
        np.testing.assert_allclose(logits, want[:, t], atol=2e-5, err_msg=f"position {t}")


def test_decoding_uses_the_inference_mask():
    """xPos with BCA at inference: decoding attends like the deterministic forward pass."""
    model = build("xpos", "BCA_BLOCK=8", features=["bca"])
    variables = model.init(jax.random.PRNGKey(0), tokens())
    toks = tokens(1, 40, seed=6)
    want = jit_apply(model)(variables, toks)
    logits, cache = model.prefill(variables, toks[:, :20], max_length=40)
    np.testing.assert_allclose(logits, want[:, :20], atol=2e-5)
    step = jax.jit(model.decode_step)
    for t in range(20, 40):
        logits, cache = step(variables, cache, toks[:, t])
        np.testing.assert_allclose(logits, want[:, t], atol=2e-5)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_packed_documents_are_kept_apart_for_every_scheme(scheme):
    """Absolute schemes embed each token at its position within its document; relative ones see
    in-document distances; no document attends to another."""
    model, variables = initialized(scheme)
    docs = [tokens(1, n, seed=i) for i, n in enumerate((5, 9, 2))]
    row = jnp.concatenate(docs, axis=1)
    segments = jnp.asarray([[1] * 5 + [2] * 9 + [3] * 2], jnp.int32)
    packed = jax.jit(lambda v, t, s: model.apply(v, t, segment_ids=s))(variables, row, segments)
    start = 0
    for doc in docs:
        np.testing.assert_allclose(packed[:, start:start + doc.shape[1]],
                                   model.apply(variables, doc), atol=2e-5)
        start += doc.shape[1]


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_packed_documents_are_kept_apart_by_every_attention_impl(impl):
    model = build("t5", F + f"attention_impl='{impl}'", *MASK_WINDOW8)
    _, variables = initialized("t5")
    docs = [tokens(1, n, seed=i) for i, n in enumerate((11, 13))]
    segments = jnp.asarray([[1] * 11 + [2] * 13], jnp.int32)
    packed = model.apply(variables, jnp.concatenate(docs, axis=1), segment_ids=segments)
    np.testing.assert_allclose(packed[:, :11], model.apply(variables, docs[0]), atol=2e-5)
    np.testing.assert_allclose(packed[:, 11:], model.apply(variables, docs[1]), atol=2e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_norm_spec_epsilon_and_bias(bias, rng):
    """`Norm(kind, epsilon, bias)`: LayerNorm (x - mean) / sqrt(var + eps) * scale (+ bias), the
    epsilon and the bias as asked; RMSNorm x / sqrt(mean(x^2) + eps) * scale."""
    from lexjax.layers import Norm, make_norm
    x = rng.standard_normal((2, 5, 8)).astype(np.float32) * 0.01  # small: epsilon matters
    for spec in (Norm("layernorm", 1e-3, bias), Norm("rmsnorm", 1e-3)):
        module = make_norm(spec, dtype=jnp.float32, name="n")
        variables = module.init(jax.random.PRNGKey(0), x)
        params = nn.unbox(variables)["params"]
        assert ("bias" in params) == (spec.kind == "layernorm" and bias)
        got = np.asarray(module.apply(variables, x), np.float64)
        x64 = x.astype(np.float64)
        if spec.kind == "layernorm":
            centred = x64 - x64.mean(-1, keepdims=True)
            want = centred / np.sqrt(centred.var(-1, keepdims=True) + 1e-3)
        else:
            want = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-3)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="unknown norm"):
        Norm("batchnorm")


@pytest.mark.parametrize("scan", [False, True])
def test_shared_relative_bias_is_every_layer_reading_one_table(scan):
    """share_relative_bias (T5's table for all layers): the model equals the unshared one with
    every layer's table set to the shared table, in the forward pass and in decoding."""
    from helpers import decode_all
    bindings = ("NUM_LAYERS=3", f"lexjax.models.Transformer.scan_layers={scan}")
    shared = build("t5", *bindings, "lexjax.models.Transformer.share_relative_bias=True")
    per_layer = build("t5", *bindings)
    toks = jnp.asarray(np.random.default_rng(4).integers(1, 64, (2, 13)), jnp.int32)
    params = nn.unbox(jax.jit(shared.init)(jax.random.PRNGKey(0), toks)["params"])
    table_shape = params["shared_position"]["rel_embedding"].shape
    table = jax.random.normal(jax.random.PRNGKey(5), table_shape)
    params["shared_position"]["rel_embedding"] = table
    unshared = nn.unbox(jax.jit(per_layer.init)(jax.random.PRNGKey(0), toks)["params"])
    layers = {k: v for k, v in params.items() if k != "shared_position"}
    by_path = {jax.tree_util.keystr(p): x
               for p, x in jax.tree_util.tree_flatten_with_path(layers)[0]}

    def same_weights_one_table(path, x):
        name = jax.tree_util.keystr(path)
        return jnp.broadcast_to(table, x.shape) if "rel_embedding" in name else by_path[name]
    reference = jax.tree_util.tree_map_with_path(same_weights_one_table, unshared)
    want = per_layer.apply({"params": reference}, toks)
    np.testing.assert_allclose(shared.apply({"params": params}, toks), want, rtol=1e-5,
                               atol=1e-5)
    decoded, _ = decode_all(shared, {"params": params}, toks, prompt=4, max_length=16)
    np.testing.assert_allclose(decoded, want, rtol=1e-4, atol=1e-4)
    assert not any("rel_embedding" in jax.tree_util.keystr(p)
                   for p, _ in jax.tree_util.tree_flatten_with_path(layers)[0])
