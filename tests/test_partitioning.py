"""Meshes, rules and sharded training on 8 fake CPU devices (tests/conftest.py): for every model
config, one train step on every preset mesh equals the step on one device and each parameter is
sharded as the rules say; a checkpoint moves between meshes, FSDP really shards the state, and bad
meshes are clear errors."""
import dataclasses
import functools
import glob
import importlib.util
import os
import re

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lexjax import partitioning
from lexjax.config import REPO_ROOT, ConfigError, build_model, parse_gin
from lexjax.data import DataConfig
from lexjax.objectives import ImageClassification, MaskedLM
from lexjax.partitioning import MeshError
from lexjax.training import OptimizerConfig, ShardedTrainStep, TrainConfig
from lexjax.training.state import TrainState, example_inputs

TINY = ["NUM_LAYERS=2", "EMBED_DIM=64", "NUM_HEADS=8", "MLP_DIM=128"]
BATCH, LENGTH = 8, 32
# Chunks, latents and recurrent states shorter than LENGTH, so that chunked attention, Perceiver
# AR's context and the block recurrence each span more than one block. Heads, MLP units and the
# vocabulary divide by every tensor axis size, the embedding by every FSDP size.
TINY_MODEL = TINY + ["CHUNK_SIZE=16", "NUM_LATENTS=16", "NUM_STATES=8"]
MODEL_GINS = sorted(glob.glob(os.path.join(REPO_ROOT, "configs/models/*.gin")))
MODEL_GINS_BY_NAME = {os.path.basename(p)[:-4]: p for p in MODEL_GINS}
MESH_GINS = sorted(glob.glob(os.path.join(REPO_ROOT, "configs/meshes/*.gin")))
# YOSO samples attention by hashing: a sharded reduction's rounding can flip the SimHash code of
# a vector within rounding of a hyperplane, and each flip moves its outputs by O(1/hashes): the
# loss agrees to ~2e-4, but after the test's large steps single parameters can differ by more
# than any tolerance that would still catch a sharding bug, so only its loss is compared.
LOSS_ONLY = {"yoso_encoder": 1e-3}
# On data:2,fsdp:2,tensor:2 the bidirectional Luna encoder's gradients differ from one device's
# (the loss agrees). Not a Luna bug: `test_three_axis_mesh_gradient_of_chained_projections`
# reproduces it with three einsums and no lexjax code; sharding constraints on the activations
# and gathered kernels do not avoid it. Strict xfails, so a jax release that fixes it shows.
KNOWN_MESH_MISMATCH = {("luna_encoder", "hybrid")}
HYBRID_GIN = os.path.join(REPO_ROOT, "configs/meshes/hybrid.gin")
# Written out by hand (not read from partitioning): where each weight axis goes.
EXPECTED_AXIS = {"vocab": "tensor", "embed": "fsdp", "mlp": "tensor", "heads": "tensor",
                 "kv_heads": "tensor", "kv": None, "layers": None, "relpos_buckets": None,
                 "abs_positions": None, "ssm_channels": None, "ssm_state": None}


def preset_mesh(path: str) -> str:
    with open(path) as f:
        return re.search(r'^MESH\s*=\s*"([^"]*)"', f.read(), re.M).group(1)


def test_mesh_presets_exist_and_fit_eight_devices():
    assert len(MESH_GINS) >= 4
    for path in MESH_GINS:
        sizes = partitioning.parse_mesh(preset_mesh(path), 8)
        assert int(np.prod(list(sizes.values()))) == 8


