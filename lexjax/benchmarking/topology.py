"""Estimated rows: the train step compiled ahead of time for a Cloud TPU topology on this host
(libtpu from PyPI, `pip install 'lexjax[tpu]'`), without a TPU.

Per mesh shape: whether the step fits the chip's HBM (`memory_analysis()`; the TPU compiler
itself refuses a program that does not fit, and we report by how much), its per-chip FLOPs and
bytes (`cost_analysis()`), and the compiler's roofline estimate of the step time
(`optimal_seconds`) with the tokens/s and MFU it implies. These are compiler estimates, not
measurements. XLA's cost analysis counts a loop body once (so rows report how many while loops
the step has: a model estimated with `scan_layers=True` is undercounted by about its depth), and
a Pallas kernel contributes only the cost it declares (so rows name the kernels in the step).
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Optional

import jax

from lexjax import partitioning
from lexjax.partitioning import MeshError
from lexjax.training import flops as flops_lib
from lexjax.training.config import TrainConfig
from lexjax.training.step import ShardedTrainStep

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: HBM size and bandwidth, dense bf16 peak FLOP/s, per chip."""

    device_kind: str
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    peak_flops: float
    chip_config: Optional[str] = None  # "megacore": one jax device per chip (two TensorCores)


# Names as in topology strings ("v5e:4x4"); figures from Cloud TPU's system architecture pages.
CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 1228e9, 275e12, "megacore"),
    "v5e": Chip("TPU v5 lite", 16 * GIB, 819e9, 197e12),
    "v5p": Chip("TPU v5", 95 * GIB, 2765e9, 459e12, "megacore"),
    "v6e": Chip("TPU v6 lite", 32 * GIB, 1640e9, 918e12),
}
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # e.g. "v5e:2x2"
    chip: Chip
    devices: tuple  # compile-only jax devices, one per chip


def parse_topology(name: str) -> tuple[str, str]:
    """`"v5e:4x4"` -> `("v5e", "4x4")`, or `MeshError` naming the accepted forms."""
    match = _TOPOLOGY.match(name.strip())
    if not match:
        raise MeshError(f"bad TPU topology {name!r}: use GENERATION:SHAPE with a generation of "
                        f"{sorted(CHIPS)}, e.g. v5e:2x2, v5e:4x4, v6e:4x4, v4:2x2x1, v5p:2x2x2")
    return match.group(1), match.group(2)


def load_topology(name: str) -> Topology:
    """The compile-only devices of a TPU topology, from libtpu (no TPU needed)."""
    generation, _ = parse_topology(name)
    chip = CHIPS[generation]
    # libtpu takes a host-wide lock on load; compiling ahead of time needs no exclusive TPU.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    kwargs = {"chip_config_name": chip.chip_config} if chip.chip_config else {}
    try:
        description = topologies.get_topology_desc(platform="tpu", topology_name=name.strip(),
                                                   **kwargs)
    except Exception as e:  # no libtpu, or libtpu rejects the shape
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise MeshError(f"cannot describe TPU topology {name!r}: {first}. TPU estimates need "
                        "libtpu matching jax: pip install 'lexjax[tpu]'") from None
    return Topology(name.strip(), chip, tuple(description.devices))


def _gib(n: float) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 2 ** 20:.1f} MiB"


def _size_bytes(text: str) -> float:
    """"26.84G" -> bytes (XLA's binary units)."""
    number, unit = float(text[:-1]), text[-1].upper()
    return number * 1024 ** "BKMGT".index(unit) if unit in "BKMGT" else float(text)


def hbm_overflow(message: str) -> Optional[tuple[float, float]]:
    """`(bytes needed, bytes available)` from XLA:TPU's out-of-HBM compile error, else None."""
    found = re.search(r"\(([\d.]+[KMGT]?)\) exceeds available HBM \(([\d.]+[KMGT]?)\)", message)
    if not found:
        found = re.search(r"Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm", message)
    if not found:
        return None
    return _size_bytes(found.group(1)), _size_bytes(found.group(2))


def while_loops(hlo_text: str) -> int:
    """How many while loops an optimized HLO module has: XLA's cost analysis counts each loop
    body once, whatever its trip count, so estimates of a step with loops are low."""
    return len(re.findall(r"\swhile\(", hlo_text))


def step_loops(compiled, lowered_text: str) -> int:
    """`while_loops` of the optimized step; where XLA cannot print the optimized module (a
    RET_CHECK on async collectives of multi-chip v5p and v6e programs), the loops of the lowered
    step (`stablehlo.while`: the same scans, before XLA's loop passes)."""
    try:
        return while_loops(compiled.as_text())
    except jax.errors.JaxRuntimeError:
        return len(re.findall(r"stablehlo\.while", lowered_text))


