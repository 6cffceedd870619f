"""Study: the softmax ViT, the linear-attention ViT and the Ripple ViT on the embedded digits.

  .venv/bin/python experiments/vision.py [--steps N] [--out experiments/results/vision]

Part 1, accuracy: each model (`configs/models/vit.gin`, `vit_linear.gin`, `vit_ripple.gin`: the
same sizes, 2-D RoPE, 2x2 patches, so equal parameters up to Ripple's ring weights) is trained by
`python -m lexjax.train --gin_file=configs/runs/vision_quickstart.gin --gin_file=MODEL` for the
same steps and evaluated by `python -m lexjax.evaluate` (test-split accuracy); the table gives
the parameters, the accuracy and the training time per image (median step seconds / batch, the
first logged interval, which compiles, left out).
CIFAR-10 on a machine that can download it (`tfds build cifar10` first): add
`--cifar10`, which trains on `lexjax.cifar10` with 4x4 patches of the 32x32 RGB images.

Part 2, cost as the grid grows: one jitted training step (cross-entropy, its gradient) on
synthetic `[batch, S, S, 1]` images with 1x1 patches, S = 16 .. 128 (256 .. 16,384 tokens), all
cases compiled first and timed in interleaved rounds (the minimum kept); time per token, and the
exponent k of time ~ tokens^k fitted by least squares on log-log (over all sizes, and between the
two largest): softmax attention tends to 2, ripple and linear attention stay near 1.

Writes `--out`/vision.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"softmax ViT": "configs/models/vit.gin",
          "linear-attention ViT": "configs/models/vit_linear.gin",
          "Ripple ViT": "configs/models/vit_ripple.gin"}
# The quickstart's sizes (configs/runs/vision_quickstart.gin), restated: a model gin listed after
# the run gin brings its own size macros.
SIZES = ["--gin.NUM_LAYERS=4", "--gin.EMBED_DIM=128", "--gin.NUM_HEADS=4", "--gin.MLP_DIM=256"]
SCALING_BINDINGS = ["NUM_LAYERS=2", "EMBED_DIM=64", "NUM_HEADS=4", "MLP_DIM=128",
                    "PATCH_SIZE=1", "CHANNELS=1"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="training steps per model")
    parser.add_argument("--grids", default="16,32,64,128", help="image sides S for part 2")
    parser.add_argument("--batch", type=int, default=2, help="images per step in part 2")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds in part 2")
    parser.add_argument("--cifar10", action="store_true",
                        help="train on lexjax.cifar10 (prepared TFDS data) instead")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "vision"))
    return parser.parse_args(argv)


def run(command: list[str]) -> str:
    """Runs a lexjax CLI from the repository root; its stderr on failure."""
    result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True,
                            text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return result.stderr


def data_flags(cifar10: bool) -> list[str]:
    if not cifar10:
        return []
    return ["--gin.MIXTURE_OR_TASK_NAME='lexjax.cifar10'", "--gin.IMAGE_HEIGHT=32",
            "--gin.IMAGE_WIDTH=32", "--gin.CHANNELS=3", "--gin.PATCH_SIZE=4",
            "--gin.TRAIN_LENGTH=64"]


def train_and_evaluate(name: str, gin_file: str, args, work: str) -> dict:
    """One model of part 1: train, evaluate, and read back its figures."""
    model_dir = os.path.join(work, gin_file.rsplit("/", 1)[-1][:-4])
    start = time.perf_counter()
    run(["-m", "lexjax.train", "--gin_file=configs/runs/vision_quickstart.gin",
         f"--gin_file={gin_file}", *SIZES, *data_flags(args.cifar10),
         f"--gin.TRAIN_STEPS={args.steps}",
         f"--gin.CHECKPOINT_EVERY={args.steps}", f"--model_dir={model_dir}"])
    wall = time.perf_counter() - start
    run(["-m", "lexjax.evaluate", f"--model_dir={model_dir}"])
    accuracy = None
    for path in sorted(Path(model_dir, "eval").glob("*.json")):
        rows = json.loads(path.read_text()).get("rows", [])
        accuracy = next((r["accuracy"] for r in rows if "accuracy" in r), accuracy)
    from lexjax.runs import load_run
    from lexjax.training.metrics import read_metrics
    intervals = [r["step_seconds"] for r in read_metrics(model_dir) if "step_seconds" in r]
    step_seconds = statistics.median(intervals[1:] or intervals)  # the first one compiles
    trained = load_run(model_dir)
    params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(trained.variables))
    batch = trained.config.batch_size
    return {"model": name, "gin": gin_file, "params": params, "accuracy": accuracy,
            "train_ms_per_image": 1e3 * step_seconds / batch, "steps": args.steps,
            "train_wall_seconds": wall}


def scaling_cases(grids: list[int], batch: int) -> list[tuple[str, int, object]]:
    """(model name, side, jitted step and its inputs) for every model and grid side."""
    import jax.numpy as jnp
    import optax

    from lexjax.config import build_model
    cases = []
    for name, gin_file in MODELS.items():
        for side in grids:
            model = build_model([str(ROOT / gin_file)], SCALING_BINDINGS + [
                f"IMAGE_HEIGHT={side}", f"IMAGE_WIDTH={side}"])
            images = jax.random.uniform(jax.random.PRNGKey(side), (batch, side, side, 1))
            labels = jnp.arange(batch) % model.num_classes
            params = model.init(jax.random.PRNGKey(0), images)["params"]

            def loss(params, images, labels, model=model):
                logits = model.apply({"params": params}, images)
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

            step = jax.jit(jax.value_and_grad(loss))
            jax.block_until_ready(step(params, images, labels))  # compiled before any timing
            cases.append((name, side, (step, params, images, labels)))
    return cases


def time_cases(cases, rounds: int) -> dict[tuple[str, int], float]:
    """Seconds per step of every case: the minimum over interleaved rounds."""
    best: dict[tuple[str, int], float] = {}
    for _ in range(rounds):
        for name, side, (step, *inputs) in cases:
            start = time.perf_counter()
            jax.block_until_ready(step(*inputs))
            seconds = time.perf_counter() - start
            best[name, side] = min(best.get((name, side), float("inf")), seconds)
    return best


def exponent(tokens: list[int], seconds: list[float]) -> float:
    """k of seconds ~ tokens^k, least squares on log-log."""
    return float(np.polyfit(np.log(tokens), np.log(seconds), 1)[0])


def scaling_rows(args) -> list[dict]:
    grids = [int(s) for s in args.grids.split(",")]
    timings = time_cases(scaling_cases(grids, args.batch), args.rounds)
    rows = []
    for name in MODELS:
        tokens = [side * side for side in grids]
        seconds = [timings[name, side] for side in grids]
        rows.append({"model": name,
                     "us_per_token": {str(side): 1e6 * s / (args.batch * side * side)
                                      for side, s in zip(grids, seconds)},
                     "exponent": exponent(tokens, seconds),
                     "exponent_largest": exponent(tokens[-2:], seconds[-2:])})
    return rows


def markdown(accuracy: list[dict], scaling: list[dict], meta: dict) -> str:
    lines = [f"# ViTs on {meta['data']} ({meta['steps']} steps each)", "",
             "| model | parameters | test accuracy | train ms / image |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['params']:,} | {r['accuracy']:.3f} | "
              f"{r['train_ms_per_image']:.3f} |" for r in accuracy]
    sides = list(scaling[0]["us_per_token"])
    lines += ["", "Training step time per token on synthetic S x S images (1x1 patches, "
              f"batch {meta['batch']}, 2 layers, width 64):", "",
              "| model | " + " | ".join(f"{s}x{s}" for s in sides)
              + " | exponent (all) | exponent (two largest) |",
              "|---" * (len(sides) + 3) + "|"]
    lines += [f"| {r['model']} | " + " | ".join(f"{r['us_per_token'][s]:.2f} us" for s in sides)
              + f" | {r['exponent']:.2f} | {r['exponent_largest']:.2f} |" for r in scaling]
    return "\n".join(lines) + "\n"


def plot(path: Path, scaling: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(6, 4))
    for row in scaling:
        sides = [int(s) for s in row["us_per_token"]]
        axis.plot([s * s for s in sides], list(row["us_per_token"].values()), marker="o",
                  label=f"{row['model']} (k = {row['exponent_largest']:.2f})")
    axis.set(xscale="log", yscale="log", xlabel="tokens (patches) per image",
             ylabel="train step, us per token", title="ViT cost as the grid grows")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        accuracy = [train_and_evaluate(name, gin, args, work) for name, gin in MODELS.items()]
        for row in accuracy:
            print(f"{row['model']}: accuracy {row['accuracy']:.3f}", file=sys.stderr)
    scaling = scaling_rows(args)
    meta = {"data": "lexjax.cifar10" if args.cifar10 else "the embedded digits (lexjax.digits)",
            "steps": args.steps, "batch": args.batch, "rounds": args.rounds,
            "wall_seconds": time.perf_counter() - start}
    (out / "vision.json").write_text(json.dumps(
        {"meta": meta, "accuracy": accuracy, "scaling": scaling}, indent=1))
    (out / "vision.md").write_text(markdown(accuracy, scaling, meta))
    plot(out / "vision.png", scaling)
    print((out / "vision.md").read_text())


if __name__ == "__main__":
    main()
