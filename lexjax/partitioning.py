"""Device meshes, logical-axis sharding rules, and shardings of a model's state.

A mesh string names sizes of the four mesh axes, e.g. `"data:2,fsdp:2,tensor:2"`; `-1` means
"the remaining devices", missing axes have size 1, and `""` means `data:-1` (pure data parallel)
over all devices, except on CPU, where it means one device (CPU "devices", real or faked with
`--xla_force_host_platform_device_count`, share the same cores, so splitting only adds overhead).

Rules map the logical axis names on parameters and activations to mesh axes. Four presets, one
per strategy, combine into the default rule set (`LOGICAL_AXIS_RULES`); the mesh shape then picks
the strategy, since a mesh axis of size 1 splits nothing. A run's gin may pick presets and
override single names instead (`axis_rules`, bound to `TrainConfig.logical_axis_rules`):
- `DATA_PARALLEL` (`data`): the batch is split, parameters replicated;
- `FSDP` (`fsdp`, ZeRO-3): the batch is split *and* parameters and optimizer state are sharded on
  their `embed` dimension, gathered layer by layer by XLA;
- `SEQUENCE_PARALLEL` (`sequence`, context parallelism): activations are split along the
  sequence; XLA gathers keys and values where attention needs them (`attention_impl="xla"` or
  `"reference"`; the Pallas kernels refuse it: each device's kernel runs on whole sequences);
- `TENSOR_PARALLEL` (`tensor`, Megatron): attention heads, MLP hidden units and the vocabulary
  are split, in the weights and in the activations between the two matmuls of each block.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lexjax.errors import UserError

MESH_AXES = ("data", "fsdp", "sequence", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = tuple[tuple[str, Any], ...]

# Every logical name the models use: weights, then activations (kept apart, as in MaxText). A
# name no preset maps stays replicated; add new names here (and to a preset to split them).
WEIGHT_AXES = ("vocab", "embed", "mlp", "heads", "kv_heads", "kv", "layers", "relpos_buckets",
               "abs_positions", "ssm_channels", "ssm_state", "classes")
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed",
                   "activation_heads", "activation_kv", "activation_mlp", "activation_vocab")

DATA_PARALLEL: Rules = (("activation_batch", "data"),)
FSDP: Rules = (("activation_batch", "fsdp"), ("embed", "fsdp"))
TENSOR_PARALLEL: Rules = (
    ("activation_heads", "tensor"), ("activation_mlp", "tensor"), ("activation_vocab", "tensor"),
    ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))
SEQUENCE_PARALLEL: Rules = (("activation_length", "sequence"),)
RULE_PRESETS: dict[str, Rules] = {"data": DATA_PARALLEL, "fsdp": FSDP,
                                  "sequence": SEQUENCE_PARALLEL, "tensor": TENSOR_PARALLEL}


class MeshError(UserError, ValueError):
    """A mesh string that does not fit the devices at hand."""


def combine_rules(*presets: Rules) -> Rules:
    """One rule per logical name: the mesh axes the presets give it, in preset order (so
    `activation_batch` becomes `("data", "fsdp")`), `None` (replicated) where none does."""
    axes: dict[str, list[str]] = {name: [] for name in WEIGHT_AXES + ACTIVATION_AXES}
    for preset in presets:
        for name, mesh_axis in preset:
            if name not in axes:
                raise ValueError(f"unknown logical axis {name!r}; known: {sorted(axes)}")
            if mesh_axis not in MESH_AXES:
                raise ValueError(f"unknown mesh axis {mesh_axis!r}; use one of {MESH_AXES}")
            if mesh_axis not in axes[name]:
                axes[name].append(mesh_axis)
    return tuple((name, None if not a else a[0] if len(a) == 1 else tuple(a))
                 for name, a in axes.items())


LOGICAL_AXIS_RULES: Rules = combine_rules(DATA_PARALLEL, FSDP, SEQUENCE_PARALLEL,
                                          TENSOR_PARALLEL)


@gin.register(module="lexjax.partitioning")
def axis_rules(presets: Sequence[str] = tuple(RULE_PRESETS),
               overrides: Optional[dict[str, Any]] = None) -> Rules:
    """A rule set from gin: the named `RULE_PRESETS` combined, then `overrides` (logical name ->
    mesh axes: None, an axis, or a list of axes) replacing single names, e.g.
    `TrainConfig.logical_axis_rules = @lexjax.partitioning.axis_rules()` with
    `axis_rules.presets = ["data", "fsdp"]` and `axis_rules.overrides = {"vocab": "fsdp"}`."""
    unknown = [name for name in presets if name not in RULE_PRESETS]
    if unknown:
        raise MeshError(f"unknown rule presets {unknown}; use some of {list(RULE_PRESETS)}")
    rules = dict(combine_rules(*(RULE_PRESETS[name] for name in presets)))
    for name, axes in (overrides or {}).items():
        if name not in rules:
            raise MeshError(f"axis_rules override names {name!r}, which no model uses; the "
                            f"logical axes are {sorted(rules)}")
        rules[name] = tuple(axes) if isinstance(axes, list) else axes
    return check_rules(tuple(rules.items()))

# XLA:TPU options for the train step. Windowed einsums (an all-gather or reduce-scatter split into
# a loop of collective permutes that overlaps the matmul) allocate every layer's loop buffers at
# the start of the step and keep them to that layer's backward: on the 1B config with fsdp:8
# (v5e:2x4) they hold 4.0 GiB of temporary memory per chip, against 2.1 GiB without them, and
# the cost analysis counts each loop body once. Off by default; `TrainConfig.compiler_options`
# overrides any of these.
TPU_COMPILER_OPTIONS: dict[str, Any] = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
}


def check_rules(rules: Any) -> Rules:
    """`rules` as a tuple of `(logical name, mesh axes)` pairs (mesh axes: None, one of
    `MESH_AXES`, or a tuple of them), or `MeshError` naming the bad entry."""
    checked = []
    for entry in rules:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2
                and isinstance(entry[0], str)):
            raise MeshError(f"bad logical axis rule {entry!r}: use (logical_name, mesh_axes), "
                            "e.g. ('activation_batch', ('data', 'fsdp'))")
        name, axes = entry
        axes = tuple(axes) if isinstance(axes, (tuple, list)) else axes
        for axis in (axes if isinstance(axes, tuple) else () if axes is None else (axes,)):
            if axis not in MESH_AXES:
                raise MeshError(f"logical axis rule {entry!r} names mesh axis {axis!r}; the "
                                f"mesh axes are {MESH_AXES}")
        checked.append((name, axes))
    return tuple(checked)


_TRACING_MESH: contextvars.ContextVar[Optional[Mesh]] = contextvars.ContextVar(
    "lexjax_tracing_mesh", default=None)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES):
    """The mesh and the logical-axis rules, for tracing: the mesh as the resource environment,
    as JAX's abstract mesh (which flax reads: without it every activation constraint is
    silently dropped) and as `tracing_mesh()` (what the Pallas kernels read to run per device
    in `shard_map`, and to know the platform compiled for)."""
    token = _TRACING_MESH.set(mesh)
    try:
        with mesh, jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
                nn.logical_axis_rules(list(rules)):
            yield
    finally:
        _TRACING_MESH.reset(token)


def tracing_mesh() -> Optional[Mesh]:
    """The mesh of the innermost `mesh_context` (also inside `jit` traced in it), else the mesh
    set with `jax.set_mesh` (as an `AbstractMesh`), else None."""
    mesh = _TRACING_MESH.get()
    if mesh is not None:
        return mesh
    abstract = jax.sharding.get_abstract_mesh()
    return None if abstract.empty else abstract


def compiler_options(mesh: Mesh, overrides: Optional[dict[str, Any]] = None
                     ) -> dict[str, Any]:
    """XLA options for compiling a train step on `mesh`: `TPU_COMPILER_OPTIONS` when its devices
    are TPUs (real or a topology's), then `overrides` (any platform; XLA refuses unknown
    names)."""
    base = TPU_COMPILER_OPTIONS if mesh.devices.flat[0].platform == "tpu" else {}
    return {**base, **(overrides or {})}


def global_batch(sharding: NamedSharding, rows: np.ndarray) -> jax.Array:
    """A global `[batch, ...]` array from the whole batch `rows`, which every process holds;
    each process transfers only the shards its devices need."""
    return jax.make_array_from_callback(rows.shape, sharding, lambda index: rows[index])


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
    """`"data:2,tensor:-1"` -> `{"data": 2, "fsdp": 1, "tensor": num_devices // 2}`."""
    sizes = {axis: 1 for axis in MESH_AXES}
    items = [item.strip() for item in (spec or "data:-1").split(",") if item.strip()]
    rest, seen = None, set()
    for item in items:
        name, _, size = item.partition(":")
        name, size = name.strip(), size.strip()
        if name not in MESH_AXES or not size.lstrip("-").isdigit():
            raise MeshError(f"bad mesh item {item!r} in {spec!r}: use axis:size with axes "
                            f"{MESH_AXES}, e.g. 'data:2,tensor:4' (-1 = the remaining devices)")
        if name in seen:
            raise MeshError(f"mesh {spec!r} names axis {name!r} twice")
        seen.add(name)
        if int(size) == -1:
            if rest is not None:
                raise MeshError(f"mesh {spec!r} has two axes of size -1; at most one may be")
            rest = name
        elif int(size) < 1:
            raise MeshError(f"mesh axis sizes must be positive or -1, got {item!r}")
        else:
            sizes[name] = int(size)
    fixed = int(np.prod([sizes[a] for a in MESH_AXES if a != rest]))
    if rest is not None:
        if num_devices % fixed:
            raise MeshError(f"mesh {spec!r}: {num_devices} devices do not divide by {fixed}")
        sizes[rest] = num_devices // fixed
    if int(np.prod(list(sizes.values()))) != num_devices:
        raise MeshError(f"mesh {spec!r} has {int(np.prod(list(sizes.values())))} devices but "
                        f"{num_devices} are available; make the sizes multiply to {num_devices} "
                        "or use -1 for one axis")
    return sizes


def mesh_devices_needed(spec: str) -> int:
    """The device count a mesh string fixes (product of its sizes, -1 counted as 1)."""
    sizes = [item.partition(":")[2].strip() for item in spec.split(",") if item.strip()]
    return int(np.prod([max(1, int(s)) for s in sizes if s.lstrip("-").isdigit()] or [1]))


def make_mesh(spec: str = "", devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A `Mesh` over `devices` (default: all) with axes `data, fsdp, tensor`, laid out by
    `mesh_utils` so that, on TPU, the physical topology is respected (the tensor axis, the most
    talkative, gets the nearest neighbours)."""
    if devices is None:
        devices = jax.devices()
        if not spec and devices[0].platform == "cpu":
            devices = devices[:1]
    devices = list(devices)
    sizes = parse_mesh(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, AssertionError, NotImplementedError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh
             ) -> tuple[PartitionSpec, list[str]]:
    """Drops the mesh axes of every dimension whose size they do not divide (that dimension is
    then replicated); returns the spec and one note per dropped dimension."""
    entries, notes = [], []
    for dim, (size, entry) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if size % ways:
            notes.append(f"dim {dim} (size {size}) not divisible by {'x'.join(axes)}={ways}")
            entry = None
        entries.append(entry)
    return PartitionSpec(*entries), notes


