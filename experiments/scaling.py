"""Benchmark: time per token of any models at N = 1K ... 32K on CPU.

Goals it measures: the training step per token at 8K within 1.3x of the 1K figure (the
linear-time models: gss, mega, spade, flash, perceiver_ar, the Block-Recurrent Transformer), and a
model's speed against a reference model at each N (`--reference`; e.g. FLASH against the
Transformer, the paper's "3x at 8K", or the Block-Recurrent Transformer against Transformer-XL
with a 2048-token window, the paper's "about 2x").

What it measures
----------------
Each model spec is `name`, `name[MACRO=VALUE,...]` and optionally `@MAX`:
`configs/models/<name>.gin` with the size macros given here (default NUM_LAYERS=2,
EMBED_DIM=256, NUM_HEADS=4, MLP_DIM=1024, CHUNK_SIZE=256, NUM_LATENTS=256, bytes vocabulary), then
the spec's own bindings (e.g. `transformer_xl[CHUNK_SIZE=2048]`); `@MAX` times it only up to
N = MAX (a quadratic model for contrast, e.g. `transformer@4096`). For each N, on `[--batch, N]`
random tokens:

* train us/token -- one jitted training step (the LM loss of `lexjax.losses`, its
                    gradient, an AdamW update) / (batch * N);
* fwd us/token   -- the forward pass alone / (batch * N);
* cpu            -- process CPU time (user + system, all threads) per call / tokens: the
                    core-seconds a call costs, far less sensitive to other jobs than wall time on
                    a shared machine;
* xN=first       -- the per-token figure over the same figure at the smallest N (the goal is
                    <= 1.3 at 8K);
* GFLOP/step     -- 3 x `flops_per_token(N)` x tokens (forward FLOPs incl. the FFT estimate, x3
                    for training);
* temp MiB       -- the compiled training step's scratch memory (XLA's `memory_analysis()`,
                    arguments and outputs excluded);
* x reference    -- with `--reference SPEC`: the train wall (and cpu) time per token over the
                    reference's at the same N (< 1: faster than the reference).

All (model, N) cases are compiled first, then timed in `--rounds` interleaved rounds (each case
once per round), so a burst of load from other jobs hits every case alike; tables keep the
minimum wall time and the median CPU time.

Outputs go to `--out` (default experiments/results/) as scaling[.TAG].{md,csv,json,png} (the png:
train us/token against N, one line per model).

Examples
--------
  .venv/bin/python experiments/scaling.py --tag ssm
  .venv/bin/python experiments/scaling.py --models gss,mega --lengths 1024,8192 --rounds 3
  .venv/bin/python experiments/scaling.py --tag flash --models "flash,flash_quad@4096,transformer" \
      --reference transformer
  .venv/bin/python experiments/scaling.py --tag perceiver_ar --num_layers 4 \
      --lengths 1024,2048,4096,8192,16384,32768 --models "perceiver_ar,transformer@4096"
  .venv/bin/python experiments/scaling.py --tag block_recurrent --chunk_size 512 \
      --models "block_recurrent,transformer_xl,transformer_xl[CHUNK_SIZE=2048]" \
      --reference "transformer_xl[CHUNK_SIZE=2048]"
"""
from __future__ import annotations

import argparse
import os
import re
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
from lexjax.losses import shift_right, token_losses
from records import plot_per_token, run_meta, write_records

MODELS = ("gss", "gss_transformer", "mega", "spade")