@pytest.mark.parametrize("spec, expected", [
    ("data:8", {"data": 8, "fsdp": 1, "sequence": 1, "tensor": 1}),
    ("data:2,tensor:-1", {"data": 2, "fsdp": 1, "sequence": 1, "tensor": 4}),
    (" fsdp : -1 ", {"data": 1, "fsdp": 8, "sequence": 1, "tensor": 1}),
    ("", {"data": 8, "fsdp": 1, "sequence": 1, "tensor": 1}),
    ("data:2,fsdp:2,tensor:2", {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}),
    ("sequence:2,data:-1", {"data": 4, "fsdp": 1, "sequence": 2, "tensor": 1}),
])
def test_parse_mesh(spec, expected):
    assert partitioning.parse_mesh(spec, 8) == expected


@pytest.mark.parametrize("spec, words", [
    ("model:8", ["bad mesh item", "data', 'fsdp', 'sequence', 'tensor"]),
    ("data:4", ["4 devices", "8 are available"]),
    ("data:3,tensor:-1", ["do not divide by 3"]),
    ("data:-1,fsdp:-1", ["two axes of size -1"]),
    ("data:0", ["positive"]),
    ("data:two", ["bad mesh item"]),
    ("data:2,data:4", ["twice"]),
])
def test_bad_mesh_strings_are_clear_errors(spec, words):
    with pytest.raises(MeshError) as err:
        partitioning.make_mesh(spec)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_make_mesh_axes_and_cpu_default():
    mesh = partitioning.make_mesh("data:2,tensor:4")
    assert mesh.axis_names == ("data", "fsdp", "sequence", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "sequence": 1, "tensor": 4}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    assert partitioning.make_mesh("").size == 1  # CPU: "" is one device


def test_presets_combine_into_the_rule_set():
    rules = dict(partitioning.LOGICAL_AXIS_RULES)
    assert rules["activation_batch"] == ("data", "fsdp")
    assert {k: rules[k] for k in EXPECTED_AXIS} == EXPECTED_AXIS
    assert rules["activation_heads"] == rules["activation_mlp"] == "tensor"
    assert rules["activation_length"] == "sequence" and rules["activation_embed"] is None
    data_only = dict(partitioning.combine_rules(partitioning.DATA_PARALLEL))
    assert data_only["activation_batch"] == "data" and data_only["embed"] is None
    fsdp_tp = dict(partitioning.combine_rules(partitioning.FSDP, partitioning.TENSOR_PARALLEL))
    assert fsdp_tp["embed"] == "fsdp" and fsdp_tp["heads"] == "tensor"
    with pytest.raises(ValueError, match="unknown logical axis"):
        partitioning.combine_rules((("hidden", "tensor"),))
    with pytest.raises(ValueError, match="unknown mesh axis"):
        partitioning.combine_rules((("embed", "model"),))


def test_axis_rules_from_gin_pick_presets_and_override_names():
    parse_gin([], ["TrainConfig.logical_axis_rules = @lexjax.partitioning.axis_rules()",
                   "lexjax.partitioning.axis_rules.presets = ['data', 'fsdp']",
                   "lexjax.partitioning.axis_rules.overrides = {'vocab': 'fsdp', "
                   "'mlp': ['fsdp', 'tensor']}"])
    try:
        rules = dict(gin.get_bindings("lexjax.training.TrainConfig")["logical_axis_rules"])
    finally:
        gin.clear_config()
    assert rules["activation_batch"] == ("data", "fsdp") and rules["embed"] == "fsdp"
    assert rules["heads"] is None and rules["activation_length"] is None  # presets left out
    assert rules["vocab"] == "fsdp" and rules["mlp"] == ("fsdp", "tensor")
    assert dict(partitioning.axis_rules()) == dict(partitioning.LOGICAL_AXIS_RULES)
    with pytest.raises(MeshError, match="unknown rule presets"):
        partitioning.axis_rules(presets=["pipeline"])
    with pytest.raises(MeshError, match="which no model uses"):
        partitioning.axis_rules(overrides={"hidden": "tensor"})
    with pytest.raises(MeshError, match="names mesh axis"):
        partitioning.axis_rules(overrides={"vocab": "model"})


