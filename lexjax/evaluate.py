"""Evaluate a trained run at several lengths ("train short, test long"):
`python -m lexjax.evaluate --model_dir=D --lengths=128,256,512,1024 [--bca] [--stride=S]
[--mesh=M] [--gin_file=F] [--gin.NAME=VALUE]`.

Prints a table (loss, perplexity, bits per byte, attention resolution per length) and writes
`D/eval/<name>.{md,csv,json,png}` (name: extrapolation, or extrapolation_bca / _stride<S>).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from lexjax import cli


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lengths takes integers like 128,256,512; got {text!r}")
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"--lengths needs positive integers; got {text!r}")
    return lengths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lexjax.evaluate", description=__doc__)
    cli.add_gin_flags(parser)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--lengths", type=_lengths, required=True,
                        help="comma-separated evaluation lengths")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--task", default=None, help="seqio task (default: the training task)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max_tokens", type=int, default=65536,
                        help="tokens evaluated per length (windows = max_tokens // length)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--bca", action="store_true",
                        help="blockwise causal attention at inference, blocks of TRAIN_LENGTH/2")
    parser.add_argument("--stride", type=int, default=None,
                        help="sliding-window protocol: score only the last STRIDE tokens")
    parser.add_argument("--respect_documents", action="store_true",
                        help="windows never cross a document boundary")
    parser.add_argument("--mesh", default="", help="device mesh, e.g. data:2,tensor:4")
    parser.add_argument("--name", default=None, help="output file stem under model_dir/eval")
    args, bindings = cli.parse_args(parser, sys.argv[1:] if argv is None else argv)
    check_settings(args)

    import os

    from lexjax import partitioning
    from lexjax.evaluation import evaluate_lengths, markdown_table, write_report
    from lexjax.runs import configured_run, load_run

    gin_files = list(args.gin_file)
    if args.bca:
        train_length = configured_run(args.model_dir)[1].train_length
        gin_files.append("configs/features/bca.gin")
        bindings.append(f"BCA_BLOCK = {max(1, train_length // 2)}")
    mesh = partitioning.make_mesh(args.mesh) if args.mesh else None
    run = load_run(args.model_dir, args.step, gin_files=gin_files, bindings=bindings, mesh=mesh)
    data = run.config.data
    if args.task:
        data = dataclasses.replace(data, task=args.task)
    name = args.name or ("extrapolation" + ("_bca" if args.bca else "")
                         + (f"_stride{args.stride}" if args.stride else ""))
    print(f"evaluating {type(run.model).__name__} (step {run.step}, trained at length "
          f"{run.train_length}) on {data.task}:{args.split} at lengths {args.lengths}",
          file=sys.stderr)
    results = evaluate_lengths(
        run.model, run.variables, data, args.lengths, max_tokens=args.max_tokens,
        batch_size=args.batch_size, split=args.split, respect_documents=args.respect_documents,
        stride=args.stride, mesh=mesh, rules=run.config.logical_axis_rules,
        progress=lambda r: print(f"  length {r.length}: loss {r.loss:.4f}, ppl "
                                 f"{r.perplexity:.3f}", file=sys.stderr))
    rows = [r.row(run.train_length) for r in results]
    title = f"{os.path.basename(os.path.abspath(args.model_dir))}: {name}"
    print(markdown_table(rows), flush=True)  # before any file is written
    write_report(os.path.join(args.model_dir, "eval"), name, rows, title=title,
                         train_length=run.train_length,
                         extra={"task": data.task, "split": args.split, "step": run.step,
                                "per_position_loss": {r.length: r.per_position_loss
                                                      for r in results}})
    print(f"wrote {os.path.join(args.model_dir, 'eval', name)}.{{md,csv,json,png}}",
          file=sys.stderr)
    return 0


def check_settings(args: argparse.Namespace) -> None:
    """One-line errors for settings the evaluation cannot use, before anything is loaded."""
    from lexjax.errors import ConfigError
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.max_tokens < 1:
        raise ConfigError(f"--max_tokens must be >= 1, got {args.max_tokens}")
    if args.stride is not None and not 0 < args.stride <= min(args.lengths):
        raise ConfigError(f"--stride must be in 1..{min(args.lengths)} (the shortest of "
                          f"--lengths), got {args.stride}")


if __name__ == "__main__":
    cli.run_main(main)
