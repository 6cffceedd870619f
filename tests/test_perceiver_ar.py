"""Perceiver AR: the cross-attention against an explicit-mask float64 reference, causality (also
under input dropout), ragged lengths, generation with a cache equal to the full forward for every
position hook, the paper's input dropout, partial rotation, FLOP count, gin, and a short
training run with input dropout. (The contract of every model: tests/test_lm_contract.py.)"""
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lexjax
from lexjax.layers.latent_cross_attention import LatentCrossAttention, cross_attention
from lexjax.models.perceiver_ar import PartialRotation, PerceiverAR
from lexjax.positions import (ALiBi, Learned, PositionScheme, RoPE, T5Buckets, XPos,
                              alibi_slopes, sinusoidal_table)
from lexjax.losses import shift_right, token_losses
from lexjax.training.state import check_logical_axes

TINY = dict(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64, num_latents=6)


def make(**overrides) -> PerceiverAR:
    return PerceiverAR(**{**TINY, **overrides})


def init(model, tokens):
    return jax.jit(model.init)(jax.random.PRNGKey(0), tokens)


def compiled(model):
    """`model.apply`, compiled once per shape (faster than op-by-op dispatch on CPU)."""
    return jax.jit(model.apply, static_argnames="deterministic")


def tokens_of(rng, batch, length, vocab=64):
    return jnp.asarray(rng.integers(1, vocab, (batch, length)), jnp.int32)


