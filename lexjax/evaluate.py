"""Evaluate a trained run at several lengths ("train short, test long"):
`python -m lexjax.evaluate --model_dir=D --lengths=128,256,512,1024 [--bca | --window]
[--stride=S] [--mesh=M] [--gin_file=F] [--gin.NAME=VALUE] [--distributed ...]`.

By the run's objective:
- causal LM: loss, perplexity, bits per byte, attention resolution per length
  (`D/eval/extrapolation[_bca|_window][_stride<S>]`);
- masked LM: masked-token loss and accuracy per length (`D/eval/masked_lm`);
- classification: accuracy (F1, Matthews where the task defines them) and the majority baseline,
  at the training length unless --lengths says otherwise (`D/eval/classification`).
Prints the table and writes `D/eval/<name>.{md,csv,json,png}`. Multi-host (`--distributed`, the
flags of `python -m lexjax.train`): every process scores the same rows over the global mesh;
process 0 prints and writes the report.
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
    parser.add_argument("--lengths", type=_lengths, default=None,
                        help="comma-separated evaluation lengths (a classifier: default its "
                             "training length)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--task", default=None, help="seqio task (default: the training task)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max_tokens", type=int, default=65536,
                        help="tokens evaluated per length (windows = max_tokens // length)")
    parser.add_argument("--max_examples", type=int, default=None,
                        help="a classifier: examples evaluated per length (default: all)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--bca", action="store_true",
                        help="blockwise causal attention at inference, blocks of TRAIN_LENGTH/2")
    parser.add_argument("--window", action="store_true",
                        help="sliding-window attention at inference over the TRAIN_LENGTH most "
                             "recent tokens (a receptive field no larger than in training)")
    parser.add_argument("--stride", type=int, default=None,
                        help="sliding-window protocol: score only the last STRIDE tokens")
    parser.add_argument("--respect_documents", action="store_true",
                        help="windows never cross a document boundary")
    parser.add_argument("--mesh", default="", help="device mesh, e.g. data:2,tensor:4")
    parser.add_argument("--name", default=None, help="output file stem under model_dir/eval")
    cli.add_distributed_flags(parser)
    args, bindings = cli.parse_args(parser, sys.argv[1:] if argv is None else argv)
    check_settings(args)
    cli.join_distributed(args)

    from lexjax import partitioning
    from lexjax.evaluation import evaluate_lengths, markdown_table, write_report
    from lexjax.evaluation.classify import evaluate_classifier
    from lexjax.evaluation.masked import evaluate_masked_lengths
    from lexjax.evaluation.report import CLASSIFICATION_COLUMNS, COLUMNS, MASKED_COLUMNS
    from lexjax.paths import run_path
    from lexjax.runs import configured_run, load_run

    gin_files = list(args.gin_file)
    if args.bca or args.window:
        train_length = configured_run(args.model_dir)[1].train_length
        if args.bca:
            gin_files.append("configs/features/bca.gin")
            bindings.append(f"BCA_BLOCK = {max(1, train_length // 2)}")
        else:
            gin_files.append("configs/features/inference_window.gin")
            bindings.append(f"INFERENCE_WINDOW = {train_length}")
    mesh = partitioning.make_mesh(args.mesh) if args.mesh else None
    run = load_run(args.model_dir, args.step, gin_files=gin_files, bindings=bindings, mesh=mesh)
    check_inference_mask(args, run.model)
    data = run.config.data
    if args.task:
        data = dataclasses.replace(data, task=args.task)
    objective = run.config.objective.prepare(run.model, data)
    check_objective_settings(args, objective.name)
    lengths = args.lengths or [run.train_length]
    primary = partitioning.is_primary_process()
    say = (lambda text: print(text, file=sys.stderr)) if primary else (lambda text: None)
    say(f"evaluating {type(run.model).__name__} ({objective.name}, step {run.step}, trained "
        f"at length {run.train_length}) on {data.task}:{args.split} at lengths {lengths}")
    common = dict(train_length=run.train_length, batch_size=args.batch_size, split=args.split,
                  mesh=mesh, rules=run.config.logical_axis_rules,
                  progress=lambda row: say("  " + ", ".join(
                      f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in row.items())))
    extra = {"task": data.task, "split": args.split, "step": run.step,
             "objective": objective.name}
    if objective.name == "masked_lm":
        name, columns, plotted = args.name or "masked_lm", MASKED_COLUMNS, "masked_loss"
        rows = evaluate_masked_lengths(run.model, run.variables, objective, data, lengths,
                                       max_tokens=args.max_tokens, seed=run.config.seed,
                                       **common)
    elif objective.name == "classification":
        name, columns, plotted = args.name or "classification", CLASSIFICATION_COLUMNS, \
            "accuracy"
        rows = evaluate_classifier(run.model, run.variables, objective, data, lengths,
                                   max_examples=args.max_examples, **common)
    else:
        name = args.name or ("extrapolation" + ("_bca" if args.bca else "")
                             + ("_window" if args.window else "")
                             + (f"_stride{args.stride}" if args.stride else ""))
        columns, plotted = COLUMNS, "perplexity"
        common.pop("train_length")
        common["progress"] = lambda r: say(f"  length {r.length}: loss {r.loss:.4f}, ppl "
                                           f"{r.perplexity:.3f}")
        results = evaluate_lengths(
            run.model, run.variables, data, lengths, max_tokens=args.max_tokens,
            respect_documents=args.respect_documents, stride=args.stride, **common)
        rows = [r.row(run.train_length) for r in results]
        extra["per_position_loss"] = {r.length: r.per_position_loss for r in results}
    if not primary:
        return 0
    directory = run_path(args.model_dir) / "eval"  # model_dir: a local path or a URI
    title = f"{directory.parent.name}: {name}"
    print(markdown_table(rows, columns), flush=True)  # before any file is written
    write_report(directory, name, rows, title=title,
                 train_length=run.train_length, extra=extra, columns=columns, plotted=plotted)
    print(f"wrote {directory / name}.{{md,csv,json,png}}", file=sys.stderr)
    return 0


def check_inference_mask(args: argparse.Namespace, model) -> None:
    """One line if --bca / --window did not reach the model: their gins bind
    `lexjax.models.Transformer.inference_mask`, which other models do not read."""
    from lexjax.errors import ConfigError
    flag = "--bca" if args.bca else "--window" if args.window else None
    if flag and getattr(model, "inference_mask", None) is None:
        raise ConfigError(f"{flag} sets lexjax.models.Transformer.inference_mask; this run's model "
                          f"is {type(model).__name__}, which has no inference mask to set")


def check_objective_settings(args: argparse.Namespace, objective: str) -> None:
    """One-line errors for flags the run's objective cannot use."""
    from lexjax.errors import ConfigError
    if objective != "causal_lm":
        for flag in ("bca", "window", "stride", "respect_documents"):
            if getattr(args, flag):
                raise ConfigError(f"--{flag} is for causal LMs; this run's objective is "
                                  f"{objective}")
    if objective != "classification" and args.lengths is None:
        raise ConfigError(f"--lengths is required for a {objective} run, e.g. "
                          "--lengths=128,256,512")


def check_settings(args: argparse.Namespace) -> None:
    """One-line errors for settings the evaluation cannot use, before anything is loaded."""
    from lexjax.errors import ConfigError
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.max_examples is not None and args.max_examples < 1:
        raise ConfigError(f"--max_examples must be >= 1, got {args.max_examples}")
    if args.max_tokens < 1:
        raise ConfigError(f"--max_tokens must be >= 1, got {args.max_tokens}")
    if args.bca and args.window:
        raise ConfigError("--bca and --window are two inference masks: pass one of them")
    if args.stride is not None and args.lengths and not 0 < args.stride <= min(args.lengths):
        raise ConfigError(f"--stride must be in 1..{min(args.lengths)} (the shortest of "
                          f"--lengths), got {args.stride}")


if __name__ == "__main__":
    cli.run_main(main)
