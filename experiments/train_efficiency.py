"""Benchmark: training-step efficiency (MFU) of the quickstart model on this machine's CPU.

What it measures
----------------
For the quickstart model (configs/runs/quickstart.gin: 4 layers, EMBED_DIM 256, 4 heads, MLP_DIM
1024, byte vocabulary padded to 384, xPos) and a few variants (batch 16 vs 32, TRAIN_LENGTH 128 vs
256, attention_impl xla vs reference, scan_layers on/off, bfloat16 compute, a wider model), it
builds the train step exactly as the trainer does (`lexjax.training.step.ShardedTrainStep` of the
run gin's model and TrainConfig: optimizer, mesh and shardings, jit with the state donated), runs
`--warmup` steps, then times `--steps` steps one by one (each ending in `block_until_ready`) and
reports the median:

* MFU = analytic model FLOPs per step (`Transformer.flops_per_token`, x3 for training, causal
  attention halved; lexjax.training.flops) / median step time / peak, where peak is the float32
  matmul rate measured in the same process (`flops.measured_matmul_peak`, a chain of 1024^2
  matmuls), measured before and after each variant (the mean is used, both are recorded);
* MFU (paired): `--rounds` rounds of `--steps_per_round` steps, each between two peak
  measurements, each round's MFU against the mean of its two peaks, median over rounds
  (`paired_mfu`). The matmul rate of a shared VM drifts by +-20% within a minute; a peak taken
  only before and after a variant leaves that drift in the ratio, pairing cancels most of it;
* XLA's FLOP count of the compiled step (`flops.xla_flops`, all HLO ops: the masked half of the
  causal attention, softmax/norm/elementwise work and the AdamW update included) and the
  utilisation it implies;
* tokens/s, compile time;
* MFU (CPU time): the same ratio with both rates taken in process CPU seconds (all threads)
  instead of wall seconds. Other processes on the machine take wall time from this one but not
  its CPU time, so this number holds steady on a shared machine (samples vary by ~2% under a
  load average of 15 on 2 cores, against +-50% for wall-clock MFU); it does not see idle cores
  (see "cores busy" = CPU time / wall time).

Then, for the baseline, where the time goes:

* the forward alone, forward+backward alone (`value_and_grad` of the same loss), the optimizer
  update alone (clip + AdamW + apply_updates on given gradients), each jitted separately and
  timed the same way;
* a `jax.profiler` trace of a few steps, summarised per HLO op (the thunks XLA:CPU runs), each op
  classified as matmul (its fusion contains a dot/convolution) or not, with the share of the step
  it takes;
* a probe of the MLP block alone (forward+backward) with gelu (tanh), gelu (erf), relu and no
  activation, in FLOPs per CPU-second: what the activation's backward costs next to the matmuls;
* the same baseline step under other XLA flags / thread settings, each in a child process
  (XLA_FLAGS must be set before JAX starts): `--flag_variants` (default: a set of XLA:CPU flags,
  see FLAG_VARIANTS).

Timings are taken on a 2-core VM that other jobs may share: the JSON keeps every sample (wall and
CPU) and the load average before and after each variant. On a quiet machine read the wall-clock
MFU (the trainer's definition); on a busy one read MFU (CPU time).

Usage
-----
  .venv/bin/python experiments/train_efficiency.py                 # everything (~10 min)
  .venv/bin/python experiments/train_efficiency.py --variants base,batch32 --no_profile \
      --flag_variants none
  .venv/bin/python experiments/train_efficiency.py \
      --render experiments/results/train_efficiency.json --notes NOTES.md  # + a "Reading" part
Outputs: experiments/results/train_efficiency.{md,json} (`--out` to change).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a TPU/GPU plugin in the venv must not interfere
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_FILE = os.path.join(REPO, "configs", "runs", "quickstart.gin")
RESULTS = os.path.join(REPO, "experiments", "results")

# name -> (description, gin bindings on top of quickstart.gin)
VARIANTS = {
    "base": ("quickstart: B=16, L=128, float32, attention xla, no scan", []),
    "batch32": ("BATCH_SIZE=32", ["BATCH_SIZE=32"]),
    "len256": ("TRAIN_LENGTH=256", ["TRAIN_LENGTH=256"]),
    "reference_attn": ("attention_impl='reference'",
                       ["lexjax.models.Transformer.attention_impl='reference'"]),
    "scan": ("scan_layers=True", ["lexjax.models.Transformer.scan_layers=True"]),
    "bf16": ("DTYPE='bfloat16' (compute; params f32)", ["DTYPE='bfloat16'"]),
    "remat_full": ("remat_policy='full'", ["lexjax.models.Transformer.remat_policy='full'"]),
    "wide_b32": ("EMBED_DIM=512, MLP_DIM=2048, 8 heads, BATCH_SIZE=32",
                 ["EMBED_DIM=512", "MLP_DIM=2048", "NUM_HEADS=8", "BATCH_SIZE=32"]),
    "wide_b32_bf16": ("wide_b32 with DTYPE='bfloat16'",
                      ["EMBED_DIM=512", "MLP_DIM=2048", "NUM_HEADS=8", "BATCH_SIZE=32",
                       "DTYPE='bfloat16'"]),
}
DEFAULT_VARIANTS = "base,batch32,len256,reference_attn,scan,bf16,wide_b32,wide_b32_bf16"

# name -> (XLA_FLAGS added for a child process running the baseline, extra command prefix)
FLAG_VARIANTS = {
    "default": ("", []),
    "eigen_single_thread": ("--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
                            []),
    "one_core_taskset": ("", ["taskset", "-c", "0"]),
    "onednn": ("--xla_cpu_use_onednn=true", []),
    "no_xnnpack": ("--xla_cpu_use_xnnpack=false", []),
    "fast_math": ("--xla_cpu_enable_fast_math=true", []),
}
DEFAULT_FLAG_VARIANTS = "default,eigen_single_thread,one_core_taskset,onednn,no_xnnpack,fast_math"


def loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------
# Building the step the way the trainer does
# ----------------------------------------------------------------------------------------------

def build(bindings):
    """`(sharded, state, batch, key)` for quickstart.gin + bindings: the trainer's own
    `ShardedTrainStep` of the run's model and TrainConfig, its initial state and a batch of
    random byte tokens (one document per row)."""
    import jax
    import numpy as np

    from lexjax import partitioning
    from lexjax.config import parse_gin
    from lexjax.runs import configured_training
    from lexjax.training.step import ShardedTrainStep

    parse_gin([GIN_FILE], bindings)
    model, config = configured_training()
    sharded = ShardedTrainStep(model, config, partitioning.make_mesh(config.mesh))
    state = sharded.init(config.seed)
    rng = np.random.default_rng(0)
    shape = (config.batch_size, config.train_length)
    batch = sharded.device_batch({"targets": rng.integers(3, 259, size=shape, dtype=np.int32),
                                  "segment_ids": np.ones(shape, np.int32)})
    return sharded, state, batch, jax.random.PRNGKey(0)


def time_calls(fn, warmup, steps, cpu=None):
    """Runs `fn()` (which blocks) `warmup` times, then returns the `steps` timed wall durations;
    if `cpu` is a list, the process CPU time (all threads) of each call is appended to it."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        samples.append(time.perf_counter() - start)
        if cpu is not None:
            cpu.append(time.process_time() - start_cpu)
    return samples