def reference_cross_attention(q, k, v, q_pos, k_pos, key_valid=None, slopes=None):
    """Direct float64 softmax(q k^T / sqrt(d) + bias, masked) v with an explicit mask
    `allowed[b, i, j] = q_pos[i] >= k_pos[j] and key_valid[b, j]`."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    rel = np.asarray(q_pos)[:, None] - np.asarray(k_pos)[None, :]
    if slopes is not None:
        logits = logits - np.asarray(slopes)[None, :, None, None] * np.abs(rel)[None, None]
    allowed = np.broadcast_to(rel >= 0, (q.shape[0],) + rel.shape)
    if key_valid is not None:
        allowed = allowed & np.asarray(key_valid)[:, None, :]
    logits = np.where(allowed[:, None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


# ---------------------------------------------------------------- the cross-attention function

@pytest.mark.parametrize("block_size,key_chunk,kv_heads,with_bias,with_valid", [
    (16, 64, 4, False, False), (3, 5, 2, True, True), (4, 7, 1, False, True)])
def test_cross_attention_matches_explicit_mask_reference(rng, block_size, key_chunk, kv_heads,
                                                         with_bias, with_valid):
    b, m, n, h, d = 2, 7, 19, 4, 8
    q = rng.normal(size=(b, m, h, d)).astype(np.float32)
    k = rng.normal(size=(b, n, kv_heads, d)).astype(np.float32)
    v = rng.normal(size=(b, n, kv_heads, d)).astype(np.float32)
    q_pos, k_pos = np.arange(n - m, n), np.arange(n)
    valid = (rng.random((b, n)) < 0.6) | (k_pos >= n - m) if with_valid else None
    slopes = alibi_slopes(h) if with_bias else None
    bias = ALiBi().relative_bias(h, d) if with_bias else None
    out = cross_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                          q_positions=jnp.asarray(q_pos), k_positions=jnp.asarray(k_pos),
                          bias=bias, key_valid=None if valid is None else jnp.asarray(valid),
                          block_size=block_size, key_chunk_size=key_chunk)
    expected = reference_cross_attention(q, k, v, q_pos, k_pos, valid, slopes)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-4)


def test_cross_attention_gives_zeros_to_a_query_that_sees_no_key(rng):
    q, k = (rng.normal(size=(1, s, 2, 4)).astype(np.float32) for s in (3, 6))
    valid = np.asarray([[False, False, False, True, True, True]])
    q_pos, k_pos = np.asarray([2, 4, 5]), np.arange(6)
    out = np.asarray(cross_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(k),
                                     q_positions=jnp.asarray(q_pos),
                                     k_positions=jnp.asarray(k_pos),
                                     key_valid=jnp.asarray(valid), key_chunk_size=2))
    np.testing.assert_array_equal(out[:, 0], 0.0)  # position 2 sees keys 0 .. 2: all dropped
    expected = reference_cross_attention(q[:, 1:], k, k, q_pos[1:], k_pos, valid)
    np.testing.assert_allclose(out[:, 1:], expected, atol=2e-5, rtol=1e-4)


def test_cross_attention_gradients_match_dense(rng):
    b, m, n, h, d = 1, 5, 12, 2, 4
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in [(b, m, h, d), (b, n, h, d), (b, n, h, d)])
    w = jnp.asarray(rng.normal(size=(b, m, h, d)), jnp.float32)
    q_pos, k_pos = jnp.arange(n - m, n), jnp.arange(n)

    def blocked(q, k, v):
        return jnp.sum(w * cross_attention(q, k, v, q_positions=q_pos, k_positions=k_pos,
                                           block_size=2))

    def dense(q, k, v):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
        logits = jnp.where(q_pos[:, None] >= k_pos[None, :], logits, -1e30)
        return jnp.sum(w * jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v))

    grads = zip(jax.grad(blocked, (0, 1, 2))(q, k, v), jax.grad(dense, (0, 1, 2))(q, k, v))
    for got, want in grads:
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-4)


def test_latent_cross_attention_layer_matches_direct_formula(rng):
    b, m, n, features, h, d = 2, 4, 11, 16, 4, 4
    layer = LatentCrossAttention(features=features, num_heads=h, head_dim=d, position=ALiBi(),
                                 num_kv_heads=2, block_size=3)
    latents = jnp.asarray(rng.normal(size=(b, m, features)), jnp.float32)
    inputs = jnp.asarray(rng.normal(size=(b, n, features)), jnp.float32)
    q_pos, k_pos = jnp.arange(n - m, n), jnp.arange(n)

    def run(module, latents, inputs):
        keys, values = module.keys_values(inputs)
        return module(latents, q_pos, keys, values, k_pos)

    variables = layer.init(jax.random.PRNGKey(0), latents, inputs, method=run)
    out = layer.apply(variables, latents, inputs, method=run)
    p = jax.tree_util.tree_map(np.asarray, nn.unbox(variables)["params"])
    q = np.einsum("bme,ehd->bmhd", latents, p["query"]["kernel"])
    k = np.einsum("bne,ehd->bnhd", inputs, p["key"]["kernel"])
    v = np.einsum("bne,ehd->bnhd", inputs, p["value"]["kernel"])
    o = reference_cross_attention(q, k, v, q_pos, k_pos, slopes=alibi_slopes(h))
    expected = np.einsum("bmhd,hde->bme", o, p["out"]["kernel"])
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-4)


def test_partial_rotation_rotates_only_the_leading_channels(rng):
    q = jnp.asarray(rng.normal(size=(1, 5, 2, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 5, 2, 8)), jnp.float32)
    pos = jnp.arange(3, 8)
    partial = PartialRotation(RoPE(), 0.5)
    qr, kr = partial.apply({}, q, k, pos, pos, method=PartialRotation.rotate)
    q4, k4 = RoPE().rotate(q[..., :4], k[..., :4], pos, pos)
    np.testing.assert_allclose(np.asarray(qr[..., :4]), np.asarray(q4), atol=1e-6)
    np.testing.assert_allclose(np.asarray(kr[..., :4]), np.asarray(k4), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(qr[..., 4:]), np.asarray(q[..., 4:]))
    np.testing.assert_array_equal(np.asarray(kr[..., 4:]), np.asarray(k[..., 4:]))


# ---------------------------------------------------------------- the model

class EveryHook(PositionScheme):
    """A test scheme using all three hooks at once: sinusoidal embeddings, xPos rotation and the
    ALiBi bias, so one generation test covers every position path of the model."""

    def embed(self, positions, features):
        return sinusoidal_table(positions, features)

    def rotate(self, q, k, q_positions, k_positions):
        return XPos(parent=None).rotate(q, k, q_positions, k_positions)

    def relative_bias(self, num_heads, head_dim):
        return ALiBi(parent=None).relative_bias(num_heads, head_dim)


@pytest.fixture(scope="module")
def tiny():
    model = make()
    variables = init(model, jnp.zeros((1, 16), jnp.int32))
    return model, variables, compiled(model)


@pytest.mark.parametrize("length", [1, 4, 6, 13])
def test_logits_cover_the_last_min_length_latents_positions(length):
    model = make()
    tokens = jnp.ones((2, length), jnp.int32)
    logits = jax.eval_shape(lambda: model.apply(model.init(jax.random.PRNGKey(0), tokens), tokens))
    assert logits.shape == (2, min(length, TINY["num_latents"]), TINY["vocab_size"])
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize("length", [13, 4])  # past and short of num_latents (ragged)
def test_causal_a_change_at_t_moves_no_earlier_logit(tiny, rng, length):
    _, variables, forward = tiny
    tokens = tokens_of(rng, 2, length)
    base = forward(variables, tokens)
    assert bool(jnp.all(jnp.isfinite(base)))
    offset = length - base.shape[1]  # logits row i is position offset + i
    for t in range(length):
        changed = forward(variables, tokens.at[:, t].set((tokens[:, t] + 7) % 64))
        before = max(t - offset, 0)
        np.testing.assert_allclose(np.asarray(changed[:, :before]), np.asarray(base[:, :before]),
                                   atol=1e-5, err_msg=f"t={t}")
        assert float(jnp.max(jnp.abs(changed[:, before:] - base[:, before:]))) > 1e-4, t


def test_input_dropout_is_causal_random_in_training_and_off_in_evaluation(tiny, rng):
    _, variables, forward = tiny
    model = make(input_dropout_rate=0.5, dropout_rate=0.1)
    train = compiled(model)
    tokens = tokens_of(rng, 2, 15)
    base = train(variables, tokens, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
    t = 11  # a change at position 11 may move latent rows 2.. (positions 9 .. 14) only
    changed = train(variables, tokens.at[:, t].set((tokens[:, t] + 5) % 64), deterministic=False,
                    rngs={"dropout": jax.random.PRNGKey(3)})
    np.testing.assert_allclose(np.asarray(changed[:, :2]), np.asarray(base[:, :2]), atol=1e-5)
    assert float(jnp.max(jnp.abs(changed[:, 2:] - base[:, 2:]))) > 1e-4
    other = train(variables, tokens, deterministic=False, rngs={"dropout": jax.random.PRNGKey(4)})
    assert float(jnp.max(jnp.abs(other - base))) > 1e-4
    np.testing.assert_array_equal(np.asarray(compiled(model)(variables, tokens)),
                                  np.asarray(forward(variables, tokens)))


def test_input_dropout_of_one_hides_the_whole_context_but_not_the_latents(tiny, rng):
    """With every context input dropped, the latents see only the latent window: the logits equal
    the eval-mode logits of the last num_latents tokens alone (RoPE depends on distances only)."""
    _, variables, forward = tiny
    tokens = tokens_of(rng, 2, 16)
    dropped = compiled(make(input_dropout_rate=1.0))(
        variables, tokens, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    window_only = forward(variables, tokens[:, -TINY["num_latents"]:])
    np.testing.assert_allclose(np.asarray(dropped), np.asarray(window_only), atol=1e-4)
    assert float(jnp.max(jnp.abs(forward(variables, tokens) - window_only))) > 1e-3


@pytest.mark.parametrize("position,fraction", [(RoPE(), 0.5), (EveryHook(), 1.0)])
def test_generation_with_cache_equals_the_full_forward(rng, position, fraction):
    model = make(num_latents=4, position=position, rotary_fraction=fraction,
                 cross_attention_block_size=2)
    total, prompt, max_length = 9, 2, 12
    tokens = tokens_of(rng, 2, total)
    variables = init(model, tokens)
    forward = compiled(model)
    prefill = jax.jit(lambda tok: model.prefill(variables, tok, max_length=max_length))
    logits, cache = prefill(tokens[:, :prompt])
    np.testing.assert_allclose(np.asarray(logits),
                               np.asarray(forward(variables, tokens[:, :prompt])), atol=1e-5)
    assert cache["keys"].shape == (2, max_length, 4, 8)  # every input's key, unrotated
    assert cache["latent_window"].shape == (2, 4, 32)
    step = jax.jit(lambda c, tok: model.decode_step(variables, c, tok))
    for t in range(prompt, total):  # the window of 4 latents fills (t <= 3), then slides
        next_logits, cache = step(cache, tokens[:, t])
        if t in (2, 8):
            expected = forward(variables, tokens[:, :t + 1])[:, -1]
            np.testing.assert_allclose(np.asarray(next_logits), np.asarray(expected), atol=2e-5,
                                       rtol=1e-4, err_msg=f"t={t}")
    assert int(cache["index"]) == total


def test_prefill_refuses_a_prompt_longer_than_the_cache(tiny, rng):
    model, variables, _ = tiny
    with pytest.raises(ValueError, match="max_length"):
        model.prefill(variables, tokens_of(rng, 1, 5), max_length=4)


def test_learned_relative_biases_are_per_layer_and_every_parameter_has_axes(rng):
    model = make(position=T5Buckets(), num_layers=3, tie_embeddings=False, num_kv_heads=2)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens_of(rng, 1, 9))["params"]
    check_logical_axes(boxed)
    assert "rel_embedding" in boxed["cross_attention"]["attention"]["scheme"]["inner"]
    for i in range(2):
        assert "rel_embedding" in boxed["latents"][f"layer_{i}"]["attention"]["position"]["inner"]
    learned = make(position=Learned(max_length=16))
    check_logical_axes(jax.eval_shape(learned.init, jax.random.PRNGKey(0),
                                      tokens_of(rng, 1, 9))["params"])


def test_flops_per_token_counts_the_forward_matmuls():
    model = make(num_layers=3, num_latents=4)
    n, m, e, h, d, f, v = 10, 4, 32, 4, 8, 64, 64
    cross = n * 2 * e * h * d + m * (2 * e * h * d + 2 * e * f) + 2 * h * d * sum(range(7, 11))
    latent = m * (4 * e * h * d + 2 * e * f) + 2 * h * d * sum(range(1, 5))
    expected = 2 * (cross + 2 * latent + m * e * v) / n
    assert model.flops_per_token(n) == pytest.approx(expected)
    total = [model.flops_per_token(L) * L for L in (100, 200, 300)]  # linear in N past the latents
    assert total[2] - 2 * total[1] + total[0] == pytest.approx(0.0, abs=1e-3 * total[0])


def test_loss_falls_in_a_short_training_run(rng):
    model = make(input_dropout_rate=0.1)
    tokens = jnp.tile(tokens_of(rng, 2, 8), (1, 3))  # a repeating pattern of 8 tokens
    params = nn.unbox(init(model, tokens))["params"]
    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state, key):
        def loss_fn(p):
            logits = model.apply({"params": p}, shift_right(tokens), deterministic=False,
                                 rngs={"dropout": key})
            return jnp.mean(token_losses(logits, tokens))
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = optimizer.init(params), []
    for i in range(25):
        params, opt_state, loss = step(params, opt_state, jax.random.PRNGKey(i))
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 1.0, losses


def test_gin_config_honours_the_size_macros_and_position_files():
    model = lexjax.build_model(
        ["configs/models/perceiver_ar.gin", "configs/positions/alibi.gin"],
        ["NUM_LAYERS=3", "EMBED_DIM=48", "NUM_HEADS=3", "MLP_DIM=96", "VOCAB_SIZE=128",
         "NUM_LATENTS=5", 'DTYPE="bfloat16"'])
    assert isinstance(model, PerceiverAR) and isinstance(model.position, ALiBi)
    assert (model.num_layers, model.embed_dim, model.num_heads, model.mlp_dim, model.vocab_size,
            model.num_latents, model.dtype) == (3, 48, 3, 96, 128, 5, "bfloat16")
    tokens = jnp.ones((1, 9), jnp.int32)
    logits = jax.eval_shape(lambda: model.apply(model.init(jax.random.PRNGKey(0), tokens), tokens))
    assert logits.shape == (1, 5, 128) and logits.dtype == jnp.float32


def test_gin_config_has_the_reference_codes_activation_and_rotary():
    """perceiver_ar.gin as the reference's defaults: squared-ReLU MLPs, RoPE on half the channels
    with wavelengths up to the maximum context length (ROTARY_MAX_WAVELENGTH)."""
    model = lexjax.build_model(["configs/models/perceiver_ar.gin"],
                               ["ROTARY_MAX_WAVELENGTH=4096"])
    assert model.mlp_activation == "squared_relu" and model.rotary_fraction == 0.5
    assert model.position.max_wavelength == 4096
    assert model.position.frequencies(32)[-1] == pytest.approx(1 / 4096)


@pytest.mark.parametrize("field,value,match", [
    ("num_latents", 0, "num_latents"), ("num_layers", 0, "num_layers"),
    ("rotary_fraction", 0.0, "rotary_fraction"), ("input_dropout_rate", 1.5, "input_dropout")])
def test_bad_configuration_is_refused_clearly(field, value, match):
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(make(**{field: value}).init, jax.random.PRNGKey(0),
                       jnp.ones((1, 4), jnp.int32))


def test_training_crops_make_every_position_a_latent():
    """The reference's random crops: over training steps every position of a piece is among
    the scored last `num_latents` positions ("none": only the last 6 of 16); "full_latents"
    keeps at least 6 tokens so every latent is a real token."""
    rows = np.tile(np.arange(2, 18), (4, 1))  # four full pieces of 16 tokens
    model = make()
    latent_tokens = {name: set() for name in ("random", "none", "full_latents")}
    for step in range(200):
        for name, seen in latent_tokens.items():
            cropped = model.clone(train_cropping=name).crop_rows(
                rows, np.random.default_rng((0, step)).random(4))
            assert np.all(np.diff((cropped > 0).astype(int), axis=1) >= 0)  # padding first
            for row in cropped:
                real = row[row > 0]
                np.testing.assert_array_equal(real, np.arange(2, 2 + real.size))  # a prefix
                if name == "full_latents":
                    assert real.size >= 6
                seen.update(int(t) for t in row[-6:] if t > 0)
    assert latent_tokens["random"] == latent_tokens["full_latents"] == set(range(2, 18))
    assert latent_tokens["none"] == set(range(12, 18))
    for bad, match in (({"train_cropping": "crop"}, "train_cropping"),
                       ({"minimum_crop_length": -1}, "minimum_crop_length")):
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(make(**bad).init, jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))


def test_the_trainer_reads_cropped_rows(tmp_path, monkeypatch):
    """The trainer's token batches for Perceiver AR are the uncropped rows' random prefixes,
    a function of (seed, step)."""
    from lexjax.data import DataConfig
    from lexjax.training.config import TrainConfig
    from lexjax.training.inputs import training_batches
    monkeypatch.setenv("LEXJAX_DATA_CACHE", str(tmp_path / "cache"))
    for i in range(20):
        (tmp_path / f"doc{i:02d}.txt").write_text("lorem ipsum dolor " * (i + 3) + "\n")
    run = TrainConfig(data=DataConfig(task="lexjax.text_files",
                                      text_files_glob=str(tmp_path / "*.txt")),
                      train_steps=3, batch_size=4, train_length=32)
    whole = list(itertools.islice(training_batches(make(train_cropping="none"), run), 3))
    cropped = list(itertools.islice(training_batches(make(), run), 3))
    again = list(itertools.islice(training_batches(make(), run, start_step=1), 2))
    assert any(np.sum(c["targets"] > 0) < np.sum(w["targets"] > 0)
               for c, w in zip(cropped, whole))
    for c, w in zip(cropped, whole):
        for crop_row, row in zip(c["targets"], w["targets"]):
            real, full = crop_row[crop_row > 0], row[row > 0]
            np.testing.assert_array_equal(real, full[:real.size])
    for a, b in zip(again, cropped[1:]):
        np.testing.assert_array_equal(a["targets"], b["targets"])


def test_shared_relative_bias_reaches_every_layer():
    """share_relative_bias with T5 buckets: one table, read by the cross-attention and every
    latent layer (none of their own), and it gets a gradient."""
    model = make(position=T5Buckets(), share_relative_bias=True)
    toks = jnp.ones((1, 12), jnp.int32)
    params = nn.unbox(init(model, toks)["params"])
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert [p for p in paths if "rel_embedding" in p] == ["['shared_position']['rel_embedding']"]
    grad = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, toks) ** 2))(params)
    assert float(jnp.max(jnp.abs(grad["shared_position"]["rel_embedding"]))) > 0
