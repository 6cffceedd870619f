"""Throughput across mesh shapes, the two tables of the README's sharding section.

  python experiments/mesh_sweep.py measured    # quickstart model, 8 (faked) CPU devices
  python experiments/mesh_sweep.py estimated   # ~1B Transformer, compiled for a TPU topology

Each runs `python -m lexjax.bench` once and leaves its bench.{json,csv,md,png} under
experiments/results/mesh_<name>/. Measured timings on a shared CPU are noisy: compare meshes
within one run (the ratios), not across runs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEASURED_MESHES = ["", "data:8", "fsdp:8", "data:2,tensor:4", "data:2,fsdp:2,tensor:2"]
ESTIMATED_MESHES = ["data:16", "fsdp:16", "data:4,fsdp:4", "fsdp:4,tensor:4"]


def bench(args: list[str]) -> None:
    command = [sys.executable, "-m", "lexjax.bench", *args]
    print("+", " ".join(repr(a) if a.endswith("=") or " " in a else a for a in command),
          flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["measured", "estimated", "both"])
    parser.add_argument("--steps", type=int, default=10, help="measured steps per mesh")
    parser.add_argument("--topology", default="v5e:4x4", help="TPU topology for the estimates")
    parser.add_argument("--mesh", action="append", default=None,
                        help="estimated meshes (repeatable; the default suits 16 chips)")
    parser.add_argument("--results", default=os.path.join(ROOT, "experiments", "results"))
    args = parser.parse_args()
    if args.which in ("measured", "both"):
        bench(["--gin_file=configs/runs/quickstart.gin",
               *[f"--mesh={m}" for m in MEASURED_MESHES], f"--steps={args.steps}",
               f"--out={os.path.join(args.results, 'mesh_quickstart_cpu8')}"])
    if args.which in ("estimated", "both"):
        name = "mesh_transformer_1b_" + args.topology.replace(":", "_")
        bench(["--gin_file=configs/runs/transformer_1b.gin", f"--topology={args.topology}",
               *[f"--mesh={m}" for m in args.mesh or ESTIMATED_MESHES],
               f"--out={os.path.join(args.results, name)}"])


if __name__ == "__main__":
    main()