def matmul_rate_per_cpu_second(size=1024, repeats=8):
    """The same matmul chain as `flops.measured_matmul_peak` (`flops.matmul_chain`), timed in
    process CPU seconds (all threads): FLOPs per CPU-second. Unlike the wall-clock peak it barely
    moves when other processes compete for the cores (they take wall time, not this process's
    CPU time)."""
    from lexjax.training import flops as flops_lib

    run, flops = flops_lib.matmul_chain(size, repeats)
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return flops / best


def paired_mfu(step, flops_per_step, rounds, steps_per_round):
    """MFU measured in `rounds` short rounds, each timing `steps_per_round` steps between two
    measurements of the matmul peak: a round's MFU = flops / its median step / the mean of the
    peaks around it. The machine's speed drifts (a shared VM's matmul rate here moves by +-20%
    within a minute); pairing each step timing with the peak of the same moment cancels the
    drift that a peak taken only at the start and end of a variant leaves in. Returns the
    per-round MFUs."""
    from lexjax.training import flops as flops_lib

    mfus = []
    peak_before = flops_lib.measured_matmul_peak()
    for _ in range(rounds):
        samples = time_calls(step, 0, steps_per_round)
        peak_after = flops_lib.measured_matmul_peak()
        mfus.append(flops_per_step / statistics.median(samples) / ((peak_before + peak_after) / 2))
        peak_before = peak_after
    return mfus