def state_shardings(boxed: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """`NamedSharding`s for a tree of boxed abstract variables (`jax.eval_shape` of an init that
    returns `nn.Partitioned` leaves): each leaf's logical axes through `rules`, except that a
    dimension its mesh axes do not divide is replicated (logged once, naming the leaves).
    Unboxed leaves (e.g. a step counter) are replicated."""
    logical = nn.get_partition_spec(boxed)
    unboxed = nn.unbox(boxed)
    paths, treedef = jax.tree_util.tree_flatten_with_path(unboxed)
    specs = treedef.flatten_up_to(logical)
    shardings, notes = [], []
    for (path, leaf), logical_spec in zip(paths, specs):
        mesh_spec = nn.logical_to_mesh_axes(tuple(logical_spec), list(rules))
        mesh_spec, leaf_notes = fit_spec(mesh_spec, leaf.shape, mesh)
        notes += [f"{jax.tree_util.keystr(path)}: {n}" for n in leaf_notes]
        shardings.append(NamedSharding(mesh, mesh_spec))
    if notes:
        logging.warning("replicating dimensions the mesh %s does not divide: %s",
                        dict(mesh.shape), "; ".join(notes[:8]) + (" ..." if len(notes) > 8 else ""))
    return jax.tree_util.tree_unflatten(treedef, shardings)


def sharded_abstract(boxed: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """Unboxed `ShapeDtypeStruct`s carrying their `state_shardings` (targets for jit lowering
    and for orbax restores onto `mesh`)."""
    shardings = state_shardings(boxed, mesh, rules)
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed),
        shardings)


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded arrays or `ShapeDtypeStruct`s with shardings
    (the largest shard per leaf; replicated leaves count in full)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batches (`[batch, length]` tokens, `[batch]` labels: `ndim` axes) are split over the
    data and fsdp axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *[None] * (ndim - 1)))


