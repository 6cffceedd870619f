"""The kernels as `attend` implementations: "pallas" (kernels picked for the target platform) and
the forced lowerings "pallas_tpu" / "pallas_gpu" (for export, AOT compilation and tests)."""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lexjax import partitioning
from lexjax.errors import ConfigError

from lexjax.attention.kernels.pallas_attention import pallas_attention
from lexjax.attention.masks import MaskSpec


def lowering_for_backend(backend: str) -> tuple[str, bool]:
    """(lowering, interpret) that `impl="pallas"` uses on a JAX backend: the native kernels on TPU
    and GPU, the TPU kernels in interpret mode elsewhere (CPU)."""
    if backend in ("tpu", "gpu"):
        return backend, False
    return "tpu", True


def target_platform() -> str:
    """The platform being compiled for: the tracing mesh's (`partitioning.tracing_mesh`; a TPU
    topology compiled ahead of time on a CPU host is "tpu"), else JAX's default backend."""
    mesh = partitioning.tracing_mesh()
    platform = (jax.default_backend() if mesh is None else
                mesh.devices.flat[0].platform if isinstance(mesh, Mesh) else
                mesh.abstract_device.platform)
    return "gpu" if platform in ("cuda", "rocm") else platform


#: The Pallas GPU kernels use Hopper's warpgroup matrix instructions (WGMMA).
GPU_COMPUTE_CAPABILITY = "9."


def check_gpu_kernels_run_on(device) -> None:
    """Raises `ConfigError` if `device` is a GPU the Pallas GPU kernels cannot run on (not
    Hopper); a device that does not say (a compile-only one, a CPU) passes."""
    capability = getattr(device, "compute_capability", None)
    if getattr(device, "platform", None) != "gpu" or capability is None:
        return
    if not str(capability).startswith(GPU_COMPUTE_CAPABILITY):
        raise ConfigError(
            f"the Pallas GPU attention kernels need a Hopper GPU (compute capability 9.x); this "
            f"{getattr(device, 'device_kind', 'GPU')} has {capability}: use "
            "attention_impl='xla' (the blocked XLA attention skips the same blocks)")


def _target_device():
    """A device of the platform compiled for, where one is at hand (None for an abstract mesh)."""
    mesh = partitioning.tracing_mesh()
    if mesh is None:
        return jax.devices()[0]
    return mesh.devices.flat[0] if isinstance(mesh, Mesh) else None


def attend_with_kernels(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, mask: MaskSpec,
                        bias=None, block_size: Optional[int] = None,
                        segment_ids: Optional[jnp.ndarray] = None,
                        lowering: Optional[str] = None) -> jnp.ndarray:
    """`attend`'s contract on the Pallas kernels; `block_size` sets both block lengths.

    `lowering=None` follows the platform being compiled for (`target_platform`,
    `lowering_for_backend`); "tpu" or "gpu" forces that lowering without interpretation.
    """
    interpret = False
    if lowering is None:
        lowering, interpret = lowering_for_backend(target_platform())
    if lowering == "gpu":
        check_gpu_kernels_run_on(_target_device())
    return pallas_attention(q, k, v, mask=mask, bias=bias, segment_ids=segment_ids,
                            block_q=block_size, block_kv=block_size, lowering=lowering,
                            interpret=interpret)


PALLAS_IMPLEMENTATIONS = {
    "pallas": attend_with_kernels,
    "pallas_tpu": functools.partial(attend_with_kernels, lowering="tpu"),
    "pallas_gpu": functools.partial(attend_with_kernels, lowering="gpu"),
}
