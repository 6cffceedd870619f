"""FLASH and FLASH-Quad language models: gin builds, position schemes, gradients, decoding with
every scheme, FLOP accounting. (Causality, training and the decoding contract of every model:
tests/test_lm_contract.py.)"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lexjax
from helpers import decode_all
from lexjax.losses import shift_right, token_losses
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


@pytest.mark.parametrize("name,scheme", [("flash", "rope"), ("flash", "t5"),
                                         ("flash", "sinusoidal"), ("flash_quad", "xpos"),
                                         ("flash_quad", "alibi")])
def test_decoding_reproduces_the_forward_pass(name, scheme, rng):
    """Decoding over three chunks and a partial fourth (ragged) equals the full forward pass:
    FLASH token by token from a cache of one chunk of keys/values and the cross-chunk state,
    FLASH-Quad (which prefills in one pass) from a cache of every key and value."""
    model = build(name, f"configs/positions/{scheme}.gin")
    variables = lively(model.init(jax.random.PRNGKey(0), tokens(rng, 1, 8)), rng)
    x = tokens(rng, 2, 14)
    decoded, cache = decode_all(model, variables, x, prompt=3, max_length=16)
    keys = cache["unit_0"]["gau"]
    if name == "flash":
        assert keys["keys"].shape == (2, 4, 8)  # one chunk of 4 keys of width s = 8
    else:
        assert keys["kv_cache"]["keys"].shape == (2, 16, 1, 8)  # every key, up to 16
    assert int(cache["index"]) == 14
    np.testing.assert_allclose(decoded, model.apply(variables, x), rtol=1e-4, atol=1e-4)


def test_flash_decoding_refuses_xpos_and_several_tokens(rng):
    with pytest.raises(ValueError, match="XPos"):
        build("flash", "configs/positions/xpos.gin").init_cache(1, 8)
    model = build("flash")
    variables = model.init(jax.random.PRNGKey(0), tokens(rng, 1, 8))
    with pytest.raises(ValueError, match="one token per call"):
        model.apply({**variables, "cache": model.init_cache(1, 8)}, tokens(rng, 1, 2),
                    decode=True, mutable=["cache"])


def test_flops_per_token_by_hand():
    model = build("flash")  # d=16, e=16, s=8, C=4, 2 units, vocab 32
    d, e, s, c = 16, 16, 8, 4
    unit = d * (3 * e + s) + (s + e) * (c + 1) / 2 + 2 * s * e
    assert model.flops_per_token(64) == pytest.approx(2 * (2 * unit + d * 32))
    assert model.flops_per_token(4096) == model.flops_per_token(64)  # linear in length
    quad = build("flash_quad")
    unit = d * (3 * e + s) + (s + e) * (64 + 1) / 2
    assert quad.flops_per_token(64) == pytest.approx(2 * (2 * unit + d * 32))


def test_bad_chunk_size_is_a_clear_error():
    with pytest.raises(lexjax.ConfigError, match="chunk_size"):
        build("flash", bindings=["CHUNK_SIZE=0"])


@pytest.mark.parametrize("block", [None, 4])  # one block, and the blocked (mapped) path
def test_flash_quad_keeps_packed_documents_apart(block, rng):
    """A query sees, and its normaliser T counts, the keys of its own document only: logits on a
    packed row equal each document's alone (with T5 biases and RoPE, blocked or not)."""
    model = build("flash_quad", "configs/positions/t5.gin",
                  bindings=[f"lexjax.models.Flash.attention_block_size={block}"])
    assert model.keeps_segments_apart and not build("flash").keeps_segments_apart
    variables = lively(model.init(jax.random.PRNGKey(0), tokens(rng, 1, 8)), rng)
    docs = [tokens(rng, 1, n) for n in (5, 9, 3)]
    segments = jnp.asarray([[1] * 5 + [2] * 9 + [3] * 3], jnp.int32)
    packed = model.apply(variables, jnp.concatenate(docs, 1), segment_ids=segments)
    start = 0
    for doc in docs:
        np.testing.assert_allclose(packed[:, start:start + doc.shape[1]],
                                   model.apply(variables, doc), rtol=1e-5, atol=1e-5)
        start += doc.shape[1]


def test_flash_quad_divides_by_the_papers_training_length():
    """FLASH-Quad's T is the paper's constant (QUADRATIC_LENGTH = 512, its training length);
    None counts the keys in view; anything else is a one-line error."""
    assert build("flash_quad").quadratic_length == 512
    assert build("flash_quad", bindings=["QUADRATIC_LENGTH=None"]).quadratic_length is None
    with pytest.raises(lexjax.ConfigError, match="quadratic_length"):
        build("flash_quad", bindings=["QUADRATIC_LENGTH=0"])