def batch_ways(mesh: Mesh) -> int:
    """How many ways the mesh splits a batch (the product of its batch axes)."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch_divides(mesh: Mesh, batch_size: int) -> None:
    """Raises `MeshError` unless the global batch splits evenly over the batch axes."""
    ways = batch_ways(mesh)
    if batch_size % ways:
        raise MeshError(f"BATCH_SIZE={batch_size} does not split over the {ways} data-parallel "
                        f"devices of mesh {dict(mesh.shape)}; use a multiple of {ways}")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


DISTRIBUTED_ENV = "LEXJAX_DISTRIBUTED"


def initialize_distributed(enabled: Optional[bool] = None, *,
                           coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> bool:
    """Joins a multi-host run with `jax.distributed.initialize()`, which finds the coordinator
    itself on Cloud TPU, GKE, SLURM and MPI clusters; elsewhere (several processes on one
    machine or a plain cluster) give `coordinator_address` ("HOST:PORT" of process 0),
    `num_processes` and `process_id`. On CPU the processes' collectives go over gloo.
    `enabled=None` reads the environment variable LEXJAX_DISTRIBUTED ("1"/"true"). Must run
    before anything touches a device; calling it again is a no-op. Returns whether this process
    is part of a distributed run."""
    if enabled is None:
        enabled = os.environ.get(DISTRIBUTED_ENV, "").lower() in ("1", "true", "yes")
    explicit = (coordinator_address, num_processes, process_id)
    if not enabled and any(x is not None for x in explicit):
        raise MeshError("--coordinator_address, --num_processes and --process_id need "
                        "--distributed")
    if enabled and not jax.distributed.is_initialized():
        if any(x is not None for x in explicit) and any(x is None for x in explicit):
            raise MeshError("give all of --coordinator_address=HOST:PORT, --num_processes=N "
                            "and --process_id=I, or none of them (auto-detected on Cloud TPU)")
        if num_processes is not None and not 0 <= process_id < num_processes:
            raise MeshError(f"--process_id={process_id} is not in [0, {num_processes}) "
                            f"(--num_processes={num_processes})")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    return bool(enabled)


def is_primary_process() -> bool:
    """Whether this process writes the run's files (configs, metrics, TensorBoard, reports):
    process 0 of a multi-host run, or the only process."""
    return jax.process_index() == 0


def host_batch_shard(mesh: Mesh) -> tuple[int, int]:
    """(shard_index, num_shards): this process's rows of a global batch split over the batch
    axes of `mesh` are rows `[shard_index * B / num_shards, (shard_index + 1) * B / num_shards)`.
    Read from where the mesh puts this process's devices along the flattened batch axes, so it
    holds for any device order; (0, 1) when every process holds every row."""
    order = ([mesh.axis_names.index(a) for a in BATCH_AXES] +
             [i for i, a in enumerate(mesh.axis_names) if a not in BATCH_AXES])
    processes = np.vectorize(lambda device: device.process_index)(mesh.devices)
    ways = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    return batch_shard_of(processes.transpose(order).reshape(ways, -1), jax.process_index())


def batch_shard_of(processes: np.ndarray, process: int) -> tuple[int, int]:
    """(shard_index, num_shards) of `process`, given `processes[batch_position, other]`: the
    process of each device, its mesh position flattened to (the batch axes, the other axes).

    Raises:
      MeshError: if the process's batch positions are not one aligned block (a mesh laid out
        across hosts in another order), or it has no device in the mesh.
    """
    ways = processes.shape[0]
    mine = [row for row in range(ways) if (processes[row] == process).any()]
    count = len(mine)
    if not mine or mine != list(range(mine[0], mine[0] + count)) or mine[0] % count \
            or ways % count:
        raise MeshError(f"process {process} holds batch positions {mine} of the {ways} of the "
                        "mesh: not one aligned block; order the mesh's devices by process (the "
                        "default layout does)")
    return mine[0] // count, ways // count
