"""`lexjax.generate`: greedy decoding against an argmax loop over full forward passes (every model
config), ragged batches against each row alone, EOS stops, sampling against numpy references of
top-k / top-p and the softmax distribution, reproducibility, one compiled loop, clear errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lexjax
import param_layouts
from lexjax import ConfigError, generation
from lexjax.attention import MaskSpec

CONFIGS = param_layouts.causal_model_configs()  # encoders do not generate
VOCAB = 64


def build(config):
    model = param_layouts.build(config)
    variables = model.init(jax.random.PRNGKey(0), jnp.ones((2, param_layouts.INIT_LENGTH),
                                                            jnp.int32))
    return model, variables


def random_tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(2, VOCAB, shape), jnp.int32)


def argmax_loop(model, variables, prompt, new):
    """The reference: `new` times, a full forward pass and the argmax of the logits at the last
    token. Models with logits at every position run on one zero-padded buffer of the final
    length (one compilation; they are causal); Perceiver AR on the exact prefix."""
    batch, width = prompt.shape
    seq = np.zeros((batch, width + new), np.int32)
    seq[:, :width] = prompt
    forward = jax.jit(model.apply)
    every_position = forward(variables, jnp.asarray(seq)).shape[1] == seq.shape[1]
    for n in range(width, width + new):
        if every_position:
            logits = forward(variables, jnp.asarray(seq))[:, n - 1]
        else:
            logits = forward(variables, jnp.asarray(seq[:, :n]))[:, -1]
        seq[:, n] = np.asarray(jnp.argmax(logits, -1))
    return seq


@pytest.mark.parametrize("config", CONFIGS)
def test_greedy_equals_an_argmax_loop_over_full_forward_passes(config):
    """A 6-token prompt and 7 new tokens cross the chunk and block boundaries (CHUNK_SIZE 8)."""
    model, variables = build(config)
    prompt = random_tokens((2, 6), seed=1)
    out = lexjax.generate(model, variables, prompt, 7)
    np.testing.assert_array_equal(out, argmax_loop(model, variables, prompt, 7))


@pytest.mark.parametrize("config", ["transformer", "gss", "perceiver_ar", "block_recurrent"])
def test_ragged_prompts_decode_each_row_as_if_alone(config):
    model, variables = build(config)
    lengths = np.array([3, 7, 5])
    prompt = random_tokens((3, 7), seed=2)
    padded = jnp.where(jnp.arange(7)[None] < lengths[:, None], prompt, VOCAB - 1)  # any pad id
    out = np.asarray(lexjax.generate(model, variables, padded, 4, prompt_lengths=lengths))
    for row, n in enumerate(lengths):
        alone = np.asarray(lexjax.generate(model, variables, prompt[row:row + 1, :n], 4))[0]
        np.testing.assert_array_equal(out[row, :n + 4], alone, err_msg=f"row {row}")
        assert (out[row, n + 4:] == generation.PAD_ID).all()


def test_rows_stop_at_eos_and_pad_after_it():
    model, variables = build("transformer")
    prompt = random_tokens((3, 4), seed=3)
    free = np.asarray(lexjax.generate(model, variables, prompt, 8))
    eos = int(free[0, 4 + 2])  # row 0's third new token
    out = np.asarray(lexjax.generate(model, variables, prompt, 8, eos_id=eos))
    for row in range(3):
        new = free[row, 4:]
        stop = list(new).index(eos) + 1 if eos in new else len(new)
        np.testing.assert_array_equal(out[row, :4 + stop], free[row, :4 + stop])
        assert (out[row, 4 + stop:] == generation.PAD_ID).all(), out[row]
    assert (out[0, 4 + 3:] == generation.PAD_ID).all()


def test_the_decode_loop_is_one_compiled_while_loop():
    """The Transformer prefills in one pass: with the materialized reference attention (the
    blocked one maps over query blocks) and unrolled layers, the only loop is the decode loop."""
    model, variables = build("transformer")
    model = model.clone(attention_impl="reference")
    program = generation._generation_program(model, 5, 4, 0.0, None, None, None)
    text = program.lower(variables, random_tokens((1, 4)), jnp.array([4]),
                         jax.random.PRNGKey(0)).as_text()
    assert text.count("stablehlo.while") == 1


def test_sampling_is_reproducible_and_keeps_the_prompt():
    model, variables = build("transformer")
    prompt = random_tokens((2, 5), seed=4)

    def sample(seed, **kw):
        return np.asarray(lexjax.generate(model, variables, prompt, 12, temperature=1.5,
                                          rng=jax.random.PRNGKey(seed), **kw))

    a, b, c = sample(7, top_k=20), sample(7, top_k=20), sample(8, top_k=20)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, :5], prompt)
    assert not np.array_equal(a, c)
    greedy = np.asarray(lexjax.generate(model, variables, prompt, 12))
    np.testing.assert_array_equal(sample(9, top_k=1), greedy)
    np.testing.assert_array_equal(sample(9, top_p=1e-6), greedy)


def test_filter_logits_against_numpy():
    logits = np.random.default_rng(5).normal(size=(4, 50)).astype(np.float32)
    for k in (1, 3, 50):
        kept = np.isfinite(np.asarray(generation.filter_logits(jnp.asarray(logits), k, None)))
        expected = logits >= np.sort(logits, axis=-1)[:, -k][:, None]
        np.testing.assert_array_equal(kept, expected)
    for p in (0.05, 0.5, 0.9, 1.0):
        kept = np.isfinite(np.asarray(generation.filter_logits(jnp.asarray(logits), None, p)))
        for row in range(4):
            probs = np.exp(logits[row] - logits[row].max())
            probs /= probs.sum()
            order = np.argsort(-probs)
            size = int(np.searchsorted(np.cumsum(probs[order]), p - 1e-6)) + 1
            assert set(np.flatnonzero(kept[row])) == set(order[:min(size, 50)]), (p, row)


def test_samples_follow_the_softmax_of_logits_over_temperature():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(probs)[None] * 2.0, jnp.float32)  # / temperature 2 -> probs
    keys = jax.random.split(jax.random.PRNGKey(0), 8000)
    draws = jax.vmap(lambda k: generation.next_tokens(logits, k, 2.0, None, None)[0])(keys)
    frequencies = np.bincount(np.asarray(draws), minlength=4) / len(keys)
    np.testing.assert_allclose(frequencies, probs, atol=0.02)
    top2 = jax.vmap(lambda k: generation.next_tokens(logits, k, 2.0, 2, None)[0])(keys)
    np.testing.assert_allclose(np.bincount(np.asarray(top2), minlength=4) / len(keys),
                               [0.625, 0.375, 0, 0], atol=0.02)


def test_sliding_window_decoding_past_the_window_and_the_training_length():
    model, variables = build("transformer")
    model = model.clone(mask=MaskSpec(causal=True, window=5))
    prompt = random_tokens((2, 9), seed=6)
    out = lexjax.generate(model, variables, prompt, 3 * param_layouts.INIT_LENGTH)
    np.testing.assert_array_equal(
        out, argmax_loop(model, variables, prompt, 3 * param_layouts.INIT_LENGTH))


@pytest.mark.parametrize("kwargs, words", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=1.0), "rng"),
    (dict(temperature=1.0, top_k=0, rng=jax.random.PRNGKey(0)), "top_k"),
    (dict(temperature=1.0, top_p=1.5, rng=jax.random.PRNGKey(0)), "top_p"),
    (dict(prompt_lengths=np.array([0, 3])), "prompt_lengths"),
])
def test_bad_settings_raise_a_config_error(kwargs, words):
    model, variables = build("transformer")
    with pytest.raises(ConfigError, match=words):
        lexjax.generate(model, variables, random_tokens((2, 3)), 4, **kwargs)


def test_a_negative_token_count_raises_a_config_error():
    model, variables = build("transformer")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        lexjax.generate(model, variables, random_tokens((2, 3)), -1)


def test_a_learned_position_table_is_not_read_past_its_end():
    model = lexjax.build_model(["configs/models/transformer.gin", "configs/positions/learned.gin"],
                               ["NUM_LAYERS=1", "EMBED_DIM=16", "NUM_HEADS=2", "MLP_DIM=32",
                                "VOCAB_SIZE=64", "MAX_POSITIONS=12"])
    variables = model.init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))
    assert lexjax.generate(model, variables, random_tokens((1, 8)), 4).shape == (1, 12)
    with pytest.raises(ConfigError, match="12 positions"):
        lexjax.generate(model, variables, random_tokens((1, 8)), 5)


def test_generation_on_a_mesh_equals_one_device():
    """Parameters sharded over data:2,tensor:2: the same tokens, and the key/value cache split
    over the heads like the key projection. (Flax drops activation sharding constraints on CPU,
    so the batch axis of the cache is only laid out on `data` on accelerators.)"""
    from lexjax import partitioning
    model, variables = build("transformer")
    prompt = random_tokens((2, 6), seed=7)
    expected = lexjax.generate(model, variables, prompt, 5)
    mesh = partitioning.make_mesh("data:2,tensor:2", jax.devices()[:4])
    shardings = partitioning.state_shardings(variables["params"], mesh)
    params = jax.device_put(nn.unbox(variables["params"]), shardings)
    with partitioning.mesh_context(mesh):
        out = lexjax.generate(model, {"params": params}, prompt, 5)
        cache = jax.jit(lambda v, p: model.prefill(v, p, max_length=11)[1])(
            {"params": params}, prompt)
    np.testing.assert_array_equal(out, expected)
    keys = [x for path, x in jax.tree_util.tree_leaves_with_path(cache)
            if "keys" in jax.tree_util.keystr(path)]
    assert keys and all(x.sharding.shard_shape(x.shape)[-2] == x.shape[-2] // 2 for x in keys)
