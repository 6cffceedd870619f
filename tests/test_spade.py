"""SPADE built through gin: causality at ragged lengths (window and chunk attention), the
state-space branch in the bottom layer only and reaching past the attention window, FLOPs, axes,
long inputs and a tiny training run."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lexjax
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


def assert_causal(model, variables, length, positions):
    """Changing the token at each of `positions` (one sequence each) leaves the logits before it
    unchanged and moves the logits from it on."""
    base = tokens(1, length, seed=length)
    batch = jnp.concatenate([base] + [base.at[:, p].set((base[:, p] + 7) % VOCAB)
                                      for p in positions])
    logits = jax.jit(model.apply)(variables, batch)
    assert logits.shape == (len(batch), length, VOCAB) and logits.dtype == jnp.float32
    for i, p in enumerate(positions, start=1):
        np.testing.assert_allclose(logits[i, :p], logits[0, :p], atol=2e-5)
        assert float(jnp.max(jnp.abs(logits[i, p:] - logits[0, p:]))) > 1e-3


@pytest.mark.parametrize("local", ["window", "chunk"])
def test_causal_at_ragged_lengths(local):
    model, variables = initialized(f'{S}local_attention="{local}"')
    assert_causal(model, variables, 1, [0])
    assert_causal(model, variables, 30, [0, 2, 12, 23, 29])  # blocks of 8, a ragged last one


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
    assert {"ssm", "ssm_out", "global_norm", "local_norm", "combine"} <= set(params["layer_0"])
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
    params["layer_0"]["ssm_out"]["kernel"] = jnp.zeros_like(params["layer_0"]["ssm_out"]["kernel"])
    a, b = apply({"params": params}, toks), apply({"params": params}, other)
    np.testing.assert_allclose(a[:, 1:], b[:, 1:], atol=1e-6)  # the model is now pointwise


def test_flops_per_token_counts_every_term():
    model, variables = initialized()
    leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(variables["params"]))[0]
    projections = sum(2.0 * x.size for path, x in leaves
                      if jax.tree_util.keystr(path).endswith("['kernel']"))
    length = 100
    attention = 2 * 2.0 * 32 * MaskSpec(window=8).mean_keys_per_query(length)  # 4 heads x 8
    want = (projections + 2 * attention + ssm_flops_per_token(32, 8, length)
            + 2.0 * 32 * VOCAB)
    assert model.flops_per_token(length) == pytest.approx(want)


def test_reference_defaults_and_axes():
    model = lexjax.build_model(["configs/models/spade.gin"])
    assert (model.chunk_size, model.local_attention, model.state_dim, model.ssm_variant) == (
        512, "window", 64, "dss")
    assert type(model.position).__name__ == "T5Buckets"
    _, variables = initialized()
    check_logical_axes(variables["params"])


def test_finite_at_long_length():
    model, variables = initialized()
    logits = jax.jit(model.apply)(variables, tokens(1, 8192))
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_tiny_training_run_loss_falls():
    model, variables = initialized()
    params = nn.unbox(variables["params"])
    toks = tokens(4, 32, seed=7)
    optimizer = optax.adam(3e-3)

    def loss_fn(p):
        logits = model.apply({"params": p}, toks[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()

    @jax.jit
    def step(p, state):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    state = optimizer.init(params)
    losses = []
    for _ in range(25):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.5
