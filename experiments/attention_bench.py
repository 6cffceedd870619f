"""Benchmark: materialized ("reference") vs blocked XLA ("xla") attention under a sliding window.

What it measures
----------------
For each sequence length N (default 1024 .. 16384) it builds
`attend(q, k, v, mask=MaskSpec(causal=True, window=w), bias=..., impl=...)` with q, k, v of
shape `[batch, N, heads, head_dim]` (default 1, N, 4, 64, float32) and, for each impl:

* temp MiB   -- the compiled program's temporary buffers,
                `jax.jit(f).lower(*ShapeDtypeStructs).compile().memory_analysis()
                .temp_size_in_bytes`.
                This is XLA's own accounting of the scratch it allocates (arguments and outputs
                excluded), known without running anything, so it is reported even for sizes that
                would not fit in memory.
* ms         -- forward wall time: median of `--repeats` calls after `--warmup` calls, each
                ending in `block_until_ready`. Compilation is excluded (reported separately in
                the JSON).
* fwd+bwd ms -- with `--backward`: time of `jax.grad(lambda q, k, v: sum(attend(...) ** 2),
                argnums=(0, 1, 2))`, and the temp memory of that compiled gradient.

The reference is *not run* (memory still reported) when its temp memory exceeds
`--max_run_bytes` (default 6 GiB); its time cell then reads "skipped (memory)". The xla impl is
always run. Where both ran, the JSON/CSV record the largest |reference - xla| of the outputs.

How to read it
--------------
* memory ratio = xla temp / reference temp (lower is better; the project goal at N=8192, w=256 is
  < 15%). For a window w and block b the blocked impl holds `ceil((w-1)/b) + 1` key blocks per
  query block, so its logits are ~`N * (ceil((w-1)/b) + 1) * b` instead of `N * N`.
* speed-up = reference ms / xla ms (higher is better; goal at N=8192, w=256: >= 5x forward).
* The reference is O(N^2) in time and memory, the xla impl O(N * span): the log-log plot should
  show slope ~2 vs ~1.
* Timings are wall-clock on whatever machine runs this (on the 2-core CPU box, large
  materialized runs vary by up to ~30% from call to call, partly page-faulting fresh GiB-sized
  buffers, and more when other jobs share the cores); the JSON keeps every sample, the minimum,
  the process CPU time per call (user+system over all threads: the core-seconds a call costs,
  less sensitive to other jobs than wall time), and the load average and CPU pressure before
  and after the run. Treat differences under ~10-15% as noise.

`--sweep_block` instead runs the xla impl at a single N (`--sweep_n`, default 8192) for block sizes
`--sweep_blocks` (default 64,128,256,512), with the reference as the baseline row, to choose the
default block size for window masks.

Outputs go to `--out` (default experiments/results/) as attention_bench[.TAG].{md,csv,json,png};
TAG is derived from the options (e.g. `bias`, `backward`, `sweep_block`) unless `--tag` is given,
so the variants do not overwrite each other.

Examples
--------
  .venv/bin/python experiments/attention_bench.py
  .venv/bin/python experiments/attention_bench.py --bias
  .venv/bin/python experiments/attention_bench.py --backward --lengths 1024,2048,4096,8192
  .venv/bin/python experiments/attention_bench.py --sweep_block
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
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from lexjax.attention import MaskSpec, attend
from lexjax.attention.blocked import default_block_size
from lexjax.positions import ALiBi

MIB = 2 ** 20
GIB = 2 ** 30
IMPLS = ("reference", "xla")
SKIPPED = "skipped (memory)"


def parse_int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=parse_int_list, default=[1024, 2048, 4096, 8192, 16384],
                   help="comma-separated sequence lengths N")
    p.add_argument("--window", type=int, default=256, help="sliding window w (causal)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--bias", action="store_true", help="add an ALiBi relative bias")
    p.add_argument("--backward", action="store_true",
                   help="also time forward+backward (grad of sum of squares w.r.t. q, k, v)")
    p.add_argument("--block_size", type=int, default=None,
                   help="block size for the xla impl (default: lexjax's default_block_size)")
    p.add_argument("--max_run_bytes", type=float, default=6 * GIB,
                   help="do not run the reference when its temp memory exceeds this many bytes")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after compilation")
    p.add_argument("--repeats", type=int, default=7, help="timed calls (the median is reported)")
    p.add_argument("--sweep_block", action="store_true",
                   help="sweep the xla block size at one N instead of sweeping N")
    p.add_argument("--sweep_n", type=int, default=8192, help="N for --sweep_block")
    p.add_argument("--sweep_blocks", type=parse_int_list, default=[64, 128, 256, 512],
                   help="block sizes for --sweep_block")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="output directory")
    p.add_argument("--tag", default=None,
                   help="file name tag: attention_bench.TAG.*; default derived from options, "
                        "'' for plain attention_bench.*")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_plot", action="store_true")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- functions

def make_bias(args) -> Optional[Callable]:
    if not args.bias:
        return None
    # ALiBi has no parameters, so its hook can be called on an unbound module.
    return ALiBi().relative_bias(args.heads, args.head_dim)


def make_fns(impl: str, mask: MaskSpec, bias, block_size: Optional[int]):
    """Returns (forward, forward+backward) for one implementation."""
    kwargs = dict(mask=mask, bias=bias, impl=impl)
    if impl != "reference":
        kwargs["block_size"] = block_size

    def forward(q, k, v):
        return attend(q, k, v, **kwargs)

    def loss(q, k, v):
        return jnp.sum(jnp.square(forward(q, k, v).astype(jnp.float32)))

    return forward, jax.grad(loss, argnums=(0, 1, 2))


def compile_fn(fn, shapes) -> tuple[Any, int, float]:
    """Lowers and compiles `fn` for abstract shapes; returns (compiled, temp bytes, seconds)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*shapes).compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    temp = int(stats.temp_size_in_bytes) if stats is not None else -1
    return compiled, temp, seconds