def test_sequence_axis_splits_activations_and_matches_one_device():
    """Context parallelism: on sequence:2,data:2,tensor:2 the blocked XLA attention's train step
    (keys and values gathered by XLA) gives the one-device loss and parameters; the Pallas
    kernels, which need whole sequences per device, refuse the mesh in one line."""
    model = build_model([MODEL_GINS_BY_NAME["transformer"]],
                        TINY_MODEL + ["lexjax.models.Transformer.attention_impl='xla'"])
    one = ShardedTrainStep(model, _run(optimizer=SMOOTH), partitioning.make_mesh("data:1",
                                                                                jax.devices()[:1]))
    split = ShardedTrainStep(model, _run(optimizer=SMOOTH),
                             partitioning.make_mesh("sequence:2,data:2,tensor:2"))
    with split.context():
        lowered = split.lower().as_text()
    assert '"sequence"' in lowered  # the activation constraints name the axis
    loss_one, state_one = _run_step(one, one.init(0))
    loss_split, state_split = _run_step(split, split.init(0))
    np.testing.assert_allclose(loss_split, loss_one, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(state_split.params),
                    jax.tree_util.tree_leaves(state_one.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    pallas = build_model([MODEL_GINS_BY_NAME["transformer"]],
                         TINY_MODEL + ["lexjax.models.Transformer.attention_impl='pallas'"])
    with pytest.raises(ConfigError, match="whole sequences.*attention_impl='xla'"):
        ShardedTrainStep(pallas, _run(), partitioning.make_mesh(
            "sequence:2,data:2,tensor:2")).lower()


def test_state_shardings_replicate_dimensions_the_mesh_does_not_divide():
    mesh = partitioning.make_mesh("fsdp:2,tensor:4")
    boxed = {"w": nn.Partitioned(jax.ShapeDtypeStruct((6, 3, 8), jnp.float32),
                                 names=("embed", "heads", "kv")),
             "step": jax.ShapeDtypeStruct((), jnp.int32)}
    shardings = partitioning.state_shardings(boxed, mesh)
    assert shardings["w"].spec == PartitionSpec("fsdp", None, None)  # 3 heads over tensor:4
    assert shardings["step"].spec == PartitionSpec()
    abstract = partitioning.sharded_abstract(boxed, mesh)
    # 6 x 3 x 8 f32 split 2 ways, plus the int32 step
    assert partitioning.bytes_per_device(abstract) == 3 * 3 * 8 * 4 + 4


# LLVM's optimizations only (XLA's HLO passes, hence the numerics, are unchanged): halves the
# CPU compile time of the many small steps below.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.lru_cache(maxsize=None)
def _tiny_model(gin_file: str):
    return build_model([gin_file], TINY_MODEL)


def _tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(1, 259, (BATCH, LENGTH), dtype=np.int32)


def _run(batch_size: int = BATCH, optimizer: OptimizerConfig = OptimizerConfig()
         ) -> TrainConfig:
    return TrainConfig(data=DataConfig(task="lexjax.stdlib_code"), train_steps=100,
                       batch_size=batch_size, train_length=LENGTH, optimizer=optimizer)


# A smooth, SGD-like update (no moments, eps dominating sqrt(v), no clipping or decay), so that
# tiny numerical differences between meshes stay tiny in the updated parameters.
SMOOTH = OptimizerConfig(learning_rate=0.5, warmup_steps=1, b1=0.0, b2=0.0, eps=1.0,
                         weight_decay=0.0, clip_norm=1e6)


def _sharded_step(model, mesh_spec: str, devices) -> ShardedTrainStep:
    """The trainer's step of `model` laid out on the mesh `mesh_spec` over `devices` (an
    encoder's: masked-LM pre-training)."""
    mesh = partitioning.make_mesh(mesh_spec, devices)
    run = _run(optimizer=SMOOTH)
    if hasattr(model, "input_spec"):  # a ViT: the digits, one token per patch
        run = dataclasses.replace(run, data=DataConfig(task="lexjax.digits"),
                                  train_length=model.num_patches,
                                  objective=ImageClassification())
    elif model.bidirectional:
        # late-[MASK] models size their encoder for their own rate
        rate = getattr(model, "mask_rate", MaskedLM.mask_rate)
        run = dataclasses.replace(run, objective=MaskedLM(mask_rate=rate))
    return ShardedTrainStep(model, run, mesh)


def _run_step(step: ShardedTrainStep, state: TrainState) -> tuple[float, TrainState]:
    """The second step's loss and the state after two steps from `state` (donated) on the
    tokens of `_tokens` (the first step has learning rate 0: the warmup starts there)."""
    compiled = step.lower().compile(FAST_COMPILE)
    tokens = _tokens()
    images = np.random.default_rng(0).uniform(size=(BATCH, 8, 8, 1)).astype(np.float32)
    rows = {"targets": tokens, "segment_ids": np.ones_like(tokens), "image": images,
            "label": np.arange(BATCH, dtype=np.int32) % 10}
    batch = step.device_batch({name: rows[name] for name in step.example})
    for _ in range(2):
        state, metrics = compiled(state, batch, jax.random.PRNGKey(0))
    return float(metrics["loss"]), state


@functools.lru_cache(maxsize=None)
def _one_device(model_gin: str) -> tuple[TrainState, float, TrainState]:
    """On one device: the initial state, the loss of one step, and the state after it (host
    arrays)."""
    step = _sharded_step(_tiny_model(model_gin), "", jax.devices()[:1])
    state = step.init(0)
    initial = jax.device_get(state)
    loss, state = _run_step(step, state)
    return initial, loss, jax.device_get(state)


def _assert_trees_close(got, want, rtol: float, atol: float) -> None:
    """Same tree leaves (in order), each within `rtol`/`atol` of its counterpart."""
    got_leaves, want_leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves):
        np.testing.assert_allclose(np.asarray(g), w, rtol=rtol, atol=atol)


def _name(path: str) -> str:
    """`".../configs/models/gss.gin"` -> `"gss"` (test ids)."""
    return os.path.basename(path)[:-len(".gin")]


@pytest.mark.parametrize("model_gin, mesh_gin", [
    pytest.param(model_gin, mesh_gin, id=f"{_name(model_gin)}-{_name(mesh_gin)}",
                 marks=[pytest.mark.xfail(strict=True, reason="known sharding mismatch")]
                 if (_name(model_gin), _name(mesh_gin)) in KNOWN_MESH_MISMATCH else [])
    for model_gin in MODEL_GINS for mesh_gin in MESH_GINS])
def test_train_step_on_preset_meshes_matches_one_device(model_gin, mesh_gin):
    """Every model config on every preset mesh, from the one-device initial state laid out on
    the mesh (sharded initialization: the next test)."""
    initial, ref_loss, ref_state = _one_device(model_gin)
    step = _sharded_step(_tiny_model(model_gin), preset_mesh(mesh_gin), jax.devices())
    loss, state = _run_step(step, jax.device_put(initial, step.state_shardings))
    assert loss == pytest.approx(ref_loss, rel=LOSS_ONLY.get(_name(model_gin), 1e-5))
    if _name(model_gin) not in LOSS_ONLY:
        _assert_trees_close(state, ref_state, rtol=1e-4, atol=1e-5)
    _check_rules(_tiny_model(model_gin), step, state.params)


@pytest.mark.parametrize("model_gin", MODEL_GINS, ids=_name)
def test_sharded_init_matches_one_device(model_gin):
    """The state created sharded on the preset that uses all three axes (hybrid.gin) equals the
    one created on one device."""
    initial, _, _ = _one_device(model_gin)
    step = _sharded_step(_tiny_model(model_gin), preset_mesh(HYBRID_GIN), jax.devices())
    _assert_trees_close(step.init(0), initial, rtol=1e-6, atol=0)


def _check_rules(model, step, params):
    """Every parameter array is sharded as EXPECTED_AXIS says for its logical names (a mesh
    axis that does not divide the dimension leaves it replicated), and every weight-sharding mesh
    axis (fsdp, tensor) of size > 1 splits at least one parameter."""
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                           example_inputs(model, BATCH, LENGTH))["params"]
    names = jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(lambda p: p.names, boxed,
                               is_leaf=lambda x: isinstance(x, nn.Partitioned)),
        is_leaf=lambda x: isinstance(x, tuple))
    arrays = jax.tree_util.tree_leaves(params)
    assert len(names) == len(arrays)
    mesh = step.mesh
    split = set()
    for axes, array in zip(names, arrays):
        mesh_axes = [EXPECTED_AXIS.get(a) for a in axes]
        spec = [m if m and size % mesh.shape[m] == 0 else None
                for m, size in zip(mesh_axes, array.shape)]
        expected = NamedSharding(mesh, PartitionSpec(*spec))
        assert array.sharding.is_equivalent_to(expected, array.ndim), (axes, array.sharding)
        split.update(m for m in spec if m and mesh.shape[m] > 1)
    assert split == {a for a in ("fsdp", "tensor") if mesh.shape[a] > 1}, split