def measure_variant(name, bindings, args):
    import jax

    from lexjax.training import flops as flops_lib
    from lexjax.training.state import parameter_count

    record = {"variant": name, "bindings": bindings, "loadavg_before": loadavg()}
    peak_before = flops_lib.measured_matmul_peak()
    cpu_rate_before = matmul_rate_per_cpu_second()
    cpu_samples = []
    sharded, state, tokens, key = build(bindings)
    compiled, compile_seconds = sharded.compile()
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], tokens, key)
        jax.block_until_ready((holder["state"], metrics))

    samples = time_calls(step, args.warmup, args.steps, cpu=cpu_samples)
    analytic = flops_lib.training_flops_per_step(sharded.model, sharded.config.batch_size,
                                                 sharded.config.train_length)
    paired = (paired_mfu(step, analytic, args.rounds, args.steps_per_round)
              if analytic and args.rounds else [])
    peak_after = flops_lib.measured_matmul_peak()
    cpu_rate = (cpu_rate_before + matmul_rate_per_cpu_second()) / 2
    model, spec = sharded.model, sharded.config
    xla = flops_lib.xla_flops(compiled)
    peak = (peak_before + peak_after) / 2
    median, best = statistics.median(samples), min(samples)
    record.update(
        batch=spec.batch_size, length=spec.train_length, dtype=model.dtype,
        attention_impl=model.attention_impl, scan_layers=model.scan_layers,
        remat_policy=model.remat_policy, embed_dim=model.embed_dim, mlp_dim=model.mlp_dim,
        num_layers=model.num_layers, num_heads=model.num_heads,
        params=parameter_count(holder["state"].params), compile_seconds=compile_seconds,
        step_seconds=samples, median_step_seconds=median, best_step_seconds=best,
        analytic_flops_per_step=analytic, xla_flops_per_step=xla,
        xla_over_analytic=(xla / analytic) if xla else None,
        peak_flops_before=peak_before, peak_flops_after=peak_after, peak_flops=peak,
        mfu=analytic / median / peak, mfu_best=analytic / best / peak,
        mfu_paired_rounds=paired, mfu_paired=statistics.median(paired) if paired else None,
        xla_flops_utilisation=(xla / median / peak) if xla else None,
        step_cpu_seconds=cpu_samples, median_step_cpu_seconds=statistics.median(cpu_samples),
        matmul_flops_per_cpu_second=cpu_rate,
        mfu_cpu_time=analytic / statistics.median(cpu_samples) / cpu_rate,
        cpu_busy=statistics.median(cpu_samples) / median / (os.cpu_count() or 1),
        tokens_per_sec=spec.batch_size * spec.train_length / median,
        loadavg_after=loadavg())
    return record


# ----------------------------------------------------------------------------------------------
# Breakdown: forward, forward+backward, optimizer
# ----------------------------------------------------------------------------------------------

