"""The contract every language model of the zoo keeps, checked for every `configs/models/*.gin`
at tiny sizes (see `lexjax.models.lm`; bidirectional encoders keep the layout checks here and
their own contract in `tests/test_encoder.py`):

- its parameter layout (shapes and logical axis names) equals the golden JSON under
  `tests/testdata/param_layouts/` (a refactor that changes a checkpoint layout fails here), and
  every parameter has logical axis names;
- causal at chunk-multiple and ragged lengths, finite at 8K tokens;
- the trainer's own step lowers the loss;
- decoding (`prefill`, then `decode_step`) reproduces the forward pass, across chunk and block
  boundaries;
- packed documents are kept apart exactly (logits on a packed row equal each document's logits
  alone), or `segment_ids` are refused with a clear error and the trainer feeds padded rows.

Model-specific behaviour (a paper's equations, FLOP counts, options) is tested in the model's own
test file.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lexjax
import param_layouts
from helpers import study_runner
from lexjax import partitioning
from lexjax.data import DataConfig, segment_ids
from lexjax.training import state as state_lib
from lexjax.training.config import OptimizerConfig, TrainConfig
from lexjax.training.inputs import training_batches
from lexjax.training.step import ShardedTrainStep

ALL_CONFIGS = param_layouts.model_configs()
CONFIGS = param_layouts.causal_model_configs()
VOCAB = 64


@pytest.fixture(scope="module")
def models():
    """config name -> (model, params): built and initialised once per module."""
    cache = {}

    def get(config):
        if config not in cache:
            model = param_layouts.build(config)
            tokens = jnp.ones((2, param_layouts.INIT_LENGTH), jnp.int32)
            cache[config] = model, model.init(jax.random.PRNGKey(0), tokens)
        return cache[config]

    return get


def random_tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(2, VOCAB, shape), jnp.int32)


def test_every_model_config_is_covered():
    assert len(CONFIGS) >= 10 and {"transformer", "flash", "gss", "mega", "spade",
                                   "block_recurrent", "perceiver_ar"} <= set(CONFIGS)


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_parameter_layout_equals_the_golden_json(config):
    with open(param_layouts.golden_path(config)) as f:
        golden = json.load(f)
    got = param_layouts.layout(param_layouts.build(config))
    assert got["model"] == golden["model"]
    assert sorted(got["params"]) == sorted(golden["params"]), "parameters renamed or added"
    changed = {k: (golden["params"][k], v) for k, v in got["params"].items()
               if v != golden["params"][k]}
    assert not changed, f"shapes or logical axes changed: {changed}"


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_every_parameter_has_known_logical_axis_names(config):
    layout = param_layouts.layout(param_layouts.build(config))
    for path, leaf in layout["params"].items():
        assert leaf["axes"] is not None, f"{path} has no logical axis names"
        assert len(leaf["axes"]) == len(leaf["shape"]), path
        unknown = set(leaf["axes"]) - set(partitioning.WEIGHT_AXES) - {None}
        assert not unknown, f"{path}: axis names {unknown} no sharding rule knows"


@pytest.mark.parametrize("length", [16, 13])  # whole chunks and blocks, and a ragged length
@pytest.mark.parametrize("config", CONFIGS)
def test_causal_at_any_length(models, config, length):
    model, variables = models(config)
    tokens = random_tokens((1, length))
    t = length - 5
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB)
    logits = jax.jit(model.apply)(variables, jnp.concatenate([tokens, changed]))
    first = length - logits.shape[1]  # Perceiver AR scores the last positions only
    assert logits.shape[2] == VOCAB and bool(jnp.all(jnp.isfinite(logits)))
    before, after = logits[:, :t - first], logits[:, t - first:]
    np.testing.assert_allclose(before[0], before[1], atol=1e-5)
    assert float(jnp.max(jnp.abs(after[0] - after[1]))) > 1e-6


@pytest.mark.parametrize("config", CONFIGS)
def test_finite_at_8k_tokens(models, config):
    model, variables = models(config)
    logits = jax.jit(model.apply)(variables, random_tokens((1, 8192)))
    assert logits.shape[-1] == VOCAB and bool(jnp.all(jnp.isfinite(logits)))


def tiny_run(model, steps: int, length: int = 32, batch: int = 4) -> TrainConfig:
    return TrainConfig(data=DataConfig(task="lexjax.stdlib_code"), train_steps=steps,
                       batch_size=batch, train_length=length,
                       optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2))


@pytest.mark.parametrize("config", CONFIGS)
def test_the_trainers_step_lowers_the_loss(models, config):
    model, _ = models(config)
    run = tiny_run(model, steps=30)
    step = ShardedTrainStep(model, run, partitioning.make_mesh("", jax.devices()[:1]))
    text = open(__file__, "rb").read()[:run.batch_size * run.train_length]
    targets = (np.frombuffer(text, np.uint8).astype(np.int32) % (VOCAB - 3) + 3).reshape(
        run.batch_size, run.train_length)
    rows = {"targets": targets, "segment_ids": np.ones_like(targets)}
    batch = step.device_batch({name: rows[name] for name in step.example})
    compiled, _ = step.compile()
    state, key, losses = step.init(0), jax.random.PRNGKey(0), []
    for _ in range(run.train_steps):
        state, metrics = compiled(state, batch, key)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("config", CONFIGS)
def test_decoding_equals_the_forward_pass(models, config):
    """Prefill 5 tokens, then decode 8 more one at a time, crossing chunk and block boundaries
    (CHUNK_SIZE 8); every step's logits equal the forward pass's on the same prefix (one pass
    over all 13 tokens for models with logits at every position: they are causal)."""
    model, variables = models(config)
    prompt_length, total = 5, 13
    tokens = random_tokens((2, total), seed=1)
    full = jax.jit(model.apply)(variables, tokens)

    def forward(n):  # logits at position n - 1 of the forward pass on tokens[:, :n]
        if full.shape[1] == total:
            return full[:, n - 1]
        return model.apply(variables, tokens[:, :n])[:, -1]  # Perceiver AR: its last latents
    logits, cache = jax.jit(lambda v, p: model.prefill(v, p, max_length=16))(
        variables, tokens[:, :prompt_length])
    np.testing.assert_allclose(logits[:, -1], forward(prompt_length), atol=2e-5)
    step = jax.jit(model.decode_step)
    for n in range(prompt_length, total):
        logits, cache = step(variables, cache, tokens[:, n])
        np.testing.assert_allclose(logits, forward(n + 1), atol=2e-5, err_msg=f"token {n}")


DOCUMENTS = (7, 12, 5)  # lengths of the documents packed into one row


@pytest.mark.parametrize("config", CONFIGS)
def test_packed_documents_are_kept_apart_or_refused(models, config):
    model, variables = models(config)
    documents = [random_tokens((1, n), seed=i) for i, n in enumerate(DOCUMENTS)]
    row = jnp.concatenate(documents, axis=1)
    segments = jnp.concatenate([jnp.full((1, n), i + 1, jnp.int32)
                                for i, n in enumerate(DOCUMENTS)], axis=1)
    if not model.keeps_segments_apart:
        with pytest.raises(ValueError, match="cannot keep packed documents apart"):
            model.apply(variables, row, segment_ids=segments)
        return
    packed = model.apply(variables, row, segment_ids=segments)
    start = 0
    for document in documents:
        alone = model.apply(variables, document)
        np.testing.assert_allclose(packed[:, start:start + document.shape[1]], alone,
                                   atol=2e-5)
        start += document.shape[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A local text corpus of short documents (every split has files)."""
    root = tmp_path_factory.mktemp("contract_corpus")
    rng = np.random.default_rng(0)
    for i in range(60):
        words = rng.choice(["alpha", "beta", "gamma", "delta"], size=int(rng.integers(2, 30)))
        (root / f"doc{i:02d}.txt").write_text(" ".join(words) + "\n")
    return DataConfig(task="lexjax.text_files", text_files_glob=str(root / "*.txt"))