def no_faster_than_peak(seconds: float, source: str, model_flops_per_chip: float, chip: Chip,
                        loops: int) -> tuple[float, str]:
    """`(seconds, source)`, or the time the model's FLOPs take at the chip's peak where the
    estimate is shorter than that (impossible: XLA counts a loop body once, so a step with while
    loops, e.g. `scan_layers=True`, is under-counted), with the reason in the source."""
    floor = model_flops_per_chip / chip.peak_flops
    if seconds >= floor:
        return seconds, source
    why = f"{loops} while loops, each body counted once" if loops else "under-counted"
    return floor, f"model FLOPs at peak (the {source}, {seconds:.3g} s, is shorter: {why})"


def pallas_kernels(lowered_text: str) -> list[str]:
    """Names of the Pallas TPU kernels (Mosaic custom calls) in a lowered step."""
    names = re.findall(r'@tpu_custom_call\(.*?kernel_name = "([^"]+)"', lowered_text)
    return sorted(set(names))


def estimated_seconds(cost: dict, chip: Chip) -> tuple[Optional[float], str]:
    """`(step seconds, how)`: the compiler's `optimal_seconds` where it gives a positive one
    (it returns a negative value for some programs, the quickstart step among them); otherwise
    the roofline of the same cost analysis: max(FLOPs / peak, bytes accessed / HBM bandwidth),
    per chip."""
    optimal = cost.get("optimal_seconds")
    if optimal and optimal > 0:
        return float(optimal), "compiler optimal_seconds"
    flops, accessed = cost.get("flops"), cost.get("bytes accessed")
    if not flops and not accessed:
        return None, "no cost analysis"
    return (max((flops or 0) / chip.peak_flops, (accessed or 0) / chip.hbm_bandwidth),
            "roofline of cost_analysis")


def estimate_mesh(model, config: TrainConfig, mesh_spec: str, topology: Topology) -> dict:
    """Compiles the train step for `topology` on `mesh_spec` and returns its row of estimates;
    a step that does not fit HBM gives a row with `fits_hbm=False` and a note saying by how
    much."""
    mesh = partitioning.make_mesh(mesh_spec, topology.devices)
    step = ShardedTrainStep(model, config, mesh)
    chip = topology.chip
    state_bytes = partitioning.bytes_per_device(step.abstract_state)
    row = {"mesh": mesh_spec, "topology": topology.name,
           "mesh_shape": "x".join(str(mesh.shape[a]) for a in partitioning.MESH_AXES),
           "chips": mesh.size, "state_bytes_per_device": state_bytes,
           "hbm_bytes_per_chip": chip.hbm_bytes}
    if state_bytes > chip.hbm_bytes:
        return {**row, "fits_hbm": False, "hbm_note": (
            f"does not fit: parameters + optimizer state alone need {_gib(state_bytes)} per "
            f"chip, over the {_gib(chip.hbm_bytes)} of HBM by {_gib(state_bytes - chip.hbm_bytes)}")}
    start = time.perf_counter()
    lowered = step.lower()
    lowered_text = lowered.as_text()
    kernels = pallas_kernels(lowered_text)
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA:TPU refuses programs that overflow HBM
        overflow = hbm_overflow(str(e))
        if overflow is None:
            raise
        needed, available = overflow
        return {**row, "fits_hbm": False, "hbm_needed_bytes": int(needed), "hbm_note": (
            f"does not fit: needs {_gib(needed)} per chip, {_gib(available)} available, "
            f"over by {_gib(needed - available)}")}
    compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    needed = (memory.argument_size_in_bytes + memory.output_size_in_bytes
              - memory.alias_size_in_bytes + memory.temp_size_in_bytes
              + memory.generated_code_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    seconds, source = estimated_seconds(cost, chip)
    model_flops = flops_lib.training_flops_per_step(model, config.batch_size,
                                                    config.train_length)
    if not model_flops and cost.get("flops"):
        model_flops = cost["flops"] * mesh.size
    loops = step_loops(compiled, lowered_text)
    if seconds and model_flops:
        seconds, source = no_faster_than_peak(seconds, source, model_flops / mesh.size, chip,
                                              loops)
    est = {}
    if seconds:
        est = {"est_step_seconds": seconds, "est_source": source,
               "est_tokens_per_sec": config.tokens_per_step / seconds,
               "est_mfu": (model_flops / seconds / (chip.peak_flops * mesh.size)
                           if model_flops else None)}
    fits = needed <= chip.hbm_bytes
    return {**row, "fits_hbm": fits, "hbm_needed_bytes": int(needed),
            "hbm_note": (f"fits: {_gib(needed)} of {_gib(chip.hbm_bytes)}" if fits else
                         f"does not fit: needs {_gib(needed)}, over by "
                         f"{_gib(needed - chip.hbm_bytes)}"),
            "temp_bytes": int(memory.temp_size_in_bytes), "compile_seconds": compile_seconds,
            "flops_per_chip": cost.get("flops"), "bytes_accessed_per_chip":
            cost.get("bytes accessed"), **est,
            "while_loops": loops,
            "kernels": ",".join(kernels) if kernels else "none (XLA only)"}