def time_fn(compiled, inputs, warmup: int, repeats: int) -> tuple[float, dict, Any]:
    """Median wall time in ms of `compiled(*inputs)`.

    Also returns the samples (wall ms, and process CPU ms: all threads' user+system time, which
    is less disturbed than wall time when other jobs share the cores) and the last output.
    """
    out = None
    for _ in range(warmup):
        out = jax.block_until_ready(compiled(*inputs))
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = jax.block_until_ready(compiled(*inputs))
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return statistics.median(wall), {"wall_ms": wall, "cpu_ms": cpu}, out


def add_timing(row: dict, prefix: str, median: float, samples: dict) -> None:
    row[f"{prefix}ms"] = median
    row[f"{prefix}ms_min"] = min(samples["wall_ms"])
    row[f"{prefix}cpu_ms_median"] = statistics.median(samples["cpu_ms"])
    row[f"{prefix}ms_samples"] = samples["wall_ms"]
    row[f"{prefix}cpu_ms_samples"] = samples["cpu_ms"]


def input_shapes(args, n: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Abstract q, k, v `[batch, n, heads, head_dim]`: enough to lower and compile."""
    shape = (args.batch, n, args.heads, args.head_dim)
    return tuple(jax.ShapeDtypeStruct(shape, jnp.dtype(args.dtype)) for _ in range(3))


def make_inputs(args, n: int) -> tuple[jnp.ndarray, ...]:
    """Concrete standard-normal q, k, v (same seed for every impl, so outputs are comparable)."""
    keys = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    return tuple(jax.random.normal(key, s.shape, jnp.float32).astype(s.dtype)
                 for key, s in zip(keys, input_shapes(args, n)))


def bench_one(args, impl: str, n: int, block_size: Optional[int], bias) -> dict:
    """All measurements of one (impl, N, block size) cell."""
    mask = MaskSpec(causal=True, window=args.window)
    shapes = input_shapes(args, n)
    forward, fwd_bwd = make_fns(impl, mask, bias, block_size)
    row: dict[str, Any] = {"impl": impl, "N": n, "window": args.window, "bias": args.bias,
                           "block_size": (block_size or min(default_block_size(mask), n))
                           if impl != "reference" else None}
    compiled, row["temp_bytes"], row["compile_s"] = compile_fn(forward, shapes)
    if args.backward:
        compiled_bwd, row["bwd_temp_bytes"], row["bwd_compile_s"] = compile_fn(fwd_bwd, shapes)

    run_fwd = impl != "reference" or row["temp_bytes"] <= args.max_run_bytes
    run_bwd = args.backward and (impl != "reference" or row["bwd_temp_bytes"] <= args.max_run_bytes)
    row["output"] = None
    if run_fwd or run_bwd:
        inputs = make_inputs(args, n)
    if run_fwd:
        median, samples, out = time_fn(compiled, inputs, args.warmup, args.repeats)
        add_timing(row, "", median, samples)
        row["output"] = out
    else:
        row["ms"] = SKIPPED
    if args.backward:
        if run_bwd:
            median, samples, _ = time_fn(compiled_bwd, inputs, args.warmup, args.repeats)
            add_timing(row, "bwd_", median, samples)
        else:
            row["bwd_ms"] = SKIPPED
    return row


# ----------------------------------------------------------------------------- formatting

def fmt_mib(nbytes) -> str:
    return f"{nbytes / MIB:,.1f}" if isinstance(nbytes, (int, float)) and nbytes >= 0 else "n/a"


def fmt_ms(ms) -> str:
    return f"{ms:,.2f}" if isinstance(ms, float) else str(ms)


def ratio(a, b, fmt: str) -> str:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
        return fmt.format(a / b)
    return "n/a"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def n_sweep_table(args, cells: dict) -> tuple[list[str], list[list[str]]]:
    header = ["N", "reference temp MiB", "xla temp MiB", "memory ratio", "reference ms",
              "xla ms", "speed-up"]
    if args.backward:
        header += ["reference fwd+bwd temp MiB", "xla fwd+bwd temp MiB", "fwd+bwd memory ratio",
                   "reference fwd+bwd ms", "xla fwd+bwd ms", "fwd+bwd speed-up"]
    rows = []
    for n in args.lengths:
        r, x = cells[("reference", n)], cells[("xla", n)]
        row = [str(n), fmt_mib(r["temp_bytes"]), fmt_mib(x["temp_bytes"]),
               ratio(x["temp_bytes"], r["temp_bytes"], "{:.1%}"), fmt_ms(r["ms"]),
               fmt_ms(x["ms"]), ratio(r["ms"], x["ms"], "{:.1f}x")]
        if args.backward:
            row += [fmt_mib(r["bwd_temp_bytes"]), fmt_mib(x["bwd_temp_bytes"]),
                    ratio(x["bwd_temp_bytes"], r["bwd_temp_bytes"], "{:.1%}"),
                    fmt_ms(r["bwd_ms"]), fmt_ms(x["bwd_ms"]),
                    ratio(r["bwd_ms"], x["bwd_ms"], "{:.1f}x")]
        rows.append(row)
    return header, rows


def cpu_n_sweep_table(args, cells: dict) -> tuple[list[str], list[list[str]]]:
    """Process CPU time per call (all threads): the cost view, robust to other jobs on the box."""
    header = ["N", "reference CPU ms", "xla CPU ms", "CPU speed-up"]
    if args.backward:
        header += ["reference fwd+bwd CPU ms", "xla fwd+bwd CPU ms", "fwd+bwd CPU speed-up"]
    rows = []
    for n in args.lengths:
        r, x = cells[("reference", n)], cells[("xla", n)]
        rc, xc = r.get("cpu_ms_median", r["ms"]), x.get("cpu_ms_median", x["ms"])
        row = [str(n), fmt_ms(rc), fmt_ms(xc), ratio(rc, xc, "{:.1f}x")]
        if args.backward:
            rb = r.get("bwd_cpu_ms_median", r["bwd_ms"])
            xb = x.get("bwd_cpu_ms_median", x["bwd_ms"])
            row += [fmt_ms(rb), fmt_ms(xb), ratio(rb, xb, "{:.1f}x")]
        rows.append(row)
    return header, rows


def block_sweep_table(args, ref: dict, cells: list[dict], default_block: int):
    header = ["block", "key span (tokens)", "xla temp MiB", "memory ratio vs reference", "xla ms",
              "speed-up vs reference", "xla CPU ms", "CPU speed-up vs reference"]
    if args.backward:
        header += ["xla fwd+bwd temp MiB", "xla fwd+bwd ms", "fwd+bwd speed-up vs reference",
                   "xla fwd+bwd CPU ms", "fwd+bwd CPU speed-up vs reference"]
    rows = []
    ref_cpu = ref.get("cpu_ms_median", ref["ms"])
    ref_row = ["reference", str(args.sweep_n), fmt_mib(ref["temp_bytes"]), "100.0%",
               fmt_ms(ref["ms"]), "1.0x" if isinstance(ref["ms"], float) else "n/a",
               fmt_ms(ref_cpu), "1.0x" if isinstance(ref_cpu, float) else "n/a"]
    if args.backward:
        ref_bwd_cpu = ref.get("bwd_cpu_ms_median", ref["bwd_ms"])
        ref_row += [fmt_mib(ref["bwd_temp_bytes"]), fmt_ms(ref["bwd_ms"]),
                    "1.0x" if isinstance(ref["bwd_ms"], float) else "n/a", fmt_ms(ref_bwd_cpu),
                    "1.0x" if isinstance(ref_bwd_cpu, float) else "n/a"]
    rows.append(ref_row)
    mask = MaskSpec(causal=True, window=args.window)
    for c in cells:
        blk = c["block_size"]
        before, after = mask.key_blocks_around(blk)
        label = f"{blk}" + (" (current default)" if blk == default_block else "")
        row = [label, str((before + 1 + after) * blk), fmt_mib(c["temp_bytes"]),
               ratio(c["temp_bytes"], ref["temp_bytes"], "{:.1%}"), fmt_ms(c["ms"]),
               ratio(ref["ms"], c["ms"], "{:.1f}x"), fmt_ms(c["cpu_ms_median"]),
               ratio(ref_cpu, c["cpu_ms_median"], "{:.1f}x")]
        if args.backward:
            row += [fmt_mib(c["bwd_temp_bytes"]), fmt_ms(c["bwd_ms"]),
                    ratio(ref["bwd_ms"], c["bwd_ms"], "{:.1f}x"), fmt_ms(c["bwd_cpu_ms_median"]),
                    ratio(ref_bwd_cpu, c["bwd_cpu_ms_median"], "{:.1f}x")]
        rows.append(row)
    return header, rows


def environment() -> dict:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    try:
        import jaxlib
        jaxlib_version = jaxlib.__version__
    except Exception:  # pragma: no cover
        jaxlib_version = None
    return {
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib_version,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "cpu_affinity_count": affinity,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def load_average() -> Optional[list[float]]:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def fmt_load(load: Optional[list[float]]) -> str:
    return f"{load[0]:.2f}" if load else "n/a"


def cpu_pressure() -> Optional[str]:
    """Linux PSI line "some avg10=.. avg60=.. avg300=..": share of time tasks waited for a CPU."""
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().strip()
    except OSError:
        return None


def jsonable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "output"}


# ----------------------------------------------------------------------------- plots

def plot_n_sweep(args, cells: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"reference": ("tab:red", "o"), "xla": ("tab:blue", "s")}
    for impl in IMPLS:
        color, marker = styles[impl]
        for key, ls, label in (("ms", "-", "fwd"), ("bwd_ms", "--", "fwd+bwd"),
                               ("cpu_ms_median", ":", "fwd, CPU time"),
                               ("bwd_cpu_ms_median", "-.", "fwd+bwd, CPU time")):
            if key.startswith("bwd") and not args.backward:
                continue
            pts = [(n, cells[(impl, n)][key]) for n in args.lengths
                   if isinstance(cells[(impl, n)].get(key), float)]
            if pts:
                ax_t.plot(*zip(*pts), ls, color=color, marker=marker, label=f"{impl} {label}")
        for key, ls, label in (("temp_bytes", "-", "fwd"), ("bwd_temp_bytes", "--", "fwd+bwd")):
            if key == "bwd_temp_bytes" and not args.backward:
                continue
            pts = [(n, cells[(impl, n)][key] / MIB) for n in args.lengths
                   if cells[(impl, n)].get(key, -1) > 0]
            if pts:
                ax_m.plot(*zip(*pts), ls, color=color, marker=marker, label=f"{impl} {label}")
    ax_m.axhline(args.max_run_bytes / MIB, color="gray", lw=0.8, ls=":",
                 label="--max_run_bytes")
    for ax, ylabel in ((ax_t, "time [ms] (median)"), (ax_m, "compiled temp memory [MiB]")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_block_sweep(args, ref: dict, cells: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = [c["block_size"] for c in cells]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_t.plot(blocks, [c["ms"] for c in cells], "-s", color="tab:blue", label="xla fwd")
    ax_t.plot(blocks, [c["cpu_ms_median"] for c in cells], ":s", color="tab:blue",
              label="xla fwd, CPU time")
    if args.backward:
        ax_t.plot(blocks, [c["bwd_ms"] for c in cells], "--s", color="tab:blue",
                  label="xla fwd+bwd")
    ax_m.plot(blocks, [c["temp_bytes"] / MIB for c in cells], "-s", color="tab:blue",
              label="xla fwd")
    if args.backward:
        ax_m.plot(blocks, [c["bwd_temp_bytes"] / MIB for c in cells], "--s", color="tab:blue",
                  label="xla fwd+bwd")
    if isinstance(ref["ms"], float):
        ax_t.axhline(ref["ms"], color="tab:red", ls=":", label="reference fwd")
    ax_m.axhline(ref["temp_bytes"] / MIB, color="tab:red", ls=":", label="reference fwd")
    for ax, ylabel in ((ax_t, "time [ms] (median)"), (ax_m, "compiled temp memory [MiB]")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(blocks)
        ax.set_xticklabels([str(b) for b in blocks])
        ax.set_xlabel("xla block size")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def default_tag(args) -> str:
    parts = []
    if args.sweep_block:
        parts.append("sweep_block")
    if args.bias:
        parts.append("bias")
    if args.backward:
        parts.append("backward")
    if args.block_size is not None and not args.sweep_block:
        parts.append(f"block{args.block_size}")
    return "_".join(parts)


def max_abs_diff(a, b) -> Optional[float]:
    if a is None or b is None:
        return None
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    tag = default_tag(args) if args.tag is None else args.tag
    stem = "attention_bench" + (f".{tag}" if tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    bias = make_bias(args)
    mask = MaskSpec(causal=True, window=args.window)
    default_block = default_block_size(mask)
    load_before = load_average()
    pressure_before = cpu_pressure()
    t_start = time.perf_counter()

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    title = (f"causal window w={args.window}, batch={args.batch}, heads={args.heads}, "
             f"head_dim={args.head_dim}, {args.dtype}, bias={'ALiBi' if args.bias else 'none'}")
    records: list[dict] = []

    if args.sweep_block:
        n = args.sweep_n
        log(f"[sweep_block] N={n}: reference")
        ref = bench_one(args, "reference", n, None, bias)
        records.append(ref)
        cells = []
        for blk in args.sweep_blocks:
            log(f"[sweep_block] N={n}: xla block={blk}")
            c = bench_one(args, "xla", n, blk, bias)
            c["max_abs_diff_vs_reference"] = max_abs_diff(c["output"], ref["output"])
            c["output"] = None
            cells.append(c)
            records.append(c)
        header, rows = block_sweep_table(args, ref, cells, default_block)
        extra = []
        title = f"xla block-size sweep at N={n}; " + title
        plot = lambda path: plot_block_sweep(args, ref, cells, path, title)  # noqa: E731
    else:
        cells = {}
        for n in args.lengths:
            for impl in IMPLS:
                log(f"N={n}: {impl}")
                cells[(impl, n)] = bench_one(args, impl, n, args.block_size, bias)
                records.append(cells[(impl, n)])
            cells[("xla", n)]["max_abs_diff_vs_reference"] = max_abs_diff(
                cells[("xla", n)]["output"], cells[("reference", n)]["output"])
            cells[("reference", n)]["output"] = cells[("xla", n)]["output"] = None
            log("   " + ", ".join(
                f"{impl}: temp {fmt_mib(cells[(impl, n)]['temp_bytes'])} MiB, "
                f"{fmt_ms(cells[(impl, n)]['ms'])} ms" for impl in IMPLS))
        header, rows = n_sweep_table(args, cells)
        extra = [("Process CPU time per call (user+system, all threads; median): what a call "
                  "costs in core-milliseconds, less disturbed than wall time by other jobs.",
                  *cpu_n_sweep_table(args, cells))]
        plot = lambda path: plot_n_sweep(args, cells, path, title)  # noqa: E731

    elapsed = time.perf_counter() - t_start
    env = environment()
    table = markdown_table(header, rows)
    md = "\n".join([
        f"# attention_bench{(' — ' + tag) if tag else ''}",
        "",
        f"{title}; xla block size: "
        f"{args.block_size if args.block_size else f'default ({default_block})'}"
        + ("" if not args.sweep_block else " (swept)") + ".",
        f"Times: median of {args.repeats} runs after {args.warmup} warm-up, forward only"
        + (" and forward+backward (grad of sum of squares w.r.t. q, k, v)" if args.backward
           else "") + f". Reference not run above {args.max_run_bytes / GIB:.1f} GiB temp memory.",
        f"jax {env['jax_version']}, backend {env['backend']} ({env['device_kind']}), "
        f"{env['cpu_count']} CPUs; run took {elapsed:.0f} s; "
        f"1-min load average before/after: {fmt_load(load_before)} / {fmt_load(load_average())}; "
        f"CPU pressure before/after: {pressure_before} / {cpu_pressure()}.",
        "",
        table,
        "",
    ] + [line for note, h, r in extra for line in (note, "", markdown_table(h, r), "")])
    print(table)
    for note, h, r in extra:
        print("\n" + markdown_table(h, r))
    (args.out / f"{stem}.md").write_text(md)

    with open(args.out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        # One table: the Markdown columns, then the extra tables' columns (same rows, first
        # column -- N -- not repeated).
        csv_header, csv_rows = list(header), [list(r) for r in rows]
        for _, h, r in extra:
            csv_header += h[1:]
            for row, more in zip(csv_rows, r):
                row += more[1:]
        writer.writerow(csv_header)
        writer.writerows(csv_rows)

    result = {
        "benchmark": "attention_bench",
        "mode": "sweep_block" if args.sweep_block else "lengths",
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": config,
        "default_block_size_for_mask": default_block,
        "environment": env,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "cpu_pressure_before": pressure_before,
        "cpu_pressure_after": cpu_pressure(),
        "elapsed_s": elapsed,
        "table": {"header": header, "rows": rows},
        "extra_tables": [{"note": note, "header": h, "rows": r} for note, h, r in extra],
        "records": [jsonable(r) for r in records],
    }
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")

    if not args.no_plot:
        plot(args.out / f"{stem}.png")
    log(f"wrote {args.out}/{stem}.{{md,csv,json}}" + ("" if args.no_plot else " and .png")
        + f" in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
