"""Benchmark: decoding time per token against context length, and incremental decoding against
re-running the forward pass.

Goals it measures: the linear-time models' (FLASH, GSS, Mega, the Block-Recurrent Transformer,
a sliding-window Transformer) time per new token flat, within 1.2x, from 1K to 32K tokens of
context while the full-cache Transformer's grows; incremental decoding at least 5x faster than
re-running the forward pass after a 1K-token prompt.

What it measures
----------------
Each model is `configs/models/<name>.gin` at the sizes of the architecture study
(configs/experiments/extrapolation_models.gin: 4 layers, width 128, 4 heads, a per-model MLP_DIM
that puts every model within 6% of the Transformer's non-embedding parameters), with
`--chunk_size` for the chunked models and `--num_latents` for Perceiver AR; `transformer_window`
is the Transformer with a causal window of `--window` keys (its cache a ring of that many).

For each model and context length L, the prompt (L random tokens) is read into a cache sized
L + `--new_tokens` by `model.prefill` (not timed); then one jitted `lax.scan` feeds
`--new_tokens` tokens through `model.decode_step`:

* decode us/token -- that scan's wall time / new tokens (minimum over `--rounds` interleaved
                     rounds; cpu = median process CPU time, all threads);
* xL=first        -- over the same figure at the smallest L (flat: <= 1.2);
* cache MiB       -- the decoding state's size;
* re-forward      -- at the lengths in `--reforward_lengths`: one forward pass over L tokens
                     (what producing one token costs without a cache) and its ratio to the
                     decode time per token;
* generate x64    -- at the same lengths: `lexjax.generate` of 64 tokens after an L-token prompt
                     (prefill included) against 64 forward passes over L + 64 tokens.

Outputs: `--out`/decode_bench.{md,csv,json,png} (the png: decode us/token against L).

  .venv/bin/python experiments/decode_bench.py
  .venv/bin/python experiments/decode_bench.py --models transformer,gss --lengths 1024,8192
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import lexjax
from lexjax.attention import MaskSpec
from records import plot_per_token, run_meta, write_records

# Per model: (config name, size bindings beyond the shared ones): the study's parameter matching.
MODELS = {
    "transformer": ("transformer", []),
    "transformer_window": ("transformer", []),
    "flash": ("flash", ["MLP_DIM=416"]),
    "gss": ("gss", []),
    "mega": ("mega", ["MLP_DIM=128"]),
    "block_recurrent": ("block_recurrent", ["MLP_DIM=384"]),
    "perceiver_ar": ("perceiver_ar", []),
}
GENERATED = 64  # new tokens of the generate-vs-forwards comparison


def parse_list(text: str, kind=int) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=lambda t: parse_list(t, str), default=list(MODELS),
                   help=f"comma-separated, from {sorted(MODELS)}")
    p.add_argument("--lengths", type=parse_list, default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--reforward_lengths", type=parse_list, default=[1024])
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--chunk_size", type=int, default=256)
    p.add_argument("--num_latents", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--tag", default="", help="suffix of the output files")
    args = p.parse_args(argv)
    unknown = set(args.models) - set(MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; use some of {sorted(MODELS)}")
    return args


def build(args, label: str):
    name, extra = MODELS[label]
    bindings = ["NUM_LAYERS=4", "EMBED_DIM=128", "NUM_HEADS=4", "MLP_DIM=512",
                f"CHUNK_SIZE={args.chunk_size}", f"NUM_LATENTS={args.num_latents}", *extra]
    model = lexjax.build_model([f"configs/models/{name}.gin"], bindings)
    if label == "transformer_window":
        model = model.clone(mask=MaskSpec(causal=True, window=args.window))
    return model


def non_embedding_params(variables) -> int:
    leaves = jax.tree_util.tree_leaves_with_path(variables["params"])
    return sum(int(np.prod(x.shape)) for path, x in leaves
               if "token_embedding" not in jax.tree_util.keystr(path))


def tree_mib(tree) -> float:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)) / 2 ** 20


class Case:
    """One (model, L): a prefilled cache and the compiled decode scan; timing samples."""

    def __init__(self, args, label: str, model, variables, n: int):
        self.label, self.n, self.new = label, n, args.new_tokens
        rng = np.random.default_rng(args.seed)
        prompt = jnp.asarray(rng.integers(1, model.vocab_size, (1, n)), jnp.int32)
        self.tokens = jnp.asarray(rng.integers(1, model.vocab_size, (self.new, 1)), jnp.int32)
        self.variables = variables
        prefill = jax.jit(lambda v, p: model.prefill(v, p, max_length=n + self.new)[1])
        start = time.perf_counter()
        self.cache = jax.block_until_ready(prefill(variables, prompt))
        self.prefill_s = time.perf_counter() - start
        self.cache_mib = tree_mib(self.cache)

        def decode(variables, cache, tokens):
            def step(cache, token):
                logits, cache = model.decode_step(variables, cache, token)
                return cache, logits[:, 0]
            return jax.lax.scan(step, cache, tokens)[1]

        self.decode = jax.jit(decode).lower(variables, self.cache, self.tokens).compile()
        self.samples = {"wall": [], "cpu": []}
        self.extra: dict = {}  # the re-forward comparison's samples, where it is measured
        self.timed_extras: dict = {}
        if n in args.reforward_lengths:
            self.add_reforward(model, prompt, rng)
        self.run_once()  # warm-up, dropped from the statistics

    def add_reforward(self, model, prompt, rng) -> None:
        """The forward pass over the prompt, and generate x64 against 64 forward passes."""
        forward = jax.jit(lambda v, t: model.apply(v, t)[:, -1])
        longer = jnp.asarray(rng.integers(1, model.vocab_size, (1, self.n + GENERATED)),
                             jnp.int32)
        for tokens in (prompt, longer):
            jax.block_until_ready(forward(self.variables, tokens))
        lexjax.generate(model, self.variables, prompt, GENERATED).block_until_ready()
        self.timed_extras = {
            "reforward_s": lambda: forward(self.variables, prompt),
            "forward_longer_s": lambda: forward(self.variables, longer),
            "generate_s": lambda: lexjax.generate(model, self.variables, prompt, GENERATED),
        }

    def run_once(self) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(self.decode(self.variables, self.cache, self.tokens))
        self.samples["wall"].append(time.perf_counter() - t0)
        self.samples["cpu"].append(time.process_time() - c0)
        for key, fn in self.timed_extras.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            self.extra.setdefault(key, []).append(time.perf_counter() - t0)

    def row(self) -> dict:
        wall, cpu = self.samples["wall"][1:], self.samples["cpu"][1:]
        out = {"model": self.label, "L": self.n, "decode_us_per_token": min(wall) * 1e6 / self.new,
               "decode_cpu_us_per_token": statistics.median(cpu) * 1e6 / self.new,
               "cache_mib": self.cache_mib, "prefill_s": self.prefill_s,
               "decode_wall_samples_s": wall}
        if self.extra:
            best = {key: min(samples[1:]) for key, samples in self.extra.items()}
            out["reforward_us"] = best["reforward_s"] * 1e6
            out["reforward_vs_decode"] = out["reforward_us"] / out["decode_us_per_token"]
            out["generate64_s"] = best["generate_s"]
            out["forwards64_s"] = GENERATED * best["forward_longer_s"]
            out["generate64_speedup"] = out["forwards64_s"] / out["generate64_s"]
        return out


def measure(args) -> list[dict]:
    cases, params = [], {}
    for label in args.models:
        model = build(args, label)
        variables = jax.jit(model.init)(jax.random.PRNGKey(args.seed),
                                        jnp.ones((1, 8), jnp.int32))
        params[label] = non_embedding_params(variables)
        for n in args.lengths:
            print(f"prefilling {label} L={n}", flush=True)
            cases.append(Case(args, label, model, variables, n))
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        for case in cases:
            case.run_once()
    rows = [case.row() for case in cases]
    for label in args.models:
        mine = [row for row in rows if row["model"] == label]
        for row in mine:
            row["params"] = params[label]
            row["decode_ratio"] = row["decode_us_per_token"] / mine[0]["decode_us_per_token"]
            row["decode_cpu_ratio"] = (row["decode_cpu_us_per_token"]
                                       / mine[0]["decode_cpu_us_per_token"])
    return rows


def markdown(args, rows: list[dict], meta: dict) -> str:
    header = ["model", "non-emb. params", "L", "decode us/token", "×L=first", "cpu us/token",
              "×L=first (cpu)", "cache MiB", "re-forward us", "re-forward / decode",
              f"generate {GENERATED} s", f"{GENERATED} forwards s", "speed-up"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["model"], f"{row['params']:,}", str(row["L"]),
                 f"{row['decode_us_per_token']:.0f}", f"{row['decode_ratio']:.2f}",
                 f"{row['decode_cpu_us_per_token']:.0f}", f"{row['decode_cpu_ratio']:.2f}",
                 f"{row['cache_mib']:.2f}"]
        if "reforward_us" in row:
            cells += [f"{row['reforward_us']:.0f}", f"{row['reforward_vs_decode']:.1f}×",
                      f"{row['generate64_s']:.3f}", f"{row['forwards64_s']:.3f}",
                      f"{row['generate64_speedup']:.1f}×"]
        else:
            cells += ["-"] * 5
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([
        f"# Decoding time per token vs context length (CPU): {', '.join(args.models)}", "",
        f"Models: 4 layers, EMBED_DIM 128, NUM_HEADS 4, per-model MLP_DIM (the architecture "
        f"study's), CHUNK_SIZE {args.chunk_size}, NUM_LATENTS {args.num_latents}, window "
        f"{args.window} (transformer_window); batch 1. Decode: {args.new_tokens} tokens after an "
        f"L-token prompt, one jitted scan of decode_step; minimum wall time over {args.rounds} "
        "interleaved rounds; cpu = median process CPU time (all threads). Re-forward: one forward "
        f"pass over L tokens. Speed-up: {GENERATED} forward passes over L + {GENERATED} tokens "
        f"over lexjax.generate of {GENERATED} tokens (prefill included).", "",
        f"Machine: {meta['machine']}; load average before {meta['load_before']}, after "
        f"{meta['load_after']}; {meta['date']}.", "",
        *lines, ""])


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    load_before = os.getloadavg()
    rows = measure(args)
    meta = run_meta(args, load_before)
    stem = args.out / ("decode_bench" + (f".{args.tag}" if args.tag else ""))
    text = markdown(args, rows, meta)
    write_records(stem, text, rows, meta)
    plot_per_token(rows, args.models, Path(f"{stem}.png"), x="L", y="decode_us_per_token",
                   xlabel="context length L (tokens)",
                   ylabel="decode, us per new token (min wall)")
    print(text)

if __name__ == "__main__":
    main()
