"""Model FLOPs and the device's peak rate, for MFU = achieved model FLOP/s / peak FLOP/s.

Model FLOPs count the matmuls a model needs (MaxText's accounting): 2 FLOPs per multiply-add,
training = 3x forward, attention only over the keys the mask allows (causal halves it, a window
of w costs w per query). A model may define `flops_per_token(length) -> float` (forward);
otherwise XLA's cost analysis of the compiled step stands in.
On CPU the peak is the float32 matmul rate measured once in this process; on TPU/GPU it is the
vendor's dense bf16 peak for the device kind.
"""
from __future__ import annotations

import functools
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per chip, by (a substring of) jax's device_kind.
ACCELERATOR_PEAKS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H200": 989e12, "H100": 989e12,
    "A100": 312e12,
}


@functools.lru_cache(maxsize=None)
def matmul_chain(size: int = 1024, repeats: int = 8,
                 devices: Optional[tuple[jax.Device, ...]] = None
                 ) -> tuple[Callable[[], None], float]:
    """`(run, flops)`: `run()` multiplies a float32 `size x size` matrix `repeats` times on the
    default device (or on each of `devices` at once, one matrix per device) and blocks until
    done; `flops` is the FLOP count of all of it. Compiled and warmed up once per process, so
    repeated peak measurements time the matmuls only."""
    count = len(devices) if devices else 1
    a = jnp.ones((count, size, size), jnp.float32) / size
    if devices:
        mesh = jax.sharding.Mesh(np.asarray(devices), ("devices",))
        a = jax.device_put(a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
            "devices")))
    chain = jax.jit(lambda x: jax.lax.fori_loop(
        0, repeats, lambda _, y: jnp.einsum("nij,njk->nik", y, a), x))

    def run() -> None:
        jax.block_until_ready(chain(a))

    run()
    return run, 2.0 * size ** 3 * repeats * count


def measured_matmul_peak(size: int = 1024, repeats: int = 8,
                         devices: Optional[tuple[jax.Device, ...]] = None) -> float:
    """The f32 matmul rate (FLOP/s) of the default device, or of `devices` working at once: best
    of a few timed runs of `matmul_chain`."""
    run, flops = matmul_chain(size, repeats, devices)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return flops / best


def device_peak_flops(device: Optional[jax.Device] = None) -> tuple[float, str]:
    """`(peak FLOP/s per device, how it was obtained)`."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        for kind, peak in ACCELERATOR_PEAKS.items():
            if kind.lower() in device.device_kind.lower():
                return peak, f"{device.device_kind} bf16 peak"
    return measured_matmul_peak(), f"measured {device.platform} f32 matmul rate"


def utilization(achieved: float, peak: float, peak_source: str) -> tuple[float, float]:
    """`(MFU, peak)` for `achieved` FLOP/s per device. A measured peak (the CPU's matmul rate,
    taken once when training starts) rises to a rate the run itself achieved, so a machine that
    was busier when the peak was measured than later never reports an MFU above 1; a
    specification peak stays (an MFU above 1 then means a FLOP count is wrong)."""
    if peak_source.startswith("measured") and achieved > peak:
        peak = achieved
    return achieved / peak, peak


def training_flops_per_step(model, batch: int, length: int) -> Optional[float]:
    """3 x forward model FLOPs for one step, or None if the model cannot count its own."""
    per_token = getattr(model, "flops_per_token", None)
    if per_token is None:
        return None
    return 3.0 * per_token(length) * batch * length


def xla_flops(compiled) -> Optional[float]:
    """FLOPs from XLA's cost analysis of a compiled computation (None when unavailable)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None
