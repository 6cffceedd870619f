"""Benchmark: Pallas kernels ("pallas") vs blocked XLA ("xla") vs materialized ("reference")
attention over sequence length N and mask, on whatever backend runs it.

What it measures
----------------
For each N in `--lengths` and each mask in `--masks` (`causal`, `window:W`, `chunk:C`,
`blockwise:B`, `bidir`), q, k, v `[batch, N, heads, head_dim]` (`--dtype`; GQA with
`--kv_heads`), an ALiBi bias when `--bias`, and each implementation in `--impls`:

* compile s  -- `jax.jit(f).lower(...).compile()` time.
* temp MiB   -- the compiled program's scratch (`memory_analysis().temp_size_in_bytes`).
* XLA GFLOP  -- XLA's cost analysis of the compiled program (for a Pallas call this is exactly
                what the kernel declares: the FLOPs of the block pairs it visits).
* ms         -- median wall time of `--repeats` calls after `--warmup` (forward; with
                `--backward`, value and gradient of sum(out^2) w.r.t. q, k, v).
* pairs      -- for "pallas": visited (query block, key block) pairs per batch and head, and
                their fraction of all pairs.

On CPU "pallas" runs the TPU kernels in Pallas interpret mode: its times measure the
interpreter, not a kernel, and say nothing about TPU/GPU speed. Kernel speed is claimed only from
runs on real hardware. On a GPU `--impls` may include "cudnn"
(`jax.nn.dot_product_attention(implementation="cudnn")`), measured for the masks it supports
natively (causal, sliding window) and without a bias.

`--topology v5e:1x1` (needs libtpu) compiles instead for that TPU topology ahead of time, runs
nothing, and reports the compiler's estimates (`cost_analysis`, `memory_analysis`) for
"pallas" (= "pallas_tpu") and "xla": useful to see the declared block-sparse cost, not a timing.

The reference is skipped (memory still reported) when its temp memory exceeds
`--max_run_bytes`. Outputs: `--out`/kernel_bench[.TAG].{md,csv,json}; TAG from the options
(backend or topology, `backward`, `bias`) unless `--tag` is given.

Examples
--------
  .venv/bin/python experiments/kernel_bench.py --lengths 256,512,1024 --masks causal,window:128
  .venv/bin/python experiments/kernel_bench.py --topology v5e:1x1 --dtype bfloat16 \
      --lengths 2048,8192,32768 --masks causal,window:512,chunk:512 --backward
  # on a GPU machine:
  python experiments/kernel_bench.py --dtype bfloat16 --impls pallas,xla,reference,cudnn \
      --lengths 1024,4096,16384 --masks causal,window:256 --backward
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lexjax.attention import MaskSpec, attend
from lexjax.attention.kernels import BlockGrid
from lexjax.attention.kernels.pallas_attention import block_sizes
from lexjax.attention.kernels.impl import lowering_for_backend
from lexjax.benchmarking.topology import CHIPS, estimated_seconds, parse_topology
from lexjax.positions import ALiBi

MIB = 2 ** 20
GIB = 2 ** 30


def parse_mask(text: str) -> MaskSpec:
    """"causal", "bidir", "window:W", "chunk:C", "blockwise:B"."""
    if text == "causal":
        return MaskSpec()
    if text == "bidir":
        return MaskSpec(causal=False)
    kind, _, size = text.partition(":")
    if kind not in ("window", "chunk", "blockwise") or not size.isdigit():
        raise argparse.ArgumentTypeError(f"bad mask {text!r}: causal, bidir, window:W, chunk:C "
                                         "or blockwise:B")
    return MaskSpec(**{kind: int(size)})


def cudnn_supports(mask: MaskSpec, bias: bool) -> bool:
    return not bias and mask.causal and mask.kind in ("full", "window")


def attention_fn(impl: str, mask: MaskSpec, bias, topology: bool):
    """(q, k, v) -> out for an implementation name."""
    if impl == "cudnn":
        window = (mask.window - 1, 0) if mask.window else None
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=window, implementation="cudnn")
    name = "pallas_tpu" if (impl == "pallas" and topology) else impl
    return lambda q, k, v: attend(q, k, v, mask=mask, bias=bias, impl=name)


def with_backward(fn):
    def value_and_grads(q, k, v):
        return jax.value_and_grad(
            lambda q, k, v: jnp.sum(jnp.square(fn(q, k, v).astype(jnp.float32))),
            argnums=(0, 1, 2))(q, k, v)
    return value_and_grads


def time_calls(compiled, args, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        samples.append(time.perf_counter() - start)
    return samples


def measure(args, impl: str, mask: MaskSpec, n: int, sharding) -> dict:
    dtype = jnp.dtype(args.dtype)
    shapes = [(args.batch, n, args.heads, args.head_dim)] + \
        [(args.batch, n, args.kv_heads, args.head_dim)] * 2
    abstract = [jax.ShapeDtypeStruct(s, dtype, sharding=sharding) for s in shapes]
    bias = ALiBi().relative_bias(args.heads, args.head_dim) if args.bias else None
    fn = attention_fn(impl, mask, bias, sharding is not None)
    if args.backward:
        fn = with_backward(fn)
    row = {"impl": impl, "n": n, "mask": mask_name(mask)}
    if impl == "pallas":
        lowering = "tpu" if sharding is not None else lowering_for_backend(jax.default_backend())[0]
        interpret = sharding is None and lowering_for_backend(jax.default_backend())[1]
        grid = BlockGrid(mask, n, *block_sizes(lowering, n, None, None, interpret))
        total = grid.num_q_blocks * grid.num_kv_blocks
        row.update(pairs=grid.visited_pairs, pair_fraction=grid.visited_pairs / total)
    start = time.perf_counter()
    try:
        compiled = jax.jit(fn).lower(*abstract).compile()
    except Exception as e:  # report the failure (e.g. a mask cuDNN rejects) and go on
        row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        return row
    row["compile_s"] = time.perf_counter() - start
    memory = compiled.memory_analysis()
    row["temp_mib"] = memory.temp_size_in_bytes / MIB if memory is not None else None
    costs = compiled.cost_analysis() or {}
    row["xla_gflop"] = costs.get("flops", 0.0) / 1e9
    if sharding is not None:
        seconds, source = estimated_seconds(costs, CHIPS[parse_topology(args.topology)[0]])
        row.update(estimated_ms=None if seconds is None else seconds * 1e3, est_source=source)
        return row
    if impl == "reference" and memory is not None and \
            memory.temp_size_in_bytes > args.max_run_bytes:
        row["ms"] = None
        row["note"] = "skipped (memory)"
        return row
    rng = np.random.default_rng(0)
    values = [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]
    samples = time_calls(compiled, values, args.warmup, args.repeats)
    row.update(ms=1e3 * statistics.median(samples), samples_ms=[1e3 * s for s in samples])
    return row


def mask_name(mask: MaskSpec) -> str:
    if mask.kind == "full":
        return "causal" if mask.causal else "bidir"
    size = getattr(mask, mask.kind)
    return f"{mask.kind}:{size}" + ("" if mask.causal else "_bidir")


def tpu_sharding(topology: str):
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    mesh = jax.sharding.Mesh(np.array(devices[:1]), ("x",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


COLUMNS = ["mask", "n", "impl", "compile_s", "temp_mib", "xla_gflop", "estimated_ms",
           "est_source", "ms",
           "pairs", "pair_fraction", "note", "error"]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_results(rows: list[dict], meta: dict, out: Path, tag: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"kernel_bench.{tag}" if tag else "kernel_bench"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    columns = [c for c in COLUMNS if any(c in r for r in rows)]
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# kernel_bench ({tag or 'default'})", "", f"`{meta['command']}`", "",
             f"backend: {meta['backend']}; devices: {meta['devices']}; {meta['when']}; load "
             f"average {meta['load_average'][0]:.1f}", ""]
    lines += [f"- {note}" for note in meta["notes"]]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return out / stem


def notes(args) -> list[str]:
    """How to read this run's numbers."""
    out = ["XLA GFLOP is XLA's cost analysis; it counts a while loop's body once, so it "
           "under-counts the 'xla' impl's loop over query blocks on full masks; for 'pallas' it "
           "is the kernels' declaration (FLOPs of the visited block pairs)."]
    if args.topology:
        out.append(f"Compiled for TPU {args.topology} ahead of time; nothing ran. estimated_ms is "
                   "an estimate, not a measurement, by the method in est_source: the compiler's "
                   "optimal_seconds where positive, else the roofline max(FLOPs / peak, bytes / "
                   "HBM bandwidth) of the same cost analysis (lexjax.benchmarking.topology).")
    elif lowering_for_backend(jax.default_backend())[1] and "pallas" in args.impls:
        out.append("'pallas' ran the TPU kernels in Pallas interpret mode on this "
                   f"{jax.default_backend()}: its ms time the interpreter, not a kernel.")
    return out


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="256,512,1024",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--masks", default="causal,window:128,chunk:128",
                        type=lambda s: [parse_mask(x) for x in s.split(",")])
    parser.add_argument("--impls", default="pallas,xla,reference",
                        type=lambda s: s.split(","))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv_heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--bias", action="store_true", help="ALiBi bias (in-kernel HeadBias)")
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--topology", default=None,
                        help="compile for this TPU topology (e.g. v5e:1x1) instead of running")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max_run_bytes", type=float, default=4 * GIB)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tag", default=None)
    args = parser.parse_args(argv)
    if args.topology:
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    sharding = tpu_sharding(args.topology) if args.topology else None
    impls = [i for i in args.impls if not (args.topology and i in ("reference", "cudnn"))]
    rows = []
    for mask in args.masks:
        for n in args.lengths:
            for impl in impls:
                if impl == "cudnn" and not cudnn_supports(mask, args.bias):
                    continue
                row = measure(args, impl, mask, n, sharding)
                rows.append(row)
                print(" ".join(f"{c}={_cell(row.get(c))}" for c in COLUMNS if c in row),
                      flush=True)
    tag = args.tag if args.tag is not None else ".".join(
        [args.topology.replace(":", "_") if args.topology else jax.default_backend()]
        + (["backward"] if args.backward else []) + (["bias"] if args.bias else []))
    meta = {"command": "python experiments/kernel_bench.py " + " ".join(
        argv if argv is not None else sys.argv[1:]),
        "backend": args.topology or jax.default_backend(),
        "devices": str(jax.devices()), "when": datetime.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(), "load_average": os.getloadavg(), "notes": notes(args),
        "args": {k: os.path.relpath(v) if k == "out" else str(v)  # no machine paths
                 for k, v in vars(args).items()}}
    print("wrote", write_results(rows, meta, args.out, tag))


if __name__ == "__main__":
    main()