@pytest.mark.parametrize("config", CONFIGS)
def test_the_trainer_packs_or_pads_as_the_model_needs(models, corpus, config, monkeypatch,
                                                      tmp_path):
    """Models that keep documents apart read packed rows (several documents, no padding);
    models that cannot read padded rows (one document piece each, padded at the end, or at the
    start for a model scored on a row's last positions); state-carrying models read row streams
    (no segment ids)."""
    monkeypatch.setenv("LEXJAX_DATA_CACHE", str(tmp_path))
    model, _ = models(config)
    run = TrainConfig(data=corpus, train_steps=1, batch_size=8, train_length=64)
    batch = next(training_batches(model, run))
    targets = batch["targets"]
    assert targets.shape == (8, 64)
    if state_lib.carries_state(model):
        assert set(batch) == {"targets"} and np.all(targets > 0)
        return
    ids = batch["segment_ids"]
    np.testing.assert_array_equal(ids, segment_ids(targets))
    if model.keeps_segments_apart:
        assert np.all(ids > 0) and ids.max() > 1  # packed: several documents per row
    else:
        assert set(np.unique(ids)) <= {0, 1} and np.any(ids == 0)  # padded: one piece a row
        ends_with_text = model.padding_side == "left"
        steps = np.diff(ids, axis=1)
        assert np.all(steps >= 0) if ends_with_text else np.all(steps <= 0)
        assert np.all(ids[:, -1] == 1) if ends_with_text else np.all(ids[:, 0] == 1)


