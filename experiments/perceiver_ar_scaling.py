"""Benchmark: Perceiver AR time per *input* token at N = 1K ... 32K with a fixed number of latents
(issue 9; goal: training step per token at 8K within 1.3x of the 1K figure).

What it measures
----------------
The model is `configs/models/perceiver_ar.gin` with the size macros given here (default
NUM_LAYERS=4, EMBED_DIM=256, NUM_HEADS=4, MLP_DIM=1024, NUM_LATENTS=256, bytes vocabulary). For
each N, on a batch `[--batch, N]` of random tokens:

* train us/token -- one jitted training step (LM loss of `lexjax.training.losses` on the last
                    NUM_LATENTS targets, its gradient, an AdamW update) / (batch * N);
* fwd us/token   -- the forward pass alone (logits) / (batch * N);
* cpu            -- process CPU time (user + system, all threads) per call / tokens: the
                    core-seconds a call costs, less sensitive to other jobs than wall time;
* xN=first       -- the per-token figure over the same figure at the smallest N;
* GFLOP/step     -- 3 x `flops_per_token(N)` x tokens (forward matmul FLOPs, x3 for training).

All lengths are compiled first, then timed in `--rounds` interleaved rounds (every length once per
round), so a burst of load from other jobs hits all lengths alike; the table keeps the minimum wall
time and the median CPU time of each. With `--transformer_max N` the Transformer of the same size
(configs/models/transformer.gin) is timed too, up to that N, for contrast.

Outputs go to `--out` (default experiments/results/) as perceiver_ar_scaling[.TAG].{md,csv,json};
`--render RUN.json` rewrites them from an earlier run without measuring.

Example
-------
  .venv/bin/python experiments/perceiver_ar_scaling.py
  .venv/bin/python experiments/perceiver_ar_scaling.py --lengths 1024,8192 --transformer_max 8192
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
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lexjax
from lexjax.training.losses import shift_right, token_losses

CONFIGS = {"perceiver_ar": "configs/models/perceiver_ar.gin",
           "transformer": "configs/models/transformer.gin"}


def parse_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=parse_list, default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--num_latents", type=int, default=256)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--embed_dim", type=int, default=256)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--mlp_dim", type=int, default=1024)
    p.add_argument("--vocab_size", type=int, default=384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--transformer_max", type=int, default=0,
                   help="also time the Transformer of the same size up to this N (0: never)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--tag", default="", help="file name tag: perceiver_ar_scaling.TAG.*")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--render", type=Path, default=None,
                   help="only rewrite the tables from this earlier run's JSON")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- measurement

def build(args, name: str):
    bindings = [f"NUM_LAYERS={args.num_layers}", f"EMBED_DIM={args.embed_dim}",
                f"NUM_HEADS={args.num_heads}", f"MLP_DIM={args.mlp_dim}",
                f"VOCAB_SIZE={args.vocab_size}", f"NUM_LATENTS={args.num_latents}"]
    return lexjax.build_model([CONFIGS[name]], bindings)


class Case:
    """One (model, N): compiled forward and training step, and their timing samples."""

    def __init__(self, args, name: str, model, n: int):
        self.name, self.model, self.n, self.tokens_count = name, model, n, args.batch * n
        rng = np.random.default_rng(args.seed)
        self.tokens = jnp.asarray(rng.integers(1, args.vocab_size, (args.batch, n)), jnp.int32)
        self.params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(args.seed),
                                                   self.tokens[:, :8])["params"])
        optimizer = optax.adamw(1e-4)
        self.opt_state = optimizer.init(self.params)

        def loss_fn(params, tokens):
            logits = model.apply({"params": params}, shift_right(tokens), deterministic=True)
            return jnp.mean(token_losses(logits, tokens))

        def train_step(params, opt_state, tokens):
            loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        def forward(params, tokens):
            return model.apply({"params": params}, tokens)

        start = time.perf_counter()
        self.train = jax.jit(train_step).lower(self.params, self.opt_state, self.tokens).compile()
        self.forward = jax.jit(forward).lower(self.params, self.tokens).compile()
        self.compile_s = time.perf_counter() - start
        self.samples: dict[str, dict[str, list[float]]] = {
            kind: {"wall": [], "cpu": []} for kind in ("train", "fwd")}
        self.run_once()  # warm-up

    def _timed(self, kind: str, fn: Callable[[], object]) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        self.samples[kind]["wall"].append(time.perf_counter() - t0)
        self.samples[kind]["cpu"].append(time.process_time() - c0)

    def run_once(self) -> None:
        # The step's outputs are discarded, so every call sees the same parameters.
        self._timed("train", lambda: self.train(self.params, self.opt_state, self.tokens))
        self._timed("fwd", lambda: self.forward(self.params, self.tokens))

    def row(self) -> dict:
        out = {"model": self.name, "N": self.n, "compile_s": self.compile_s,
               "gflop_per_step": 3 * self.model.flops_per_token(self.n) * self.tokens_count / 1e9}
        for kind, samples in self.samples.items():
            warm = {k: v[1:] for k, v in samples.items()}  # drop the warm-up call
            out[f"{kind}_ms_min"] = min(warm["wall"]) * 1e3
            out[f"{kind}_us_per_token"] = min(warm["wall"]) * 1e6 / self.tokens_count
            out[f"{kind}_cpu_us_per_token"] = (statistics.median(warm["cpu"]) * 1e6
                                               / self.tokens_count)
            out[f"{kind}_wall_samples_s"] = warm["wall"]
            out[f"{kind}_cpu_samples_s"] = warm["cpu"]
        return out


def measure(args) -> list[dict]:
    cases = []
    for name in ("perceiver_ar", "transformer"):
        lengths = [n for n in args.lengths
                   if name == "perceiver_ar" or n <= args.transformer_max]
        if not lengths:
            continue
        model = build(args, name)
        for n in lengths:
            print(f"compiling {name} N={n}", flush=True)
            cases.append(Case(args, name, model, n))
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        for case in cases:
            case.run_once()
    rows = [case.row() for case in cases]
    for name in {row["model"] for row in rows}:
        mine = [row for row in rows if row["model"] == name]
        for row in mine:
            for key in ("train_us_per_token", "train_cpu_us_per_token", "fwd_us_per_token",
                        "fwd_cpu_us_per_token"):
                row[key.replace("per_token", "ratio")] = row[key] / mine[0][key]
    return rows


# ----------------------------------------------------------------------------- reporting

def markdown(args, rows: list[dict], meta: dict) -> str:
    header = ["model", "N", "train cpu us/token", "×N=first", "train wall us/token", "×N=first",
              "fwd cpu us/token", "×N=first", "fwd wall us/token", "×N=first", "GFLOP/step",
              "GFLOP per cpu-s (train)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        per_cpu_second = row["gflop_per_step"] / (row["train_cpu_us_per_token"] * row["N"]
                                                   * args.batch / 1e6)
        lines.append("| " + " | ".join([
            row["model"], str(row["N"]),
            f"{row['train_cpu_us_per_token']:.1f}", f"{row['train_cpu_us_ratio']:.2f}",
            f"{row['train_us_per_token']:.1f}", f"{row['train_us_ratio']:.2f}",
            f"{row['fwd_cpu_us_per_token']:.2f}", f"{row['fwd_cpu_us_ratio']:.2f}",
            f"{row['fwd_us_per_token']:.2f}", f"{row['fwd_us_ratio']:.2f}",
            f"{row['gflop_per_step']:.2f}", f"{per_cpu_second:.1f}"]) + " |")
    size = (f"NUM_LAYERS={args.num_layers}, EMBED_DIM={args.embed_dim}, "
            f"NUM_HEADS={args.num_heads}, MLP_DIM={args.mlp_dim}, "
            f"NUM_LATENTS={args.num_latents}, VOCAB_SIZE={args.vocab_size}, batch {args.batch}")
    return "\n".join([
        "# Perceiver AR: time per input token vs context length (CPU)", "",
        f"Model: {size}. Training step = loss on the last NUM_LATENTS targets + gradient + AdamW. "
        f"cpu = median process CPU time (all threads) per call over {args.rounds} interleaved "
        "rounds; wall = minimum wall time. Under load from other jobs the wall figures are "
        "unreliable (the process waits for a core); the CPU figures are not.", "",
        f"Machine: {meta['machine']}; load average before {meta['load_before']}, after "
        f"{meta['load_after']}; {meta['date']}.", "",
        *lines, ""])


def write(args, rows: list[dict], meta: dict) -> str:
    """Writes perceiver_ar_scaling[.TAG].{md,json,csv} under args.out; returns the markdown."""
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("perceiver_ar_scaling" + (f".{args.tag}" if args.tag else ""))
    text = markdown(args, rows, meta)
    stem.with_suffix(stem.suffix + ".md").write_text(text)
    stem.with_suffix(stem.suffix + ".json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                                  indent=1))
    scalar = [k for k, v in rows[0].items() if not isinstance(v, list)]
    with open(stem.with_suffix(stem.suffix + ".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=scalar, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return text


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.render:  # re-render the tables of an earlier run (its own options)
        saved = json.loads(args.render.read_text())
        run_args = argparse.Namespace(**{**saved["meta"]["argv"], "out": args.out,
                                         "tag": args.tag})
        print(write(run_args, saved["rows"], saved["meta"]))
        return
    load_before = os.getloadavg()
    rows = measure(args)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"jax {jax.__version__} on {jax.devices()[0].platform}",
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "argv": {k: v for k, v in vars(args).items() if k not in ("out", "render")}}
    print(write(args, rows, meta))


if __name__ == "__main__":
    main()
