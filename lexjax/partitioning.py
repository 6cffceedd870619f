"""Device meshes and logical-axis sharding rules.

A mesh string names sizes of the three mesh axes, e.g. `"data:2,fsdp:2,tensor:2"`; `-1` means
"the remaining devices", missing axes have size 1, and `""` means `data:-1` (pure data parallel)
over all devices, except on CPU, where it means one device (CPU "devices", real or faked with
`--xla_force_host_platform_device_count`, share the same cores, so splitting only adds overhead).
One rule set maps the logical names on parameters and activations to mesh axes; the mesh shape
picks the strategy, and strategies combine by giving several axes a size > 1:
- `data`:   data parallel: the batch is split, parameters replicated;
- `fsdp`:   ZeRO-3 style: the batch is split *and* parameters/optimizer state are sharded on their
            `embed` dimension, gathered per layer by XLA;
- `tensor`: Megatron-style: attention heads, MLP hidden units and the vocabulary are split.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import flax.linen as nn

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (logical name, mesh axis or axes or None). Weights and activations carry different names.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("relpos_buckets", None),
    ("abs_positions", None),
)


class MeshError(ValueError):
    """A mesh string that does not fit the devices at hand."""


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
    """`"data:2,tensor:-1"` -> `{"data": 2, "fsdp": 1, "tensor": num_devices // 2}`."""
    sizes = {axis: 1 for axis in MESH_AXES}
    items = [item.strip() for item in (spec or "data:-1").split(",") if item.strip()]
    rest = None
    for item in items:
        name, _, size = item.partition(":")
        if name not in MESH_AXES or not size.lstrip("-").isdigit():
            raise MeshError(f"bad mesh item {item!r} in {spec!r}: use axis:size with axes "
                            f"{MESH_AXES}, e.g. 'data:2,tensor:4' (-1 = the remaining devices)")
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


def make_mesh(spec: str = "", devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A `Mesh` over `devices` (default: all) with axes `data, fsdp, tensor`, laid out by
    `mesh_utils` so that, on TPU, the physical topology is respected."""
    if devices is None:
        devices = jax.devices()
        if not spec and devices[0].platform == "cpu":
            devices = devices[:1]
    devices = list(devices)
    sizes = parse_mesh(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, AssertionError, NotImplementedError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_shardings(logical_specs: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
    """A tree of logical `PartitionSpec`s -> `NamedSharding`s on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches `[batch, length]` are split over the data and fsdp axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def check_batch_divides(mesh: Mesh, batch_size: int) -> None:
    """Raises `MeshError` unless the global batch splits evenly over the batch axes."""
    ways = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if batch_size % ways:
        raise MeshError(f"BATCH_SIZE={batch_size} does not split over the {ways} data-parallel "
                        f"devices of mesh {dict(mesh.shape)}; use a multiple of {ways}")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