def breakdown(args):
    import jax
    import jax.numpy as jnp
    import optax

    from lexjax.losses import mean_loss, shift_right
    from lexjax.training import flops as flops_lib

    sharded, state, tokens, key = build([])
    model, optimizer = sharded.model, sharded.optimizer

    def loss_fn(params, batch, rng):  # as in lexjax.training.step.make_train_step
        targets, segments = batch["targets"], batch["segment_ids"]
        logits = model.apply({"params": params}, shift_right(targets, segments),
                             segment_ids=segments, deterministic=False, rngs={"dropout": rng})
        return mean_loss(logits, targets, segments)

    forward = jax.jit(loss_fn)
    forward_backward = jax.jit(jax.value_and_grad(loss_fn))

    def update(grads, opt_state, params):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    update_jit = jax.jit(update, donate_argnums=(1, 2))
    compiled_step, _ = sharded.compile()

    params, opt_state = state.params, state.opt_state
    _, grads = forward_backward(params, tokens, key)
    holder = {"params": jax.tree_util.tree_map(jnp.copy, params),
              "opt_state": jax.tree_util.tree_map(jnp.copy, opt_state), "state": state}

    def run_update():
        holder["params"], holder["opt_state"] = update_jit(grads, holder["opt_state"],
                                                           holder["params"])
        jax.block_until_ready(holder["params"])

    def run_step():
        holder["state"], metrics = compiled_step(holder["state"], tokens, key)
        jax.block_until_ready((holder["state"], metrics))

    parts = {
        "forward": lambda: jax.block_until_ready(forward(params, tokens, key)),
        "forward+backward": lambda: jax.block_until_ready(forward_backward(params, tokens, key)),
        "optimizer update": run_update,
        "full train step": run_step,
    }
    lowered_flops = {
        "forward": flops_lib.xla_flops(forward.lower(params, tokens, key).compile()),
        "forward+backward": flops_lib.xla_flops(
            forward_backward.lower(params, tokens, key).compile()),
        "optimizer update": flops_lib.xla_flops(
            update_jit.lower(grads, opt_state, params).compile()),
        "full train step": flops_lib.xla_flops(compiled_step),
    }
    out = {}
    for name, fn in parts.items():
        samples = time_calls(fn, args.warmup, args.steps)
        out[name] = {"median_seconds": statistics.median(samples), "samples": samples,
                     "xla_flops": lowered_flops[name]}
    analytic_forward = model.flops_per_token(sharded.config.train_length) * \
        sharded.config.batch_size * sharded.config.train_length
    out["forward"]["analytic_flops"] = analytic_forward
    out["forward+backward"]["analytic_flops"] = 3 * analytic_forward
    return out


# ----------------------------------------------------------------------------------------------
# Profile: per-HLO-op time from a jax.profiler trace
# ----------------------------------------------------------------------------------------------

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+(?:\s*\{[^}]*\})?)\s+"
                          r"([\w\-]+)\((.*)$")


def hlo_index(text):
    """{instruction name: (shape, opcode, called computations, line)} and
    {computation name: body text} of an HLO module's text."""
    instructions, computations = {}, {}
    current, body = None, []
    for line in text.splitlines():
        header = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and "=" not in line.split("{")[0]:
            current, body = header.group(1), []
            continue
        if line.strip() == "}" and current:
            computations[current] = "\n".join(body)
            current = None
            continue
        if current:
            body.append(line)
        m = _INSTRUCTION.match(line)
        if m:
            calls = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line)
            instructions[m.group(1)] = (m.group(2), m.group(3), calls, line.strip())
    return instructions, computations


def _is_matmul(name, instructions, computations, seen=None):
    seen = seen if seen is not None else set()
    if name in seen or name not in instructions:
        return False
    seen.add(name)
    _, opcode, calls, _ = instructions[name]
    if opcode in ("dot", "convolution"):
        return True
    for computation in calls:
        body = computations.get(computation, "")
        if re.search(r"\s(dot|convolution)\(", body):
            return True
    return False