#: The study runners in experiments/ and the configurable each registers.
STUDY_RUNNERS = {"local_attention": "LocalAttentionStudy", "mlm_efficiency": "MLMEfficiencyStudy",
                 "extrapolation": "Study"}


def gin_files():
    root = os.path.join(lexjax.config.REPO_ROOT, "configs")
    return sorted(os.path.relpath(os.path.join(d, f), lexjax.config.REPO_ROOT)
                  for d, _, files in os.walk(root) for f in files if f.endswith(".gin"))


def test_all_gin_files_are_checked():
    assert len(gin_files()) >= 30


@pytest.mark.parametrize("path", gin_files())
def test_every_gin_file_parses_and_builds(path):
    """Each gin file with what it is meant to follow: model and run gins alone (the model is
    built, a run's TrainConfig too), position and feature gins after a model gin, data and mesh
    gins after the quickstart run, study gins with their runner's configurable registered."""
    import gin

    from lexjax.config import configured_model, parse_gin
    from lexjax.runs import configured_training

    kind = path.split(os.sep)[1]
    files, bindings = [path], []
    if kind in ("positions", "features"):
        files = ["configs/models/transformer.gin", "configs/positions/xpos.gin", path]
        bindings = ["BCA_BLOCK=64", "INFERENCE_WINDOW=64"]
        if "local_" in path or "global_tokens" in path:  # encoder overlays
            base = [] if "local_" in path else ["configs/features/local_blocks.gin"]
            files = ["configs/models/encoder.gin", *base, path]
            bindings = ["WINDOW=8", "NUM_GLOBAL=2"]
    elif kind in ("data", "meshes"):
        files = ["configs/runs/quickstart.gin", path]
        bindings = ["TEXT_FILES_GLOB='/corpus/*.txt'", "SENTENCEPIECE_MODEL='/spm.model'"]
    elif kind == "experiments":
        script = next((s for s in STUDY_RUNNERS if s in path), "extrapolation")
        study_runner(script)  # registers its configurable (STUDY_RUNNERS)
    parse_gin(files, bindings)
    try:
        if kind in ("models", "positions", "features"):
            assert isinstance(configured_model(), lexjax.models.LanguageModel)
        elif kind in ("runs", "data", "meshes"):
            model, run = configured_training()
            assert isinstance(model, lexjax.models.LanguageModel) and run.train_steps > 0
        else:
            assert gin.query_parameter(f"experiments.{STUDY_RUNNERS[script]}.matrix")
    finally:
        gin.clear_config()