def parse_list(text: str, kind=int) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=split_specs, default=list(MODELS),
                   help="comma-separated model specs: name or name[MACRO=VALUE,...] "
                        "(configs/models/<name>.gin plus bindings)")
    p.add_argument("--reference", default=None,
                   help="a model spec (one of --models) the others are compared with at each N")
    p.add_argument("--lengths", type=parse_list, default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--num_layers", type=int, default=2)
    p.add_argument("--embed_dim", type=int, default=256)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--mlp_dim", type=int, default=1024)
    p.add_argument("--chunk_size", type=int, default=256)
    p.add_argument("--num_latents", type=int, default=256)
    p.add_argument("--vocab_size", type=int, default=384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--tag", default="", help="suffix of the output files")
    return p.parse_args(argv)


SPEC = re.compile(r"^(?P<name>[\w]+)(?:\[(?P<bindings>[^\]]*)\])?(?:@(?P<max>\d+))?$")


def split_specs(text: str) -> list[str]:
    """Splits "a,b[X=1,Y=2],c" at the commas outside brackets."""
    return [s.strip() for s in re.split(r",(?![^\[]*\])", text) if s.strip()]


def parse_spec(spec: str) -> tuple[str, list[str], Optional[int]]:
    """`name[MACRO=VALUE,...]@MAX` -> (config name, bindings, largest N or None)."""
    match = SPEC.match(spec)
    if not match:
        raise SystemExit(f"bad model spec {spec!r}: use name, name[MACRO=VALUE,...], "
                         "optionally followed by @MAX_LENGTH")
    extra = match["bindings"] or ""
    longest = int(match["max"]) if match["max"] else None
    return match["name"], [b.strip() for b in extra.split(",") if b.strip()], longest


def build(args, spec: str):
    name, extra, _ = parse_spec(spec)
    bindings = [f"NUM_LAYERS={args.num_layers}", f"EMBED_DIM={args.embed_dim}",
                f"NUM_HEADS={args.num_heads}", f"MLP_DIM={args.mlp_dim}",
                f"CHUNK_SIZE={args.chunk_size}", f"NUM_LATENTS={args.num_latents}",
                f"VOCAB_SIZE={args.vocab_size}", *extra]
    return lexjax.build_model([f"configs/models/{name}.gin"], bindings)


class Case:
    """One (model, N): its compiled training step and forward, and their timing samples."""

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
        memory = self.train.memory_analysis()
        self.temp_mib = memory.temp_size_in_bytes / 2 ** 20 if memory is not None else None
        self.samples = {kind: {"wall": [], "cpu": []} for kind in ("train", "fwd")}
        self.run_once()  # warm-up, dropped from the statistics

    def _timed(self, kind: str, fn: Callable[[], object]) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        self.samples[kind]["wall"].append(time.perf_counter() - t0)
        self.samples[kind]["cpu"].append(time.process_time() - c0)

    def run_once(self) -> None:
        """One training step and one forward (outputs discarded: every call sees the same
        parameters)."""
        self._timed("train", lambda: self.train(self.params, self.opt_state, self.tokens))
        self._timed("fwd", lambda: self.forward(self.params, self.tokens))

    def row(self) -> dict:
        out = {"model": self.name, "N": self.n, "compile_s": self.compile_s,
               "temp_mib": self.temp_mib,
               "gflop_per_step": 3 * self.model.flops_per_token(self.n) * self.tokens_count / 1e9}
        for kind, samples in self.samples.items():
            wall, cpu = samples["wall"][1:], samples["cpu"][1:]
            out[f"{kind}_ms_min"] = min(wall) * 1e3
            out[f"{kind}_us_per_token"] = min(wall) * 1e6 / self.tokens_count
            out[f"{kind}_cpu_us_per_token"] = statistics.median(cpu) * 1e6 / self.tokens_count
            out[f"{kind}_wall_samples_s"] = wall
            out[f"{kind}_cpu_samples_s"] = cpu
        return out


def measure(args) -> list[dict]:
    cases = []
    for name in args.models:
        model = build(args, name)
        longest = parse_spec(name)[2]
        for n in args.lengths:
            if longest is not None and n > longest:
                continue
            print(f"compiling {name} N={n}", flush=True)
            cases.append(Case(args, name, model, n))
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        for case in cases:
            case.run_once()
    rows = [case.row() for case in cases]
    for name in args.models:
        mine = [row for row in rows if row["model"] == name]
        for row in mine:
            for key in ("train_us_per_token", "train_cpu_us_per_token", "fwd_us_per_token",
                        "fwd_cpu_us_per_token"):
                row[key.replace("per_token", "ratio")] = row[key] / mine[0][key]
    if args.reference:
        reference = {row["N"]: row for row in rows if row["model"] == args.reference}
        for row in rows:
            ref = reference.get(row["N"])
            if ref is None:  # the reference was not timed at this N
                continue
            row["train_vs_reference"] = row["train_us_per_token"] / ref["train_us_per_token"]
            row["train_cpu_vs_reference"] = (row["train_cpu_us_per_token"]
                                             / ref["train_cpu_us_per_token"])
    return rows


def markdown(args, rows: list[dict], meta: dict) -> str:
    header = ["model", "N", "train us/token", "×N=first", "train cpu us/token", "×N=first (cpu)",
              "fwd us/token", "×N=first", "GFLOP/step", "temp MiB"]
    if args.reference:
        header += [f"× {args.reference}", "× ref (cpu)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["model"], str(row["N"]), f"{row['train_us_per_token']:.1f}",
                 f"{row['train_us_ratio']:.2f}", f"{row['train_cpu_us_per_token']:.1f}",
                 f"{row['train_cpu_us_ratio']:.2f}", f"{row['fwd_us_per_token']:.1f}",
                 f"{row['fwd_us_ratio']:.2f}", f"{row['gflop_per_step']:.2f}",
                 "-" if row["temp_mib"] is None else f"{row['temp_mib']:.1f}"]
        if args.reference:
            cells += [f"{row[key]:.2f}" if key in row else "-"
                      for key in ("train_vs_reference", "train_cpu_vs_reference")]
        lines.append("| " + " | ".join(cells) + " |")
    size = (f"NUM_LAYERS={args.num_layers}, EMBED_DIM={args.embed_dim}, "
            f"NUM_HEADS={args.num_heads}, MLP_DIM={args.mlp_dim}, CHUNK_SIZE={args.chunk_size}, "
            f"NUM_LATENTS={args.num_latents}, VOCAB_SIZE={args.vocab_size}, batch {args.batch}")
    return "\n".join([
        f"# Time per token vs length (CPU): {', '.join(args.models)}", "",
        f"Models: configs/models/<model>.gin with {size}. Minimum wall time over {args.rounds} "
        "interleaved rounds; cpu = median process CPU time (all threads). Training step = LM "
        "loss + gradient + AdamW.", "",
        f"Machine: {meta['machine']}; load average before {meta['load_before']}, after "
        f"{meta['load_after']}; {meta['date']}.", "",
        *lines, ""])


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.reference and args.reference not in args.models:
        raise SystemExit(f"--reference {args.reference!r} must be one of --models")
    load_before = os.getloadavg()
    rows = measure(args)
    meta = run_meta(args, load_before)
    stem = args.out / ("scaling" + (f".{args.tag}" if args.tag else ""))
    text = markdown(args, rows, meta)
    write_records(stem, text, rows, meta)
    plot_per_token(rows, args.models, Path(f"{stem}.png"), x="N", y="train_us_per_token",
                   xlabel="sequence length N (tokens)",
                   ylabel="training step, us per token (min wall)")
    print(text)

if __name__ == "__main__":
    main()