def profile(args):
    import jax

    sharded, state, tokens, key = build([])
    compiled, _ = sharded.compile()
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], tokens, key)
        jax.block_until_ready((holder["state"], metrics))

    for _ in range(args.warmup):
        step()
    steps = 3
    trace_dir = tempfile.mkdtemp(prefix="lexjax_trace_")
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - start) / steps
    print(f"  trace (Perfetto / TensorBoard profile): {trace_dir}", file=sys.stderr, flush=True)
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        return {"error": f"no trace written under {trace_dir}"}
    with gzip.open(sorted(files)[-1]) as f:
        events = json.load(f)["traceEvents"]
    instructions, computations = hlo_index(compiled.as_text())
    total = collections.Counter()
    count = collections.Counter()
    threads = collections.defaultdict(set)
    for e in events:
        if e.get("ph") == "X" and e.get("name") in instructions:
            total[e["name"]] += e.get("dur", 0.0) / 1e6
            count[e["name"]] += 1
            threads[e["name"]].add(e.get("tid"))
    op_seconds = sum(total.values()) / steps
    rows = []
    for name, seconds in total.most_common():
        shape, opcode, _, line = instructions[name]
        rows.append({"op": name, "opcode": opcode, "shape": shape[:60],
                     "matmul": _is_matmul(name, instructions, computations),
                     "seconds_per_step": seconds / steps, "calls_per_step": count[name] / steps,
                     "share_of_op_time": seconds / steps / op_seconds if op_seconds else None})
    matmul_seconds = sum(r["seconds_per_step"] for r in rows if r["matmul"])
    kinds = collections.defaultdict(lambda: {"seconds_per_step": 0.0, "ops": 0, "matmul": False})
    for r in rows:  # group by the op's base name: ynn_fusion.93 -> ynn_fusion
        kind = kinds[re.sub(r"\.\d+$", "", r["op"])]
        kind["seconds_per_step"] += r["seconds_per_step"]
        kind["ops"] += 1
        kind["matmul"] = kind["matmul"] or r["matmul"]
    by_kind = sorted(({"kind": k, **v, "share_of_op_time": v["seconds_per_step"] / op_seconds}
                      for k, v in kinds.items()), key=lambda r: -r["seconds_per_step"])
    analytic = sharded.model.flops_per_token(sharded.config.train_length) * 3 * \
        sharded.config.batch_size * sharded.config.train_length
    return {"wall_seconds_per_step_under_trace": wall, "op_seconds_per_step": op_seconds,
            "matmul_op_seconds_per_step": matmul_seconds,
            "matmul_share_of_op_time": matmul_seconds / op_seconds if op_seconds else None,
            "analytic_flops_per_step": analytic,
            "analytic_flops_per_matmul_second": analytic / matmul_seconds if matmul_seconds
            else None,
            "ops_traced": len(rows), "by_kind": by_kind[:args.top_ops],
            "top_ops": rows[:args.top_ops]}


# ----------------------------------------------------------------------------------------------
# Probe: the quickstart MLP block's forward+backward with different activations
# ----------------------------------------------------------------------------------------------

def mlp_probe(args):
    """fwd+bwd of `sum((act(x @ w1) @ w2)^2)` at the quickstart MLP's shapes (x [16, 128, 256],
    w1 [256, 1024], w2 [1024, 256]) for several activations: how much the activation's backward
    (XLA:CPU fuses it with a transposed write of the [2048, 1024] activation gradient) costs
    next to the matmuls. Rates in model FLOPs per CPU-second (process CPU time, all threads)."""
    import jax
    import jax.numpy as jnp

    x = jnp.full((16, 128, 256), 0.01)
    w1, w2 = jnp.full((256, 1024), 0.01), jnp.full((1024, 256), 0.01)
    flops = 3 * 2 * (2 * 16 * 128 * 256 * 1024)  # two matmuls, x3 for forward + backward
    activations = {"gelu (tanh approximation, lexjax's)": lambda h: jax.nn.gelu(h),
                   "gelu (exact, erf)": lambda h: jax.nn.gelu(h, approximate=False),
                   "relu": jax.nn.relu, "identity (no activation)": lambda h: h}
    out = {}
    for name, act in activations.items():
        def loss(w1, w2, x, act=act):
            return jnp.sum(jnp.einsum("blm,me->ble", act(jnp.einsum("ble,em->blm", x, w1)),
                                      w2) ** 2)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        cpu = []
        wall = time_calls(lambda: jax.block_until_ready(grad(w1, w2, x)), args.warmup,
                          max(args.steps, 5), cpu=cpu)
        out[name] = {"median_seconds": statistics.median(wall),
                     "median_cpu_seconds": statistics.median(cpu),
                     "flops_per_cpu_second": flops / statistics.median(cpu)}
    return out


