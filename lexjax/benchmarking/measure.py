"""Measured rows: the train step compiled and run on a mesh of the devices at hand."""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Optional

import jax
import numpy as np

from lexjax import partitioning
from lexjax.training import flops as flops_lib
from lexjax.training.config import TrainConfig
from lexjax.training.inputs import training_batches
from lexjax.training.step import ShardedTrainStep


def first_batch(model, config: TrainConfig, mesh_spec: str) -> dict[str, np.ndarray]:
    """This process's rows, on mesh `mesh_spec`, of the run's first training batch (the same
    global batch on every mesh), laid out as the trainer reads them for this model
    (`lexjax.training.inputs`)."""
    return next(training_batches(model, dataclasses.replace(config, mesh=mesh_spec)))


def mesh_peak_flops(mesh, device_peak: tuple[float, str]) -> tuple[float, str]:
    """Peak FLOP/s of the whole mesh from one device's `(peak, source)`. CPU devices (real or
    faked) share the host's cores, so on CPU the peak is the host's measured matmul rate: the
    better of one device's and all the mesh's devices' running at once (a step on several
    devices may use the cores better than one device's matmuls do)."""
    peak, source = device_peak
    if mesh.devices.flat[0].platform != "cpu":
        return peak * mesh.size, f"{source} x {mesh.size}"
    if mesh.size > 1:
        together = flops_lib.measured_matmul_peak(devices=tuple(mesh.devices.flat))
        if together > peak:
            return together, (f"{source} of its {mesh.size} CPU devices at once (the host, "
                              "shared by them)")
    return peak, source + " (the host, shared by its CPU devices)"


def mesh_utilization(flops: float, seconds: float, peak: tuple[float, str]
                     ) -> tuple[float, float, str]:
    """`(MFU, peak, source)` of a step of `flops` model FLOPs in `seconds`; a measured peak that
    the step beat (the host was busier when the peak was measured) rises to the step's rate,
    and the source says so (`flops.utilization`)."""
    mfu, raised = flops_lib.utilization(flops / seconds, *peak)
    source = peak[1] if raised == peak[0] else (
        f"{peak[1]}, raised to this step's rate (the peak was measured on a busier host)")
    return mfu, raised, source


def step_flops(model, config: TrainConfig, compiled, num_devices: int) -> Optional[float]:
    """Model FLOPs of one step (the model's own count, else XLA's per-device count x devices)."""
    counted = flops_lib.training_flops_per_step(model, config.batch_size, config.train_length)
    if counted:
        return counted
    per_device = flops_lib.xla_flops(compiled)
    return per_device * num_devices if per_device else None


def measure_mesh(model, config: TrainConfig, mesh_spec: str, steps: int,
                 device_peak: tuple[float, str]) -> dict:
    """Compiles the train step on `mesh_spec` (see `partitioning.make_mesh`), runs `steps` steps
    on the run's first batch from the same initial state, and returns its row: compile time, the
    median step time (of steps after the first, when there are several), tokens/s, MFU, the
    first step's loss, state bytes per device (from the shardings) and XLA's peak temporary
    bytes.
    `device_peak`: `flops.device_peak_flops()`, measured once per process."""
    mesh = partitioning.make_mesh(mesh_spec)  # "" on CPU: one device, as in training
    step = ShardedTrainStep(model, config, mesh)
    compiled, compile_seconds = step.compile()
    state = step.init(config.seed)
    device_batch = step.device_batch(first_batch(model, config, mesh_spec))
    key = jax.random.PRNGKey(config.seed)
    times, first_loss = [], None
    for i in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, device_batch, key)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
        if i == 0:
            first_loss = float(metrics["loss"])
    median = statistics.median(times[1:] if len(times) > 1 else times)
    flops = step_flops(model, config, compiled, mesh.size)
    peak = mesh_peak_flops(mesh, device_peak)
    mfu, peak_flops, peak_source = (mesh_utilization(flops, median, peak) if flops
                                    else (None, *peak))
    memory = compiled.memory_analysis()
    return {
        "mesh": mesh_spec,
        "mesh_shape": "x".join(str(mesh.shape[a]) for a in partitioning.MESH_AXES),
        "devices": mesh.size,
        "compile_seconds": compile_seconds,
        "step_seconds": median,
        "tokens_per_sec": config.tokens_per_step / median,
        "mfu": mfu,
        "loss": first_loss,
        "state_bytes_per_device": partitioning.bytes_per_device(step.abstract_state),
        "param_bytes_per_device": partitioning.bytes_per_device(step.abstract_state.params),
        "temp_bytes": int(memory.temp_size_in_bytes) if memory is not None else None,
        "peak_flops": peak_flops,
        "peak_source": peak_source,
    }
