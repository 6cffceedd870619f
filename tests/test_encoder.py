"""The bidirectional encoder (`lexjax.models.Encoder`): every position scheme in its
bidirectional form, receptive fields of the local-attention overlays against the mask's
definition, packed documents and padding kept apart, the heads, and fine-tuning's parameter
transfer."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lexjax
from lexjax.attention import MaskSpec
from lexjax.training.loop import TrainingError, transfer_params

ONE = ["NUM_LAYERS=1", "EMBED_DIM=32", "NUM_HEADS=2", "MLP_DIM=64"]
TWO = ["NUM_LAYERS=2"] + ONE[1:]
POSITIONS = ["nope", "sinusoidal", "learned", "rope", "xpos", "alibi", "sandwich", "kerple", "t5"]


def build(files=(), bindings=(), layers=TWO):
    return lexjax.build_model(["configs/models/encoder.gin", *files], list(layers) + list(bindings))


def tokens_of(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(3, 259, shape), jnp.int32)


def dependence(model, variables, tokens, **kwargs):
    """bool `[n, n]`: whether the output at query q changes when token k changes."""
    base = model.apply(variables, tokens, **kwargs)
    n = tokens.shape[1]
    out = np.zeros((n, n), bool)
    for k in range(n):
        changed = model.apply(variables, tokens.at[:, k].set((tokens[:, k] + 7) % 250 + 3),
                              **kwargs)
        out[:, k] = np.asarray(jnp.max(jnp.abs(changed - base), axis=(0, 2)) > 1e-6)
    return out


@pytest.mark.parametrize("position", POSITIONS)
def test_every_scheme_is_bidirectional(position):
    model = build([f"configs/positions/{position}.gin"])
    tokens = tokens_of((2, 24))
    variables = model.init(jax.random.PRNGKey(0), tokens)
    logits = model.apply(variables, tokens)
    assert logits.shape == (2, 24, 384) and bool(jnp.all(jnp.isfinite(logits)))
    later = model.apply(variables, tokens.at[:, 20].set(9))
    assert float(jnp.max(jnp.abs(later[:, 3] - logits[:, 3]))) > 1e-6  # a later token counts


def test_t5_buckets_become_bidirectional():
    model = build(["configs/positions/t5.gin"])
    assert model.position.bidirectional is False  # as configured (the causal default)
    assert model.position_template.bidirectional  # what the attention layers clone


@pytest.mark.parametrize("features,bindings,mask", [
    ((), (), MaskSpec(causal=False)),
    (("local_window",), ("WINDOW=4",), MaskSpec(causal=False, window=4)),
    (("local_blocks",), ("WINDOW=8",), MaskSpec(causal=False, chunk=8)),
    (("local_window", "global_tokens"), ("WINDOW=3", "NUM_GLOBAL=2"),
     MaskSpec(causal=False, window=3, global_tokens=2)),
    (("local_blocks", "global_tokens"), ("WINDOW=8", "NUM_GLOBAL=1"),
     MaskSpec(causal=False, chunk=8, global_tokens=1)),
])
def test_one_layer_sees_exactly_its_mask(features, bindings, mask):
    model = build([f"configs/features/{f}.gin" for f in features], bindings, layers=ONE)
    assert model.mask == mask
    tokens = tokens_of((1, 20))
    variables = model.init(jax.random.PRNGKey(0), tokens)
    positions = np.arange(20)
    expected = np.asarray(mask.allows(positions[:, None], positions[None, :]))
    assert np.array_equal(dependence(model, variables, tokens), expected)


def test_packed_documents_are_kept_apart():
    for position in ("rope", "learned"):
        model = build([f"configs/positions/{position}.gin"])
        a, b = tokens_of((1, 9), 1), tokens_of((1, 7), 2)
        packed = jnp.concatenate([a, b], axis=1)
        segments = jnp.asarray([[1] * 9 + [2] * 7], jnp.int32)
        variables = model.init(jax.random.PRNGKey(0), packed)
        together = model.apply(variables, packed, segment_ids=segments)
        np.testing.assert_allclose(together[:, :9], model.apply(variables, a), atol=2e-5)
        np.testing.assert_allclose(together[:, 9:], model.apply(variables, b), atol=2e-5)


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_classifier_ignores_padding(pooling):
    model = build(bindings=["NUM_CLASSES=3"]).clone(pooling=pooling)
    tokens = tokens_of((2, 12)).at[:, 8:].set(0)
    segments = (tokens != 0).astype(jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), tokens)
    logits = model.apply(variables, tokens, segment_ids=segments)
    assert logits.shape == (2, 3)
    other_padding = tokens.at[:, 8:].set(77)  # what sits under padding does not count
    np.testing.assert_allclose(model.apply(variables, other_padding, segment_ids=segments),
                               logits, atol=1e-5)
    shorter = model.apply(variables, tokens[:, :8], segment_ids=segments[:, :8])
    np.testing.assert_allclose(shorter, logits, atol=1e-5)


def test_mean_pooling_is_the_mean_of_the_real_positions():
    model = build(bindings=["NUM_CLASSES=2"])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 3)), jnp.float32)
    segments = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.int32)
    pooled = model.pool(x, segments)
    np.testing.assert_allclose(pooled[0], np.asarray(x)[0, :3].mean(0), rtol=1e-6)
    np.testing.assert_allclose(pooled[1], np.asarray(x)[1].mean(0), rtol=1e-6)


def test_encoder_refuses_what_it_cannot_do():
    model = build()
    tokens = tokens_of((1, 8))
    variables = model.init(jax.random.PRNGKey(0), tokens)
    with pytest.raises(ValueError, match="does not decode"):
        model.prefill(variables, tokens, max_length=16)
    with pytest.raises(lexjax.ConfigError, match="must be bidirectional"):
        build(bindings=["lexjax.models.Encoder.mask = @lexjax.attention.MaskSpec()"])
    with pytest.raises(lexjax.ConfigError, match="num_classes"):
        build(bindings=["NUM_CLASSES=1"])


def test_flops_count_every_key_of_a_full_bidirectional_mask():
    model = build()
    n = 64
    per_block = model.block_macs(n)  # every query sees all n keys
    head = model.embed_dim * (model.embed_dim + model.vocab_size)
    assert model.flops_per_token(n) == 2.0 * (model.num_layers * per_block + head)
    blocks = build(["configs/features/local_blocks.gin"], ["WINDOW=16"])
    assert blocks.flops_per_token(n) < model.flops_per_token(n)


def test_transfer_params_keeps_shared_arrays_and_fresh_heads():
    saved = {"encoder": {"w": np.ones((2, 3))}, "mlm_dense": {"kernel": np.ones((3, 3))}}
    fresh = {"encoder": {"w": jnp.zeros((2, 3))}, "classifier": {"kernel": jnp.zeros((3, 2))}}
    params, fresh_names, unused = transfer_params(saved, fresh, "SRC")
    assert np.all(np.asarray(params["encoder"]["w"]) == 1)
    assert np.all(np.asarray(params["classifier"]["kernel"]) == 0)
    assert fresh_names == ["['classifier']['kernel']"] and unused == ["['mlm_dense']['kernel']"]
    with pytest.raises(TrainingError, match="has shape"):
        transfer_params({"encoder": {"w": np.ones((4, 3))}}, fresh, "SRC")
    with pytest.raises(TrainingError, match="shares no parameter"):
        transfer_params({"other": np.ones(1)}, fresh, "SRC")
    three_classes = {"encoder": {"w": np.ones((2, 3))}, "classifier": {"kernel": np.ones((3, 3))}}
    params, fresh_names, unused = transfer_params(three_classes, fresh, "SRC",
                                                  heads=("classifier",))
    assert np.all(np.asarray(params["classifier"]["kernel"]) == 0)  # another class count
    assert fresh_names == unused == ["['classifier']['kernel']"]


@pytest.mark.parametrize("features,bindings", [
    ((), ()), (("local_blocks",), ("WINDOW=8",)), (("local_window",), ("WINDOW=5",))])
def test_pallas_kernels_equal_the_xla_path(features, bindings):
    """The encoder through the Pallas kernels (interpreted on CPU) equals the blocked XLA path,
    with packed documents, forward and gradients."""
    files = [f"configs/features/{f}.gin" for f in features]
    xla = build(files, [*bindings, "lexjax.models.Encoder.attention_impl='xla'"])
    pallas = build(files, [*bindings, "lexjax.models.Encoder.attention_impl='pallas'"])
    tokens = tokens_of((2, 32))
    segments = jnp.asarray([[1] * 20 + [2] * 12, [1] * 32], jnp.int32)
    variables = xla.init(jax.random.PRNGKey(0), tokens)

    def loss(model, params):
        return jnp.mean(model.apply({"params": params}, tokens, segment_ids=segments) ** 2)

    np.testing.assert_allclose(loss(pallas, variables["params"]), loss(xla, variables["params"]),
                               rtol=1e-5)
    grads = [jax.grad(functools.partial(loss, m))(variables["params"]) for m in (xla, pallas)]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           *grads)


def test_global_tokens_need_a_local_mask_and_one_document_per_row():
    with pytest.raises(lexjax.ConfigError, match="only add to a local mask"):
        build(["configs/features/global_tokens.gin"], ["NUM_GLOBAL=2"])
    plain = build(["configs/features/local_blocks.gin"], ["WINDOW=8"])
    with_global = build(["configs/features/local_blocks.gin", "configs/features/global_tokens.gin"],
                        ["WINDOW=8", "NUM_GLOBAL=2"])
    assert plain.packs_documents and not with_global.packs_documents
    from lexjax.data import DataConfig
    from lexjax.objectives import MaskedLM
    data = DataConfig(task="lexjax.stdlib_code")
    assert MaskedLM().prepare(with_global, data).documents_apart
    assert not MaskedLM().prepare(plain, data).documents_apart
    with pytest.raises(lexjax.ConfigError, match="has a classification head"):
        MaskedLM().prepare(build(bindings=["NUM_CLASSES=2"]), data)


def test_classification_step_on_a_mesh_equals_one_device():
    """The fine-tuning step (class labels `[batch]` split over the batch axes) on a data x
    tensor mesh equals the one-device step."""
    from lexjax import partitioning
    from lexjax.data import DataConfig
    from lexjax.objectives import Classification
    from lexjax.training import OptimizerConfig, ShardedTrainStep, TrainConfig

    model = build(bindings=["NUM_CLASSES=2"])
    config = TrainConfig(data=DataConfig(task="lexjax.stdlib_is_test"), train_steps=10,
                         batch_size=4, train_length=16, objective=Classification(),
                         optimizer=OptimizerConfig(learning_rate=0.1, warmup_steps=1))
    inputs = np.array(tokens_of((4, 16)))
    inputs[1, 10:] = 0
    batch = {"inputs": inputs, "segment_ids": (inputs != 0).astype(np.int32),
             "label": np.asarray([0, 1, 1, 0], np.int32)}
    losses = []
    for spec, devices in (("", jax.devices()[:1]), ("data:2,tensor:2", jax.devices()[:4])):
        step = ShardedTrainStep(model, config, partitioning.make_mesh(spec, devices))
        compiled, _ = step.compile()
        state = step.init(0)
        for _ in range(2):  # the first step has learning rate 0
            state, metrics = compiled(state, step.device_batch(batch), jax.random.PRNGKey(0))
        losses.append(float(metrics["loss"]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
