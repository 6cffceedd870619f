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


def numpy_softmax_attention(q, k, v) -> np.ndarray:
    """Full causal softmax attention with τ = √z."""
    n = q.shape[1]
    logits = np.einsum("bqz,bkz->bqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    return attn / attn.sum(-1, keepdims=True) @ v


def numpy_mega_layer(x: np.ndarray, params: dict, attention=numpy_softmax_attention
                     ) -> np.ndarray:
    """Eqs. 5–15 in float64 with `attention(q, k, v)` (full causal softmax) and no position
    scheme."""
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
    o = attention(q, k, v)
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


def assert_decoding_equals_forward(model, variables, toks) -> None:
    decoded, _ = decode_all(model, variables, toks, prompt=3, max_length=16)
    np.testing.assert_allclose(decoded, jax.jit(model.apply)(variables, toks), rtol=1e-4,
                               atol=1e-4)


def test_decoding_with_rotary_positions_equals_forward():
    model, variables = initialized()
    assert_decoding_equals_forward(model, sharpened(variables), tokens(1, 11, seed=9))


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
    assert (model.qk_features, model.value_features, model.ema_dim, model.mask.chunk) == (
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


# The reference's relative biases and element-wise attention (facebookresearch/mega @aeaa4b4,
# fairseq/modules/relative_positional_bias.py, moving_average_gated_attention.py, utils.py),
# ported to float64 numpy step by step.

def reference_simple_bias(table: np.ndarray, seq_len: int) -> np.ndarray:
    """`SimpleRelativePositionalBias.forward`: its pad / tile / view construction of `[n, n]`."""
    m = (table.shape[0] + 1) // 2
    b = table[m - seq_len:m + seq_len - 1]
    t = np.tile(np.pad(b, (0, seq_len)), seq_len)[:-seq_len].reshape(seq_len, 3 * seq_len - 2)
    r = (2 * seq_len - 1) // 2
    return t[:, r:t.shape[1] - r]


def reference_rotary_bias(alpha: np.ndarray, beta: np.ndarray, seq_len: int) -> np.ndarray:
    """`RotaryRelativePositionalBias.forward`: α and β expanded to every position, rotated
    (half-split pairs, sinusoid table of `get_sinusoid_embeddings`), then `a bᵀ`."""
    half = alpha.shape[0] // 2
    freq = np.exp(np.arange(half) * -(np.log(10000) / half))
    angles = np.arange(seq_len)[:, None] * freq[None, :]
    sin, cos = np.sin(angles), np.cos(angles)

    def rotary(x):
        x1, x2 = x[:half], x[half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=1)
    return rotary(alpha) @ rotary(beta).T


def reference_laplace(x):
    from scipy.special import erf
    return 0.5 * (1.0 + erf((x - 0.707107) / (0.282095 * np.sqrt(2.0))))


def bias_matrix(scheme, params: dict, n: int, head_dim: int) -> np.ndarray:
    positions = jnp.arange(n)
    bias = nn.apply(lambda s: s.relative_bias(1, head_dim), scheme)({"params": params})
    return np.asarray(bias(positions[:, None] - positions[None, :]))[0]


def test_simple_bias_is_the_references_table():
    """Entry (i, j) of the reference's matrix is w[M - 1 + j - i]; offsets past M - 1 read the
    edge entry (the reference raises)."""
    from lexjax.positions import SimpleRelativeBias
    scheme = SimpleRelativeBias(max_distance=6)
    table = np.random.default_rng(0).normal(size=11)
    got = bias_matrix(scheme, {"rel_pos_bias": jnp.asarray(table[None], jnp.float32)}, 6, 4)
    np.testing.assert_allclose(got, reference_simple_bias(table, 6), rtol=1e-6)
    far = bias_matrix(scheme, {"rel_pos_bias": jnp.asarray(table[None], jnp.float32)}, 9, 4)
    assert far[8, 0] == pytest.approx(table[0]) and far[0, 8] == pytest.approx(table[-1])


def test_rotary_bias_is_the_references_product():
    """rot(α, i) · rot(β, j) for every (i, j), from its offset alone (with gradients through
    the per-head coefficients)."""
    from lexjax.positions import RotaryRelativeBias
    rng = np.random.default_rng(1)
    alpha, beta = rng.normal(size=(2, 16))
    params = {"alpha": jnp.asarray(alpha[None], jnp.float32),
              "beta": jnp.asarray(beta[None], jnp.float32)}
    got = bias_matrix(RotaryRelativeBias(), params, 40, 16)
    np.testing.assert_allclose(got, reference_rotary_bias(alpha, beta, 40), rtol=1e-4,
                               atol=1e-5)
    bias = nn.apply(lambda s: s.relative_bias(1, 16), RotaryRelativeBias())({"params": params})
    rel = jnp.arange(-5, 6)
    np.testing.assert_allclose(np.asarray(bias(rel)), np.asarray(jax.vmap(
        lambda theta: bias.fn(theta, rel))(bias.params)), rtol=1e-5, atol=1e-6)


def numpy_elementwise_attention(q, k, v, function, chunk: int) -> np.ndarray:
    """The reference's `element_attention` for a causal chunked decoder: inside each chunk,
    `f(q kᵀ / lengths + bias) ⊙ tril` with lengths the row sums of the 0/1 causal mask, then
    `· v` (no normalisation). No bias (NoPE)."""
    out = np.zeros(q.shape[:2] + v.shape[-1:])
    for start in range(0, q.shape[1], chunk):
        s = slice(start, start + chunk)
        c = q[:, s].shape[1]
        mask = np.tril(np.ones((c, c)))
        qk = np.einsum("bqz,bkz->bqk", q[:, s], k[:, s]) / mask.sum(-1, keepdims=True)
        out[:, s] = (function(qk) * mask) @ v[:, s]
    return out


@pytest.mark.parametrize("name", ["laplace", "relu2"])
def test_elementwise_attention_matches_the_reference(rng, name):
    """A Mega-chunk layer (chunk 4, a partial last chunk) with the reference's laplace / relu²
    attention, against eqs. 6–15 in float64 with `element_attention` in place of softmax."""
    function = {"laplace": reference_laplace,
                "relu2": lambda a: np.maximum(a, 0.0) ** 2}[name]
    layer = MegaLayer(qk_dim=6, value_dim=10, ema_dim=3, position=NoPE(),
                      mask=MaskSpec(chunk=4), attention_function=name)
    x = rng.normal(size=(2, 11, 5))
    variables = sharpened(jax.jit(layer.init)(jax.random.PRNGKey(0), jnp.zeros((1, 11, 5)),
                                              jnp.arange(11)))
    got = jax.jit(layer.apply)(variables, jnp.asarray(x, jnp.float32), jnp.arange(11))
    attention = functools.partial(numpy_elementwise_attention, function=function, chunk=4)
    np.testing.assert_allclose(got, numpy_mega_layer(x, variables["params"], attention),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bindings", [(f"{M}attention_function='laplace'",),
                                      (f"{M}attention_function='relu2'", f"{M}chunk_size=None")],
                         ids=["laplace_chunk", "relu2_full"])
def test_elementwise_decoding_equals_forward(bindings):
    model, variables = initialized(*bindings, position="t5")
    assert_decoding_equals_forward(model, sharpened(variables), tokens(2, 13, seed=3))


def test_reference_defaults_rotary_bias_and_quarter_width_z():
    """mega.gin: the learned rotary bias (additive: q and k are not rotated), z = d/4 (the
    reference's 128 at d = 512, 256 for mega_lm_big's d = 1024); decoding with it equals the
    forward pass."""
    from lexjax.positions import RotaryRelativeBias
    assert isinstance(lexjax.build_model(["configs/models/mega.gin"]).position,
                      RotaryRelativeBias)
    big = lexjax.build_model(["configs/models/mega.gin"], ("EMBED_DIM=1024",))
    assert big.qk_features == 256
    model = lexjax.build_model(["configs/models/mega.gin"], TINY[:-2])
    variables = sharpened(jax.jit(model.init)(jax.random.PRNGKey(0), tokens(1, 16)))
    hooks = nn.unbox(variables["params"])["layer_0"]["mega"]["position_hooks"]
    assert hooks["alpha"].shape == hooks["beta"].shape == (1, 8)  # z = 32 / 4
    assert_decoding_equals_forward(model, variables, tokens(2, 13, seed=4))
    with pytest.raises(lexjax.ConfigError, match="attention_function"):
        lexjax.build_model(["configs/models/mega.gin"], TINY + (f"{M}attention_function='relu'",))
    with pytest.raises(lexjax.ConfigError, match="even z"):
        lexjax.build_model(["configs/models/mega.gin"], ("EMBED_DIM=36",))


def test_full_mega_elementwise_attention_in_query_blocks_equals_one_block(monkeypatch):
    """Full Mega's element-wise attention runs in query blocks (ELEMENTWISE_BLOCK) past the
    block length: blocks of 4 against one block over all 13 positions, with a T5 bias."""
    import lexjax.models.mega as mega
    model, variables = initialized(f"{M}attention_function='laplace'", f"{M}chunk_size=None",
                                   position="t5")
    toks = tokens(2, 13, seed=8)
    whole = model.apply(variables, toks)
    monkeypatch.setattr(mega, "ELEMENTWISE_BLOCK", 4)
    np.testing.assert_allclose(model.apply(variables, toks), whole, rtol=1e-5, atol=1e-5)