def test_fsdp_holds_under_a_third_of_data_parallel_state():
    model = _tiny_model(MODEL_GINS[0])
    bytes_on = {}
    for spec in ("data:8", "fsdp:8"):
        step = ShardedTrainStep(model, _run(), partitioning.make_mesh(spec))
        bytes_on[spec] = partitioning.bytes_per_device(step.abstract_state)
    params = sum(x.size for x in jax.tree_util.tree_leaves(step.abstract_state.params))
    assert bytes_on["data:8"] >= 3 * 4 * params  # params + Adam's two moments, replicated
    assert bytes_on["fsdp:8"] < bytes_on["data:8"] / 3


def test_batch_must_split_over_the_batch_axes():
    model = _tiny_model(MODEL_GINS[0])
    with pytest.raises(MeshError, match="multiple of 4"):
        ShardedTrainStep(model, _run(batch_size=6),
                         partitioning.make_mesh("data:2,fsdp:2,tensor:2"))


def test_compiler_options_reach_the_train_step():
    """TPU steps get `TPU_COMPILER_OPTIONS` (windowed einsums off), CPU steps none; the run's
    `compiler_options` go over either and reach XLA (an unknown option is refused there)."""
    cpu = partitioning.make_mesh("data:2", jax.devices()[:2])
    assert partitioning.compiler_options(cpu) == {}
    assert partitioning.compiler_options(cpu, {"xla_cpu_enable_fast_math": False}) == {
        "xla_cpu_enable_fast_math": False}
    model = _tiny_model(MODEL_GINS[0])
    step = ShardedTrainStep(model, dataclasses.replace(
        _run(), compiler_options={"xla_no_such_option": True}), cpu)
    with pytest.raises(Exception, match="xla_no_such_option"):
        step.lower().compile()
    with pytest.raises(ConfigError, match="compiler_options"):
        dataclasses.replace(_run(), compiler_options=["xla_no_such_option"])


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu")
def test_tpu_steps_compile_without_windowed_einsums():
    from lexjax.benchmarking.topology import load_topology
    mesh = partitioning.make_mesh("fsdp:4", load_topology("v5e:2x2").devices)
    options = partitioning.compiler_options(mesh, {
        "xla_tpu_enable_windowed_einsum_for_all_gather": True})
    assert options == {"xla_tpu_enable_windowed_einsum_for_all_gather": True,
                       "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def test_checkpoint_saved_on_one_mesh_evaluates_on_another(tmp_path):
    """Train on data:2,tensor:4, then evaluate on fsdp:8 and on one device: same perplexity."""
    from lexjax.evaluation import evaluate_lengths
    from lexjax.runs import configured_training, load_run
    from lexjax.training import train

    parse_gin(["configs/runs/quickstart.gin"],
              TINY + ["BATCH_SIZE=8", "TRAIN_LENGTH=32", "TRAIN_STEPS=1", "CHECKPOINT_EVERY=1",
                      "EVAL_EVERY=0", "LOG_EVERY=1", 'MESH="data:2,tensor:4"'])
    try:
        train(*configured_training(), str(tmp_path), progress=False)
    finally:
        gin.clear_config()
    results = {}
    for spec in ("fsdp:8", ""):
        mesh = partitioning.make_mesh(spec)
        run = load_run(str(tmp_path), mesh=mesh)
        model, variables = run.model, run.variables
        if spec:
            embedding = variables["params"]["token_embedding"]["embedding"]
            assert embedding.sharding.spec == PartitionSpec("tensor", "fsdp")
        results[spec] = evaluate_lengths(model, variables, run.config.data, [32], max_tokens=256,
                                         batch_size=8, resolution_max_length=0, mesh=mesh)[0]
    assert results["fsdp:8"].perplexity == pytest.approx(results[""].perplexity, rel=1e-5)


def test_initialize_distributed_is_off_by_default(monkeypatch):
    monkeypatch.delenv(partitioning.DISTRIBUTED_ENV, raising=False)
    assert partitioning.initialize_distributed() is False
    assert not jax.distributed.is_initialized()


@pytest.mark.xfail(strict=True, reason="XLA partitions this gradient wrongly on a 2x2x2 CPU mesh")
def test_three_axis_mesh_gradient_of_chained_projections():
    """The pattern of Luna's nested attention in plain jax: a short sequence `p` through two
    projections, scored against a longer one. Kernels `[embed, heads, head_dim]` sharded
    (fsdp, tensor), the batch over (data, fsdp), gradients of the kernels and both inputs: on
    data:2,fsdp:2,tensor:2 the first kernel's and `p`'s are wrong (relative error ~1); on
    fsdp:4,tensor:2 or data:4,fsdp:2, with `p` as long as `x`, or without the inputs' gradients
    they are right."""
    batch, long, short, embed, heads = 8, 32, 16, 64, 8
    rng = np.random.default_rng(0)
    kernels = [jnp.asarray(rng.normal(size=(embed, heads, embed // heads)) * 0.1, jnp.float32)
               for _ in range(3)]
    x = jnp.asarray(rng.normal(size=(batch, long, embed)), jnp.float32)
    p = jnp.asarray(rng.normal(size=(batch, short, embed)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(batch, heads, long, short)), jnp.float32)

    def loss(kernels, x, p):
        first, second, query = kernels
        u = jnp.einsum("bld,dhk->blhk", p, first).reshape(batch, short, embed)
        u = jnp.einsum("bld,dhk->blhk", u, second)
        q = jnp.einsum("bnd,dhk->bnhk", x, query)
        return jnp.sum(jnp.einsum("bnhd,blhd->bhnl", q, u) * w)

    gradient = jax.grad(loss, argnums=(0, 1, 2))
    want = gradient(kernels, x, p)
    mesh = partitioning.make_mesh("data:2,fsdp:2,tensor:2", jax.devices())
    kernel_sharding = [NamedSharding(mesh, PartitionSpec("fsdp", "tensor"))] * 3
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    got = jax.jit(gradient, in_shardings=(kernel_sharding, batch_sharding, batch_sharding))(
        jax.device_put(kernels, kernel_sharding), jax.device_put(x, batch_sharding),
        jax.device_put(p, batch_sharding))
    _assert_trees_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("processes, process, expected", [
    ([[0], [0], [1], [1]], 0, (0, 2)),        # data:4 over two hosts: rows 0-3 of 8 on host 0
    ([[0], [0], [1], [1]], 1, (1, 2)),
    ([[0, 0], [1, 1]], 1, (1, 2)),            # fsdp:2,tensor:2: a host holds one fsdp row
    ([[0, 1], [0, 1]], 1, (0, 1)),            # tensor across hosts: every host holds all rows
    ([[0], [1], [2], [3]], 2, (2, 4)),
    ([[0, 0, 0, 0]], 0, (0, 1)),              # one host
])
def test_batch_shard_of_reads_the_hosts_rows_from_the_mesh(processes, process, expected):
    assert partitioning.batch_shard_of(np.asarray(processes), process) == expected


@pytest.mark.parametrize("processes, process", [
    ([[0], [1], [1], [0]], 0),                # not one block
    ([[1], [0], [0], [1]], 0),                # one block, not aligned to its size
    ([[0], [0]], 1),                          # no device in the mesh
])
def test_batch_shard_of_refuses_a_mesh_out_of_host_order(processes, process):
    with pytest.raises(partitioning.MeshError, match="aligned block"):
        partitioning.batch_shard_of(np.asarray(processes), process)


def test_host_batch_shard_of_one_process_is_the_whole_batch():
    assert partitioning.host_batch_shard(partitioning.make_mesh("data:2,fsdp:2,tensor:2")) == \
        (0, 1)


@pytest.mark.parametrize("enabled, flags, message", [
    (None, dict(process_id=0), "need --distributed"),
    (True, dict(num_processes=2), "all of --coordinator_address"),
    (True, dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2),
     r"--process_id=2 is not in \[0, 2\)"),
])
def test_initialize_distributed_names_bad_flags(monkeypatch, enabled, flags, message):
    monkeypatch.delenv(partitioning.DISTRIBUTED_ENV, raising=False)
    with pytest.raises(partitioning.MeshError, match=message):
        partitioning.initialize_distributed(enabled, **flags)
    assert not jax.distributed.is_initialized()


def test_pallas_train_step_on_a_hybrid_mesh_matches_one_device():
    """The Transformer with attention_impl="pallas" (the TPU kernels, interpreted on CPU): its
    train step on data:2,fsdp:2,tensor:2, the kernels run per device in shard_map, equals the
    one-device step of the XLA attention (loss and updated parameters)."""
    transformer = os.path.join(REPO_ROOT, "configs/models/transformer.gin")
    initial, ref_loss, ref_state = _one_device(transformer)
    model = build_model([transformer], TINY_MODEL + [
        "lexjax.models.Transformer.attention_impl = 'pallas'"])
    step = _sharded_step(model, "data:2,fsdp:2,tensor:2", jax.devices())
    assert "sdy.manual_computation" in step.lower().as_text()  # the lowered shard_map
    loss, state = _run_step(step, jax.device_put(initial, step.state_shardings))
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    _assert_trees_close(state, ref_state, rtol=1e-4, atol=1e-5)


def test_activation_constraints_apply_under_the_mesh_and_skip_axes_that_do_not_divide():
    """Inside `mesh_context` every activation constraint reaches the program (flax reads only
    JAX's abstract mesh: under the resource environment alone they were silently dropped); a
    mesh axis that does not divide its dimension is left out (a batch of 1 on data:2)."""
    from lexjax.layers import with_activation_axes
    mesh = partitioning.make_mesh("data:2,fsdp:2,tensor:2")

    def constrained(x):
        return with_activation_axes(x * 2.0)

    with partitioning.mesh_context(mesh):
        even = str(jax.make_jaxpr(constrained)(jnp.ones((4, 8, 16))))
        odd = str(jax.make_jaxpr(constrained)(jnp.ones((1, 8, 16))))
    assert "spec=P(('data', 'fsdp')," in even
    assert "spec=P(None," in odd
    assert "sharding_constraint" not in str(jax.make_jaxpr(constrained)(jnp.ones((4, 8, 16))))
