"""Compare the train step across device mesh shapes:
`python -m lexjax.bench --gin_file=configs/runs/quickstart.gin [--gin.NAME=VALUE ...]
--mesh=data:8 --mesh=fsdp:8 --mesh=data:2,tensor:4 [--topology=v5e:4x4] --steps=N --out=DIR`.

Measured (default): on the devices at hand, per mesh: compile time, median step time, tokens/s,
MFU, the first step's loss (the same initial state and batch on every mesh, so it must agree),
parameter + optimizer-state bytes per device (from the shardings) and XLA's peak temporary
bytes. On CPU it fakes 8 devices (more if a mesh needs them) when fewer exist.

Estimated (`--topology`): the step compiled ahead of time for a Cloud TPU topology on this host
(needs `pip install 'lexjax[tpu]'`), per mesh: fits HBM or by how much it does not, FLOPs and
bytes per chip, and the compiler's roofline step time with the tokens/s and MFU it implies.

The model and the run (its TrainConfig: BATCH_SIZE, TRAIN_LENGTH, the data, the optimizer) come
from the gin files, read exactly as the trainer reads them; writes DIR/bench.{json,csv,md,png} and
prints the table. Multi-host: every host runs the command with `--distributed` (the flags of
`python -m lexjax.train`); process 0 prints and writes the report.
"""
from __future__ import annotations

import argparse
import os
import sys

from lexjax import cli

DEFAULT_CPU_DEVICES = 8


def fake_cpu_devices(meshes: list[str]) -> None:
    """Asks XLA for enough CPU devices for every mesh (at least 8) unless XLA_FLAGS already sets
    a count; must run before jax initializes its backends. Only the CPU backend reads it."""
    from lexjax.partitioning import mesh_devices_needed

    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_force_host_platform_device_count" in flags:
        return
    count = max([DEFAULT_CPU_DEVICES] + [mesh_devices_needed(m) for m in meshes])
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lexjax.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_gin_flags(parser)
    parser.add_argument("--mesh", action="append", default=[],
                        help="mesh string, repeatable (default: the gin's MESH, or data:-1)")
    parser.add_argument("--steps", type=int, default=5,
                        help="measured steps per mesh (the median excludes the first)")
    parser.add_argument("--topology", default=None,
                        help="estimate for a Cloud TPU topology instead of measuring, e.g. "
                             "v5e:4x4, v6e:2x2, v4:2x2x1, v5p:2x2x2")
    parser.add_argument("--out", required=True, help="directory for bench.{json,csv,md,png}")
    cli.add_distributed_flags(parser)
    args, bindings = cli.parse_args(parser, sys.argv[1:] if argv is None else argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    import jax

    if args.topology:
        if not os.environ.get("JAX_PLATFORMS"):
            jax.config.update("jax_platforms", "cpu")  # lowering needs no local accelerator
    else:
        fake_cpu_devices(args.mesh)

    from lexjax import partitioning
    from lexjax.benchmarking import report
    from lexjax.config import parse_gin
    from lexjax.runs import configured_training

    cli.join_distributed(args)
    primary = partitioning.is_primary_process()  # multi-host: process 0 reports

    def say(text: str) -> None:
        if primary:
            print(text, file=sys.stderr)

    parse_gin(args.gin_file, bindings)
    model, config = configured_training()
    meshes = args.mesh or [config.mesh or "data:-1"]
    name = type(model).__name__
    shape = f"batch {config.batch_size} x length {config.train_length}"
    if args.topology:
        from lexjax.benchmarking.topology import estimate_mesh, load_topology

        topology = load_topology(args.topology)
        for mesh in meshes:  # every mesh string checked before any compiling
            partitioning.parse_mesh(mesh, len(topology.devices))
        title = f"{name} ({shape}): compiler estimates for TPU {topology.name}"
        say(f"{title}: {len(topology.devices)} chips")
        rows = []
        for mesh in meshes:
            row = estimate_mesh(model, config, mesh, topology)
            say(f"  {mesh}: {row['hbm_note']}")
            rows.append(row)
        extra = {"mode": "estimated", "topology": topology.name, "model": name,
                 "batch_size": config.batch_size, "length": config.train_length}
    else:
        from lexjax.benchmarking.measure import measure_mesh
        from lexjax.training.flops import device_peak_flops

        for mesh in meshes:  # every mesh string checked before any data or compiling
            partitioning.parse_mesh(mesh, jax.device_count())
        device_peak = device_peak_flops()
        title = (f"{name} ({shape}): measured on {jax.device_count()} "
                 f"{jax.devices()[0].platform} devices")
        say(title)
        rows = []
        for mesh in meshes:
            row = measure_mesh(model, config, mesh, args.steps, device_peak)
            say(f"  {mesh}: loss {row['loss']:.4f}, {row['tokens_per_sec']:.0f} tokens/s")
            rows.append(row)
        extra = {"mode": "measured", "model": name, "batch_size": config.batch_size,
                 "length": config.train_length, "steps": args.steps,
                 "platform": jax.devices()[0].platform, "peak_source": rows[0]["peak_source"]}
    if primary:
        print(report.write_bench(args.out, rows, title=title, extra=extra))
    return 0


if __name__ == "__main__":
    cli.run_main(main)
