"""Late [MASK] insertion, 3ML (`lexjax.models.LateMask`): the encoder never reads a hidden
position, its early blocks equal an encoder run on each document's visible tokens alone (a
reference built here from the model's parameters, one document at a time), rows with more
visible tokens than the encoder's length, the masked-LM objective's exact masking for it,
fine-tuning's parameter transfer, the configurations it refuses, and its FLOP count against
XLA's."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lexjax
from lexjax.data import DataConfig, segment_ids
from lexjax.errors import ConfigError
from lexjax.objectives import MaskedLM
from lexjax.objectives.masking import visible_length
from lexjax.training.loop import transfer_params

SIZES = ["NUM_LAYERS=2", "EMBED_DIM=64", "NUM_HEADS=4", "MLP_DIM=128", "MAX_POSITIONS=64",
         "DECODER_LAYERS=1"]
VARIANTS = [("self", 1), ("self", 2), ("cross", 1), ("cross", 2)]  # (decoder, insert_layer)
N = 16
DATA = DataConfig(task="lexjax.stdlib_code")
TOL = dict(rtol=1e-5, atol=2e-5)  # float32 against float64 (measured: 2e-6 on logits ~4)


@functools.lru_cache(maxsize=None)
def build(*bindings, sizes=tuple(SIZES)):
    return lexjax.build_model(["configs/models/late_mask.gin"], list(sizes) + list(bindings))


@functools.lru_cache(maxsize=None)
def initialized(decoder="self", insert_layer=2, *bindings):
    model = build(f"DECODER='{decoder}'", f"INSERT_LAYER={insert_layer}", *bindings)
    variables = model.init(jax.random.PRNGKey(0), jnp.full((1, N), 5, jnp.int32))
    return model, variables


@functools.lru_cache(maxsize=None)
def mlm_forward(model):
    return jax.jit(lambda v, t, s, h: model.apply(v, t, segment_ids=s, hidden=h))


def tokens_of(shape, seed=0):
    return np.random.default_rng(seed).integers(3, 259, shape).astype(np.int32)


def hidden_of(n, hidden_positions):
    out = np.zeros(n, bool)
    out[list(hidden_positions)] = True
    return out


def rms(x, scale):
    return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-6) * scale


def gelu(x):  # flax's default, the tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def attention(p, x, memory):
    """Multi-head attention of queries from `x [n, d]` over all of `memory [m, d]`."""
    q = np.einsum("nd,dhk->hnk", x, p["query"]["kernel"])
    k = np.einsum("md,dhk->hmk", memory, p["key"]["kernel"])
    v = np.einsum("md,dhk->hmk", memory, p["value"]["kernel"])
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("hnk,hkd->nd", weights @ v, p["out"]["kernel"])


def block(p, x, memory=None):
    """A pre-norm block over the whole of `x [n, d]` (a cross block also reads `memory`)."""
    x = x + attention(p["attention"], rms(x, p["pre_attention_norm"]["scale"]),
                      rms(x, p["pre_attention_norm"]["scale"]))
    if memory is not None:
        x = x + attention(p["cross_attention"], rms(x, p["pre_cross_attention_norm"]["scale"]),
                          memory)
    h = rms(x, p["pre_mlp_norm"]["scale"])
    return x + gelu(h @ p["mlp"]["wi"]["kernel"]) @ p["mlp"]["wo"]["kernel"]


def reference_logits(model, params, tokens, hidden):
    """MLM logits `[n, vocab]` (numpy, float64) of ONE document `tokens [n]` (no padding) with
    `hidden [n]`, computed directly: the first `inserted_after` blocks on the visible tokens
    alone (a short sequence, each token embedded at its original position), [MASK] vectors
    (mask_vector + position embedding) put back where the hidden tokens were, the later blocks
    and the decoder over the full length (the cross decoder: [MASK] inputs everywhere, reading
    the encoder's output: the visible states when the insertion follows the last block), then
    the MLM head (final norm, dense, GELU, norm, tied embedding / sqrt(embed))."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), nn.unbox(params))
    n = len(tokens)
    table, where = p["token_embedding"]["embedding"], p["position"]["embedding"][:n]
    visible = np.flatnonzero(~hidden)
    states = table[tokens[visible]] + where[visible]
    for i in range(model.inserted_after):
        states = block(p[f"layer_{i}"], states)
    masks = p["mask_vector"][None, :] + where
    x = masks.copy()
    x[visible] = states
    for i in range(model.inserted_after, model.num_layers):
        x = block(p[f"layer_{i}"], x)
    if model.decoder == "cross":
        memory = states if model.inserted_after == model.num_layers else x
        memory = rms(memory, p["memory_norm"]["scale"])
        x = masks
    for i in range(model.decoder_layers):
        x = block(p[f"decoder_{i}"], x, memory if model.decoder == "cross" else None)
    h = rms(x, p["final_norm"]["scale"])
    h = rms(gelu(h @ p["mlm_dense"]["kernel"]), p["mlm_norm"]["scale"])
    return h @ table.T / np.sqrt(model.embed_dim)


# -- 1. the encoder never reads a hidden position ------------------------------------------------

@pytest.mark.parametrize("decoder,insert_layer", VARIANTS)
def test_hidden_token_ids_are_never_read(decoder, insert_layer):
    model, variables = initialized(decoder, insert_layer)
    forward = mlm_forward(model)
    rng = np.random.default_rng(1)
    tokens = tokens_of((2, N))
    hidden = np.stack([hidden_of(N, rng.permutation(N)[:N // 2]) for _ in range(2)])
    base = np.asarray(forward(variables, tokens, None, hidden))
    assert np.all(np.isfinite(base))
    other = np.where(hidden, tokens_of((2, N), seed=9), tokens)
    assert (other != tokens)[hidden].all()
    np.testing.assert_array_equal(forward(variables, other, None, hidden), base)
    # ... while one visible token changes every position's logits of its row, and only its row
    k = int(np.flatnonzero(~hidden[0])[0])
    edited = tokens.copy()
    edited[0, k] = (tokens[0, k] + 7) % 250 + 3
    changed = np.asarray(forward(variables, edited, None, hidden))
    assert np.min(np.max(np.abs(changed[0] - base[0]), axis=-1)) > 1e-6
    np.testing.assert_array_equal(changed[1], base[1])


def packed_row():
    """Two documents (7 and 6 tokens, each ending in EOS) and 3 padding positions, with 3 and 2
    of their tokens hidden (8 visible: exactly visible_length(16, 0.5)); a second row of one
    document of 12 tokens and padding, 6 hidden."""
    tokens = tokens_of((2, N), seed=3)
    tokens[0, 6] = tokens[0, 12] = tokens[1, 11] = 1
    tokens[0, 13:] = tokens[1, 12:] = 0
    hidden = np.stack([hidden_of(N, [0, 3, 5, 8, 9]), hidden_of(N, [1, 2, 4, 7, 8, 10])])
    return tokens, segment_ids(tokens), hidden


@pytest.mark.parametrize("decoder,insert_layer", VARIANTS)
def test_packed_documents_hidden_tokens_and_padding_are_never_read(decoder, insert_layer):
    model, variables = initialized(decoder, insert_layer)
    forward = mlm_forward(model)
    tokens, segments, hidden = packed_row()
    assert segments[0].tolist() == [1] * 7 + [2] * 6 + [0] * 3
    assert np.sum(~hidden & (segments > 0), axis=1).tolist() == [8, 6]
    base = np.asarray(forward(variables, tokens, segments, hidden))
    real = segments > 0
    assert np.all(np.isfinite(base[real]))
    unread = hidden | ~real
    other = np.where(unread, tokens_of((2, N), seed=11), tokens)
    np.testing.assert_array_equal(np.asarray(forward(variables, other, segments, hidden))[real],
                                  base[real])
    # a visible token of the first document changes that document only
    k = int(np.flatnonzero(~hidden[0] & (segments[0] == 1))[0])
    edited = tokens.copy()
    edited[0, k] = (tokens[0, k] + 7) % 250 + 3
    changed = np.asarray(forward(variables, edited, segments, hidden))
    first = segments[0] == 1
    assert np.min(np.max(np.abs(changed[0, first] - base[0, first]), axis=-1)) > 1e-6
    np.testing.assert_allclose(changed[0, segments[0] == 2], base[0, segments[0] == 2],
                               atol=1e-6, rtol=0)
    np.testing.assert_array_equal(changed[1], base[1])


# -- 2. equal to a direct reference ---------------------------------------------------------------

@pytest.mark.parametrize("decoder,insert_layer", VARIANTS)
def test_equals_the_encoder_run_on_the_visible_tokens_alone(decoder, insert_layer):
    """Row 0: exactly visible_length(16, 0.5) = 8 visible tokens; row 1: 5 (the encoder's
    short sequence then has empty slots)."""
    model, variables = initialized(decoder, insert_layer)
    assert visible_length(N, model.mask_rate) == 8
    rng = np.random.default_rng(2)
    tokens = tokens_of((2, N), seed=4)
    hidden = np.stack([hidden_of(N, rng.permutation(N)[:8]), hidden_of(N, rng.permutation(N)[:11])])
    got = np.asarray(mlm_forward(model)(variables, tokens, None, hidden))
    for row in range(2):
        want = reference_logits(model, variables["params"], tokens[row], hidden[row])
        np.testing.assert_allclose(got[row], want, **TOL)


@pytest.mark.parametrize("decoder,insert_layer", VARIANTS)
def test_each_packed_document_equals_its_own_reference(decoder, insert_layer):
    """Documents of a packed row are run as if alone: positions restart at each document."""
    model, variables = initialized(decoder, insert_layer)
    tokens, segments, hidden = packed_row()
    got = np.asarray(mlm_forward(model)(variables, tokens, segments, hidden))
    for row, doc in ((0, 1), (0, 2), (1, 1)):
        at = segments[row] == doc
        want = reference_logits(model, variables["params"], tokens[row, at], hidden[row, at])
        np.testing.assert_allclose(got[row, at], want, **TOL)


# -- 3. more visible tokens than the encoder reads ------------------------------------------------

@pytest.mark.parametrize("decoder,insert_layer", VARIANTS)
def test_overflowing_visible_tokens_are_hidden_too(decoder, insert_layer):
    """A row with 12 visible tokens for an encoder of 8: its last 4 visible tokens are hidden
    as well (finite logits, their ids unread, equal to hiding them explicitly)."""
    model, variables = initialized(decoder, insert_layer)
    forward = mlm_forward(model)
    tokens = tokens_of((1, N), seed=5)
    hidden = hidden_of(N, [1, 4, 9, 10])[None]
    visible = np.flatnonzero(~hidden[0])
    overflow = np.zeros_like(hidden)
    overflow[0, visible[8:]] = True
    got = np.asarray(forward(variables, tokens, None, hidden))
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(forward(variables, tokens, None, hidden | overflow), got)
    other = np.where(overflow, tokens_of((1, N), seed=12), tokens)
    np.testing.assert_array_equal(forward(variables, other, None, hidden), got)
    want = reference_logits(model, variables["params"], tokens[0], (hidden | overflow)[0])
    np.testing.assert_allclose(got[0], want, **TOL)


@pytest.mark.parametrize("decoder,insert_layer", VARIANTS)
def test_overflow_in_a_packed_row(decoder, insert_layer):
    """Nothing hidden in a packed row of two documents: the encoder reads the first 8 tokens,
    the rest (the second document's first tokens among them) are hidden; finite logits, and the
    overflowed ids are not read."""
    model, variables = initialized(decoder, insert_layer)
    forward = mlm_forward(model)
    tokens, segments, _ = packed_row()
    hidden = np.zeros_like(segments, bool)
    got = np.asarray(forward(variables, tokens, segments, hidden))
    real = segments > 0
    assert np.all(np.isfinite(got[real]))
    overflow = real & (np.cumsum(real, axis=1) > 8)
    other = np.where(overflow, tokens_of((2, N), seed=13), tokens)
    np.testing.assert_array_equal(np.asarray(forward(variables, other, segments, hidden))[real],
                                  got[real])


def degenerate_rows():
    """A row of 8 two-token documents (8 EOS: 16 real tokens for an encoder of 8, the later
    documents overflow entirely), a row of padding only, and a row whose tokens are all hidden
    but its EOS."""
    tokens = tokens_of((3, N), seed=7)
    tokens[0, 1::2] = 1
    tokens[1] = 0
    tokens[2, N - 1] = 1
    hidden = np.zeros((3, N), bool)
    hidden[2, :N - 1] = True
    return tokens, segment_ids(tokens), hidden


@pytest.mark.parametrize("decoder,insert_layer", VARIANTS)
def test_degenerate_rows_stay_finite(decoder, insert_layer):
    """Logits are finite everywhere, padding rows included (a NaN there would poison the loss
    through its zero weights), and so are the gradients of the masked-LM loss."""
    model, variables = initialized(decoder, insert_layer)
    tokens, segments, hidden = degenerate_rows()
    assert np.all(np.isfinite(np.asarray(mlm_forward(model)(variables, tokens, segments,
                                                             hidden))))
    if (decoder, insert_layer) != ("cross", 2):
        return
    objective = MaskedLM(mask_rate=0.5).prepare(model, DATA)
    batch = {"targets": jnp.asarray(tokens), "segment_ids": jnp.asarray(segments)}
    grads = jax.jit(jax.grad(lambda p: objective.loss(model, p, batch,
                                                      rng=jax.random.PRNGKey(0))[0]))(
        variables["params"])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


# -- 5. the masked-LM objective with a late-[MASK] model ------------------------------------------

def test_masked_lm_hides_exactly_the_picked_tokens():
    model, variables = initialized("self", 2)
    with pytest.raises(ConfigError, match="MASK_RATE"):
        MaskedLM(mask_rate=0.15).prepare(model, DATA)
    objective = MaskedLM(mask_rate=0.5).prepare(model, DATA)
    assert objective.hides_masks
    plain = lexjax.build_model(["configs/models/encoder.gin"], SIZES[:4])
    assert not MaskedLM(mask_rate=0.5).prepare(plain, DATA).hides_masks
    targets = tokens_of((2, N), seed=6)
    targets[1, 10] = 1
    targets[1, 11:] = 0
    batch = {"targets": jnp.asarray(targets), "segment_ids": jnp.asarray(segment_ids(targets))}
    rng = jax.random.PRNGKey(3)
    loss, metrics, _ = jax.jit(lambda p, b, r: objective.loss(model, p, b, rng=r))(
        variables["params"], batch, rng)
    assert np.isfinite(float(loss))
    assert float(metrics["masked_fraction"]) == pytest.approx(0.5, abs=0.03)
    # the loss is the mean cross-entropy of the picked tokens, each [MASK]ed and hidden
    inputs, picked = map(np.asarray, objective.corrupt(jax.random.split(rng)[0],
                                                       batch["targets"], batch["segment_ids"]))
    assert np.all(inputs[picked] == objective.mask_id)
    assert np.all(inputs[~picked] == targets[~picked])
    assert np.sum(picked, axis=1).tolist() == [8, 5]  # floor(0.5 x 16 + u), floor(0.5 x 10 + u)
    logits = np.asarray(mlm_forward(model)(variables, inputs, batch["segment_ids"], picked),
                        np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    assert float(loss) == pytest.approx(nll[picked].mean(), rel=1e-5)


def test_the_documented_run_config_binds_one_rate_for_both():
    """configs/runs/mlm_quickstart.gin then configs/models/late_mask.gin (its docstring's
    command): the model and the objective read the same MASK_RATE, 0.5 or as bound."""
    import gin

    from lexjax.config import configured_model, configured_value, parse_gin
    files = ["configs/runs/mlm_quickstart.gin", "configs/models/late_mask.gin"]
    for bindings, rate in (((), 0.5), (("MASK_RATE=0.3",), 0.3)):
        parse_gin(files, SIZES[:4] + list(bindings))
        try:
            model = configured_model()
            objective = configured_value("lexjax.training.TrainConfig.objective", "objective",
                                         "")
        finally:
            gin.clear_config()
        assert model.mask_rate == objective.mask_rate == rate
        assert objective.prepare(model, DATA).hides_masks


# -- 6. fine-tuning from a 3ML run ----------------------------------------------------------------

def test_fine_tuning_keeps_the_encoder_and_drops_the_decoder():
    model, variables = initialized("cross", 1)
    saved = nn.unbox(variables["params"])
    classifier = build("DECODER='cross'", "INSERT_LAYER=1", "NUM_CLASSES=3")
    tokens = jnp.asarray(tokens_of((1, N)))
    fresh = nn.unbox(classifier.init(jax.random.PRNGKey(1), tokens)["params"])
    assert not any(name.startswith("decoder") for name in fresh) and "mask_vector" not in fresh
    params, fresh_names, unused = transfer_params(saved, fresh, "SRC",
                                                  heads=classifier.head_parameters)
    kept = [name for name in fresh if name not in ("pooler", "classifier")]
    assert sorted(kept) == ["final_norm", "layer_0", "layer_1", "position", "token_embedding"]
    for name in kept:
        jax.tree_util.tree_map(np.testing.assert_array_equal, params[name], saved[name])
    assert {path.split("'")[1] for path in fresh_names} == {"pooler", "classifier"}
    assert {path.split("'")[1] for path in unused} == {"decoder_0", "mask_vector", "memory_norm",
                                                       "mlm_dense", "mlm_norm"}
    logits = classifier.apply({"params": params}, tokens)
    assert logits.shape == (1, 3) and bool(jnp.all(jnp.isfinite(logits)))


# -- 7. what it refuses ---------------------------------------------------------------------------

@pytest.mark.parametrize("position", ["rope", "alibi", "t5"])
def test_relative_positions_are_refused(position):
    with pytest.raises(ConfigError, match="relative scheme"):
        lexjax.build_model(["configs/models/late_mask.gin", f"configs/positions/{position}.gin"],
                           SIZES)


def test_refusals():
    model = build()
    with pytest.raises(ValueError, match="relative scheme"):
        model.clone(position=lexjax.positions.RoPE())
    for insert_layer in (0, 3):
        with pytest.raises(ConfigError, match="INSERT_LAYER"):
            build(f"INSERT_LAYER={insert_layer}")
    for bad in ("MASK_RATE=0.0", "MASK_RATE=1.0", "DECODER_LAYERS=0", "DECODER='mlp'",
                "NUM_CLASSES=1", "lexjax.models.LateMask.mask=@lexjax.attention.MaskSpec()"):
        with pytest.raises(ConfigError):
            build(bad)
    classifier = build("NUM_CLASSES=3")
    tokens = jnp.asarray(tokens_of((1, N)))
    variables = classifier.init(jax.random.PRNGKey(0), tokens)
    with pytest.raises(ValueError, match="hidden"):
        classifier.apply(variables, tokens, hidden=jnp.zeros((1, N), bool))
    mlm, variables = initialized()
    with pytest.raises(ValueError, match="hidden"):
        mlm.apply(variables, tokens, hidden=jnp.zeros((1, N + 1), bool))
    with pytest.raises(ValueError, match="does not decode"):
        mlm.prefill(variables, tokens, max_length=2 * N)
    # NoPE (no positions at all) and sinusoidal positions are absolute: accepted
    lexjax.build_model(["configs/models/late_mask.gin", "configs/positions/nope.gin"], SIZES)
    lexjax.build_model(["configs/models/late_mask.gin", "configs/positions/sinusoidal.gin"], SIZES)


# -- 8. FLOPs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("decoder,insert_layer", VARIANTS)
def test_flops_per_token_matches_xla(decoder, insert_layer):
    """The analytic count of masked-LM pre-training (rate 0.5: the early blocks on 128 of 256
    tokens) against XLA's cost analysis of the forward pass with a hidden mask (which also
    counts elementwise work: it must count more, by at most 10%; measured 0.95)."""
    length = 256
    model = build(f"DECODER='{decoder}'", f"INSERT_LAYER={insert_layer}",
                  sizes=tuple(SIZES[:-2]) + ("MAX_POSITIONS=256", "DECODER_LAYERS=2"))
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                               jax.ShapeDtypeStruct((1, length), jnp.int32))
    compiled = jax.jit(lambda v, t, h: model.apply(v, t, hidden=h)).lower(
        variables, jax.ShapeDtypeStruct((1, length), jnp.int32),
        jax.ShapeDtypeStruct((1, length), jnp.bool_)).compile()
    cost = compiled.cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"] / length
    assert 0.9 < model.flops_per_token(length) / xla <= 1.0, (model.flops_per_token(length), xla)


def test_flops_of_the_encoder_blocks_halve_with_half_the_tokens():
    """At rate 0.5 with the insertion after the last block, each encoder block costs per token
    half of what a plain encoder's block costs at half the length (half the tokens, each seeing
    half the keys); the classifier counts every block over all tokens, as the plain encoder."""
    n = 256

    def late(layers, *bindings):
        return build(*bindings, sizes=(f"NUM_LAYERS={layers}",) + tuple(SIZES[1:-1])
                     + ("MAX_POSITIONS=256",))

    def plain(layers, *bindings):
        return lexjax.build_model(["configs/models/encoder.gin"],
                                  [f"NUM_LAYERS={layers}", *SIZES[1:4], *bindings])

    per_block = (late(4).flops_per_token(n) - late(2).flops_per_token(n)) / 2
    plain_block = (plain(4).flops_per_token(n // 2) - plain(2).flops_per_token(n // 2)) / 2
    assert per_block == pytest.approx(plain_block / 2, rel=1e-12)
    assert per_block < (plain(4).flops_per_token(n) - plain(2).flops_per_token(n)) / 4
    assert (late(2, "NUM_CLASSES=3").flops_per_token(n)
            == pytest.approx(plain(2, "NUM_CLASSES=3").flops_per_token(n), rel=1e-12))
