"""Benchmark: FLASH vs FLASH-Quad vs the Transformer (full causal attention), training-step time
per token at N = 1K ... 16K (issue 6, Hua et al. 2022).

What it measures
----------------
Each model is built from its gin file with the same size macros (`--num_layers`, `--embed_dim`,
`--num_heads`, `--mlp_dim`, `--chunk_size`), so the three have about the same parameters: FLASH
and FLASH-Quad stack 2 × NUM_LAYERS gated attention units of expansion MLP_DIM / 2, the
Transformer NUM_LAYERS blocks of attention + MLP (`configs/models/*.gin`). For each N one jitted
training step runs on a batch `[--batch, N]` of random tokens: the LM loss of
`lexjax.training.losses` (shift right, cross entropy), its gradient and an AdamW update.

* step ms     -- median wall time of `--repeats` steps after compilation and `--warmup` steps.
* us/token    -- the *minimum* wall time of a step / (batch · N): the least disturbed sample
                 when other jobs share the cores.
* cpu us/token -- median process CPU time (user + system over all threads) per step / tokens:
                 core-seconds, less sensitive to other jobs than wall time.
* ×N=1024     -- us/token at N over the same model's us/token at the smallest N
                 (goal for FLASH at 8K: <= 1.3).
* vs transformer -- Transformer step time / model step time at the same N
                 (goal for FLASH at 8K: >= 3).
* temp MiB    -- the compiled step's scratch memory (XLA's `memory_analysis()`, arguments and
                 outputs excluded): linear in N for FLASH.
* GFLOP/step  -- 3 × the model's own `flops_per_token(N)` × tokens (forward matmul FLOPs; the
                 Transformer counts causal attention as half the keys, although its blocked XLA
                 attention computes the masked half too).

`--max_quadratic_length` skips the two quadratic models beyond that N (the table says so).

Outputs go to `--out` (default experiments/results/) as flash_bench[.TAG].{md,csv,json,png}.

Example
-------
  .venv/bin/python experiments/flash_bench.py
  .venv/bin/python experiments/flash_bench.py --lengths 1024,8192 --models flash,transformer
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lexjax
from lexjax.training.losses import shift_right, token_losses

CONFIGS = {"flash": "configs/models/flash.gin", "flash_quad": "configs/models/flash_quad.gin",
           "transformer": "configs/models/transformer.gin"}
QUADRATIC = ("flash_quad", "transformer")
SKIPPED = "skipped"


def parse_list(text: str, kind=int) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=lambda t: parse_list(t, str),
                   default=["flash", "flash_quad", "transformer"])
    p.add_argument("--lengths", type=parse_list, default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--num_layers", type=int, default=2)
    p.add_argument("--embed_dim", type=int, default=128)
    p.add_argument("--num_heads", type=int, default=2)
    p.add_argument("--mlp_dim", type=int, default=512)
    p.add_argument("--chunk_size", type=int, default=256)
    p.add_argument("--vocab_size", type=int, default=384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max_quadratic_length", type=int, default=None,
                   help="skip FLASH-Quad and the Transformer beyond this N")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--tag", default="", help="file name tag: flash_bench.TAG.*")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_plot", action="store_true")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- measurement

def build(args, name: str):
    bindings = [f"NUM_LAYERS={args.num_layers}", f"EMBED_DIM={args.embed_dim}",
                f"NUM_HEADS={args.num_heads}", f"MLP_DIM={args.mlp_dim}",
                f"CHUNK_SIZE={args.chunk_size}", f"VOCAB_SIZE={args.vocab_size}"]
    return lexjax.build_model([CONFIGS[name]], bindings)


def make_step(model, optimizer):
    """One training step: (params, opt_state, tokens) -> (params, opt_state, loss)."""
    def loss_fn(params, tokens):
        logits = model.apply({"params": params}, shift_right(tokens), deterministic=True)
        return jnp.mean(token_losses(logits, tokens))

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def bench_one(args, name: str, model, n: int) -> dict:
    rng = np.random.default_rng(args.seed)
    tokens = jnp.asarray(rng.integers(1, args.vocab_size, (args.batch, n)), jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(args.seed), tokens[:, :8])["params"])
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(params)
    step = make_step(model, optimizer)

    start = time.perf_counter()
    compiled = step.lower(params, opt_state, tokens).compile()
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    for _ in range(args.warmup):
        params, opt_state, loss = jax.block_until_ready(compiled(params, opt_state, tokens))
    wall, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        params, opt_state, loss = jax.block_until_ready(compiled(params, opt_state, tokens))
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    count = args.batch * n
    return {
        "model": name, "N": n, "batch": args.batch, "compile_s": compile_s,
        "step_ms": statistics.median(wall), "step_ms_min": min(wall),
        "us_per_token": min(wall) * 1e3 / count,
        "cpu_us_per_token": statistics.median(cpu) * 1e3 / count,
        "gflop_per_step": 3 * model.flops_per_token(n) * count / 1e9,
        "temp_mib": stats.temp_size_in_bytes / 2 ** 20 if stats is not None else None,
        "loss": float(loss), "wall_ms_samples": wall, "cpu_ms_samples": cpu,
        "parameters": int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
    }


# ----------------------------------------------------------------------------- reporting

def derived(cells: dict, models: list[str], lengths: list[int]) -> None:
    """Adds per-token ratios to the smallest N and speed-ups over the Transformer, in place."""
    for name in models:
        base = cells.get((name, lengths[0]))
        for n in lengths:
            row = cells.get((name, n))
            if row is None:
                continue
            if base is not None:
                row["ratio_to_first"] = row["us_per_token"] / base["us_per_token"]
                row["cpu_ratio_to_first"] = row["cpu_us_per_token"] / base["cpu_us_per_token"]
            ref = cells.get(("transformer", n))
            if ref is not None:
                row["speedup_vs_transformer"] = ref["step_ms_min"] / row["step_ms_min"]
                row["cpu_speedup_vs_transformer"] = (ref["cpu_us_per_token"]
                                                     / row["cpu_us_per_token"])


def markdown(args, cells: dict, models: list[str], lengths: list[int], meta: dict) -> str:
    header = ["N"]
    for name in models:
        header += [f"{name} us/token", f"{name} ×N={lengths[0]}"]
        if name != "transformer" and "transformer" in models:
            header.append(f"{name} vs transformer")
    rows = []
    for n in lengths:
        row = [str(n)]
        for name in models:
            cell = cells.get((name, n))
            if cell is None:
                row += [SKIPPED, ""] + ([""] if name != "transformer" and "transformer" in models
                                       else [])
                continue
            row += [f"{cell['us_per_token']:.1f} (cpu {cell['cpu_us_per_token']:.1f})",
                    f"{cell.get('ratio_to_first', float('nan')):.2f} "
                    f"(cpu {cell.get('cpu_ratio_to_first', float('nan')):.2f})"]
            if name != "transformer" and "transformer" in models:
                speed = cell.get("speedup_vs_transformer")
                row.append(f"{speed:.2f}× (cpu {cell['cpu_speedup_vs_transformer']:.2f}×)"
                           if speed is not None else "")
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    gflops = ["| model | params | quantity | " + " | ".join(f"N={n}" for n in lengths) + " |",
              "|---|---|---|" + "---|" * len(lengths)]
    for name in models:
        some = next((cells[(name, n)] for n in lengths if (name, n) in cells), None)
        if some is None:
            continue
        for key, label, fmt in (("gflop_per_step", "GFLOP/step", "{:.2f}"),
                                ("temp_mib", "temp MiB", "{:.0f}")):
            vals = [fmt.format(cells[(name, n)][key]) if (name, n) in cells else SKIPPED
                    for n in lengths]
            gflops.append(f"| {name} | {some['parameters']:,} | {label} | " + " | ".join(vals)
                          + " |")
    size = (f"NUM_LAYERS={args.num_layers}, EMBED_DIM={args.embed_dim}, "
            f"NUM_HEADS={args.num_heads}, MLP_DIM={args.mlp_dim}, CHUNK_SIZE={args.chunk_size}, "
            f"VOCAB_SIZE={args.vocab_size}, batch {args.batch}")
    return "\n".join([
        "# FLASH vs FLASH-Quad vs Transformer: training step time per token",
        "",
        f"{size}; {meta['device']}; load average before/after {meta['load_before']} / "
        f"{meta['load_after']}; {meta['date']}.",
        "us/token = fastest of the timed steps / tokens (cpu = median process CPU time / "
        "tokens); ×N=... = us/token over the model's own at the smallest N; vs transformer = "
        "Transformer step time / model step time (cpu: the same ratios of CPU time).",
        "", *lines, "", "Forward+backward model FLOPs (3 × flops_per_token × tokens) and the "
        "compiled step's temporary memory:", "",
        *gflops, ""])


def plot(cells: dict, models: list[str], lengths: list[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in models:
        ns = [n for n in lengths if (name, n) in cells]
        ax.plot(ns, [cells[(name, n)]["us_per_token"] for n in ns], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("training step time per token (us)")
    ax.set_title("FLASH vs FLASH-Quad vs Transformer")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    unknown = [m for m in args.models if m not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; choose from {sorted(CONFIGS)}")
    meta: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()},"
                  f" {os.cpu_count()} cores)",
        "jax": jax.__version__, "load_before": [round(x, 2) for x in os.getloadavg()],
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    cells: dict[tuple[str, int], dict] = {}
    for name in args.models:
        model = build(args, name)
        for n in args.lengths:
            if (name in QUADRATIC and args.max_quadratic_length
                    and n > args.max_quadratic_length):
                continue
            cells[(name, n)] = row = bench_one(args, name, model, n)
            print(f"{name:12s} N={n:6d}  {row['us_per_token']:8.1f} us/token  "
                  f"(cpu {row['cpu_us_per_token']:8.1f})  step {row['step_ms']:9.1f} ms  "
                  f"compile {row['compile_s']:.1f} s", flush=True)
    meta["load_after"] = [round(x, 2) for x in os.getloadavg()]
    derived(cells, args.models, args.lengths)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("flash_bench" + (f".{args.tag}" if args.tag else ""))
    text = markdown(args, cells, args.models, args.lengths, meta)
    stem.with_suffix(stem.suffix + ".md").write_text(text)
    rows = list(cells.values())
    with open(stem.with_suffix(stem.suffix + ".json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    scalar = [k for k in rows[0] if not k.endswith("samples")] if rows else []
    scalar += [k for k in ("ratio_to_first", "cpu_ratio_to_first", "speedup_vs_transformer",
                           "cpu_speedup_vs_transformer") if k not in scalar]
    with open(stem.with_suffix(stem.suffix + ".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=scalar, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if not args.no_plot:
        plot(cells, args.models, args.lengths, stem.with_suffix(stem.suffix + ".png"))
    print(text)


if __name__ == "__main__":
    main()