# ----------------------------------------------------------------------------------------------
# XLA flag variants (child processes)
# ----------------------------------------------------------------------------------------------

def flag_variant(name, args):
    flags, prefix = FLAG_VARIANTS[name]
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(x for x in (os.environ.get("XLA_FLAGS", ""), flags) if x)
    cmd = [*prefix, sys.executable, os.path.abspath(__file__), "--child", "base",
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=900)
    if proc.returncode != 0:
        tail = [l for l in proc.stderr.strip().splitlines() if l.strip()][-3:]
        return {"flag_variant": name, "xla_flags": flags, "prefix": prefix,
                "error": " | ".join(tail)[:500]}
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    record.update(flag_variant=name, xla_flags=flags, prefix=prefix)
    return record


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def _g(x, digits=3):
    return "-" if x is None else f"{x:.{digits}g}"


def _load(values):
    return "-" if not values else "/".join(f"{v:.1f}" for v in values)


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(result):
    lines = ["# Training-step efficiency on CPU (quickstart model)", ""]
    m = result["machine"]
    lines += [f"Machine: {m['cpu']} ({m['cpus']} CPUs), jax {m['jax']}, "
              f"XLA_FLAGS='{m['xla_flags']}'. Date {result['date']}. "
              f"Load average at start {_load(m['loadavg_start'])}, at end "
              f"{_load(m['loadavg_end'])} "
              "(above ~2, other jobs shared the 2 cores: wall-clock times then measure the "
              "contention as much as the step; read MFU (CPU time)).", "",
              f"Steps: {result['args']['warmup']} warm-up then {result['args']['steps']} "
              "timed, median reported. Peak = f32 matmul rate measured in the same process "
              "(1024^2 chain, `measured_matmul_peak`), before and after each variant. "
              "MFU (CPU time) = model FLOPs per CPU-second of the step (all threads) / the "
              "matmul chain's FLOPs per CPU-second: insensitive to other processes taking the "
              "cores, but blind to idle cores (a step that keeps one of two cores busy scores "
              "the same as one that keeps both busy); 'cores busy' = step CPU time / step wall "
              "time.", "",
              "MFU (paired) = median over rounds of "
              f"{result['args'].get('steps_per_round', '-')} steps, each round's MFU taken "
              "against the mean of the peaks measured just before and just after it "
              "(`paired_mfu`): the machine's matmul rate drifts by +-20% within a minute here, "
              "and pairing cancels that drift; read it as the step's MFU on a quiet machine.",
              "",
              "| variant | B | L | dtype | attn | scan | params | GFLOP/step (model) | "
              "XLA/model | step ms (median) | tokens/s | peak GFLOP/s | MFU | MFU (paired) | "
              "MFU (best step) | XLA-FLOP util. | MFU (CPU time) | cores busy | compile s |",
              "|" + "---|" * 19]
    for r in result["variants"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error']} |" + " |" * 17)
            continue
        lines.append(
            f"| {r['variant']} | {r['batch']} | {r['length']} | {r['dtype']} | "
            f"{r['attention_impl']} | {r['scan_layers']} | {r['params'] / 1e6:.2f}M | "
            f"{r['analytic_flops_per_step'] / 1e9:.2f} | {_g(r['xla_over_analytic'])} | "
            f"{1e3 * r['median_step_seconds']:.0f} | {r['tokens_per_sec']:.0f} | "
            f"{r['peak_flops'] / 1e9:.0f} | {_pct(r['mfu'])} | {_pct(r.get('mfu_paired'))} | "
            f"{_pct(r['mfu_best'])} | "
            f"{_pct(r['xla_flops_utilisation'])} | {_pct(r.get('mfu_cpu_time'))} | "
            f"{_g(r.get('cpu_busy', 0) * (m['cpus'] or 1), 2)} | {r['compile_seconds']:.1f} |")
    lines.append("")
    if result.get("flag_variants"):
        lines += ["## Baseline under other XLA flags / threads (child processes)", "",
                  "| variant | XLA_FLAGS / prefix | step ms (median) | peak GFLOP/s | MFU | "
                  "MFU vs 2-core default peak | MFU (CPU time) |", "|---|---|---|---|---|---|---|"]
        default = next((r for r in result["flag_variants"]
                        if r.get("flag_variant") == "default" and "error" not in r), None)
        for r in result["flag_variants"]:
            setting = " ".join([r.get("xla_flags") or "", " ".join(r.get("prefix") or [])])
            if "error" in r:
                lines.append(f"| {r['flag_variant']} | `{setting.strip()}` | error: "
                             f"{r['error'][:150]} | | | | |")
                continue
            vs_default = (r["analytic_flops_per_step"] / r["median_step_seconds"]
                          / default["peak_flops"]) if default else None
            lines.append(f"| {r['flag_variant']} | `{setting.strip() or '(none)'}` | "
                         f"{1e3 * r['median_step_seconds']:.0f} | {r['peak_flops'] / 1e9:.0f} | "
                         f"{_pct(r['mfu'])} | {_pct(vs_default)} | "
                         f"{_pct(r.get('mfu_cpu_time'))} |")
        lines.append("")
    b = result.get("breakdown")
    if b:
        full = b["full train step"]["median_seconds"]
        lines += ["## Where the step's time goes (baseline)", "",
                  "| part | median ms | share of full step | XLA GFLOP | model GFLOP | "
                  "model GFLOP/s |", "|---|---|---|---|---|---|"]
        for name, r in b.items():
            model_flops = r.get("analytic_flops")
            lines.append(
                f"| {name} | {1e3 * r['median_seconds']:.0f} | "
                f"{_pct(r['median_seconds'] / full)} | {_g((r['xla_flops'] or 0) / 1e9)} | "
                f"{_g(model_flops / 1e9) if model_flops else '-'} | "
                f"{_g(model_flops / r['median_seconds'] / 1e9) if model_flops else '-'} |")
        lines.append("")
    p = result.get("profile")
    if p and "error" not in p:
        lines += ["## Profile of the baseline step (jax.profiler trace, per HLO op)", "",
                  "Wall time per step under the tracer "
                  f"{1e3 * p['wall_seconds_per_step_under_trace']:.0f} ms; op time summed over "
                  f"threads {1e3 * p['op_seconds_per_step']:.0f} ms per step, of which matmul "
                  f"fusions {_pct(p['matmul_share_of_op_time'])}; model FLOPs per second of "
                  "matmul-op time: "
                  f"{_g(p['analytic_flops_per_matmul_second'] / 1e9)} GFLOP/s.", "",
                  "| op kind (HLO name without .N) | ops | contains a dot | ms/step | "
                  "share of op time |", "|---|---|---|---|---|"]
        for r in p["by_kind"]:
            lines.append(f"| {r['kind']} | {r['ops']} | {'yes' if r['matmul'] else ''} | "
                         f"{1e3 * r['seconds_per_step']:.1f} | {_pct(r['share_of_op_time'])} |")
        lines += ["", "Top single ops:", "",
                  "| op | opcode | shape | matmul | ms/step | calls/step | share of op time |",
                  "|---|---|---|---|---|---|---|"]
        for r in p["top_ops"]:
            lines.append(f"| {r['op']} | {r['opcode']} | `{r['shape']}` | "
                         f"{'yes' if r['matmul'] else ''} | {1e3 * r['seconds_per_step']:.1f} | "
                         f"{r['calls_per_step']:.0f} | {_pct(r['share_of_op_time'])} |")
        lines.append("")
    probe = result.get("mlp_probe")
    if probe:
        lines += ["## Probe: the MLP block (x[16,128,256] @ w1[256,1024] -> act -> @ "
                  "w2[1024,256]), forward+backward", "",
                  "| activation | median ms | CPU ms | GFLOP per CPU-second | vs matmul chain |",
                  "|---|---|---|---|---|"]
        rate = statistics.median([r["matmul_flops_per_cpu_second"] for r in result["variants"]
                                  if "matmul_flops_per_cpu_second" in r] or [float("nan")])
        for name, r in probe.items():
            lines.append(f"| {name} | {1e3 * r['median_seconds']:.0f} | "
                         f"{1e3 * r['median_cpu_seconds']:.0f} | "
                         f"{r['flops_per_cpu_second'] / 1e9:.0f} | "
                         f"{_pct(r['flops_per_cpu_second'] / rate)} |")
        lines.append("")
    if result.get("notes"):
        lines += ["## Reading", "", result["notes"].strip(), ""]
    return "\n".join(lines)


def machine_info():
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "python": platform.python_version(),
            "devices": [str(d) for d in jax.devices()]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated, from {sorted(VARIANTS)}")
    parser.add_argument("--flag_variants", default=DEFAULT_FLAG_VARIANTS,
                        help=f"comma-separated, from {sorted(FLAG_VARIANTS)}, or 'none'")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8,
                        help="paired-MFU rounds per variant (0: skip)")
    parser.add_argument("--steps_per_round", type=int, default=3)
    parser.add_argument("--top_ops", type=int, default=15)
    parser.add_argument("--no_profile", action="store_true")
    parser.add_argument("--no_breakdown", action="store_true")
    parser.add_argument("--notes", default=None, help="a file whose text ends the Markdown")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--no_probe", action="store_true")
    parser.add_argument("--render", default=None,
                        help="re-render the Markdown of an existing JSON (with --notes) and exit")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.render:
        with open(args.render) as f:
            result = json.load(f)
        if args.notes:
            with open(args.notes) as f:
                result["notes"] = f.read()
            with open(args.render, "w") as f:
                json.dump(result, f, indent=1)
        with open(os.path.join(os.path.dirname(os.path.abspath(args.render)),
                               "train_efficiency.md"), "w") as f:
            f.write(markdown(result))
        return

    if args.child:  # one variant, JSON on the last stdout line (used by flag variants)
        record = measure_variant(args.child, VARIANTS[args.child][1], args)
        print(json.dumps(record))
        return

    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "args": vars(args) | {"out": os.path.relpath(args.out)},
              "machine": machine_info()}
    result["machine"]["loadavg_start"] = loadavg()
    result["variants"] = []
    for name in [v for v in args.variants.split(",") if v]:
        description, bindings = VARIANTS[name]
        print(f"[variant] {name}: {description}", file=sys.stderr, flush=True)
        record = measure_variant(name, bindings, args)
        record["description"] = description
        result["variants"].append(record)
        print(f"  median {1e3 * record['median_step_seconds']:.0f} ms, MFU "
              f"{100 * record['mfu']:.1f}% (paired {_pct(record['mfu_paired'])}), peak "
              f"{record['peak_flops'] / 1e9:.0f} GFLOP/s, "
              f"load {record['loadavg_after']}", file=sys.stderr, flush=True)
    if not args.no_breakdown:
        print("[breakdown]", file=sys.stderr, flush=True)
        result["breakdown"] = breakdown(args)
    if not args.no_probe:
        print("[mlp probe]", file=sys.stderr, flush=True)
        result["mlp_probe"] = mlp_probe(args)
    if not args.no_profile:
        print("[profile]", file=sys.stderr, flush=True)
        result["profile"] = profile(args)
    flag_names = [] if args.flag_variants == "none" else \
        [v for v in args.flag_variants.split(",") if v]
    result["flag_variants"] = []
    for name in flag_names:
        print(f"[flags] {name}", file=sys.stderr, flush=True)
        record = flag_variant(name, args)
        result["flag_variants"].append(record)
        print("  " + (record.get("error") or f"median {1e3 * record['median_step_seconds']:.0f}"
                      f" ms, MFU {100 * record['mfu']:.1f}%"), file=sys.stderr, flush=True)
    result["machine"]["loadavg_end"] = loadavg()
    if args.notes:
        with open(args.notes) as f:
            result["notes"] = f.read()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train_efficiency.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "train_efficiency.md"), "w") as f:
        f.write(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
