"""What the encoder studies share: one cell's pipeline (masked-LM pre-training, its evaluation, a
classifier fine-tuned from it, the classifier's evaluation; all through the CLIs, each command
logged to the cell's log) and the readings of finished runs."""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

from commands import binding_flags, run_logged


def split_cell(entries: Sequence[str]) -> tuple[list[str], list[str]]:
    """A cell's entries -> (gin files, bindings)."""
    files = [e for e in entries if e.endswith(".gin")]
    return files, [e for e in entries if not e.endswith(".gin")]


def logged_rows(run_dir: str) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))
            if line.strip()]


def median_seconds_per_token(run_dir: str) -> float:
    """The median over logged intervals (after the first, which holds compilation) of seconds
    per training token."""
    rates = [r["tokens_per_sec"] for r in logged_rows(run_dir) if "tokens_per_sec" in r][1:]
    return 1.0 / statistics.median(rates)


def mean_metric(run_dir: str, name: str) -> float:
    """The mean of a logged training metric over the run (e.g. the padded fraction of rows)."""
    return statistics.mean(r[name] for r in logged_rows(run_dir) if name in r)


def train_length(run_dir: str) -> int:
    from lexjax.runs import configured_run
    return configured_run(run_dir)[1].train_length


def eval_rows(run_dir: str, name: str) -> list[dict]:
    """The rows of `run_dir/eval/<name>.json`."""
    return json.load(open(os.path.join(run_dir, "eval", f"{name}.json")))["rows"]


def pretrain_and_finetune(cell_dir: str, *, pretrain: Sequence[str], finetune: Sequence[str],
                          mlm_eval_tokens: int,
                          mlm_evaluations: Sequence[tuple[str, Sequence[str]]] = ()) -> dict:
    """Runs one cell under `cell_dir` (`mlm/`, `classifier/`, `log.txt`).

    Args:
      pretrain, finetune: the gin files and bindings of the two training runs (files end in
        .gin; the classifier starts `--init_from` the MLM run).
      mlm_eval_tokens: test tokens for the masked-LM evaluation (at the training length).
      mlm_evaluations: more masked-LM evaluations, `(name, bindings)` each (e.g. another
        MASK_RATE), read back as `masked_loss@name`, `masked_accuracy@name`.
    Returns:
      the masked-LM and classification results, the pre-training time per token (measured),
      its padded fraction and wall seconds.
    """
    mlm, classifier = os.path.join(cell_dir, "mlm"), os.path.join(cell_dir, "classifier")
    os.makedirs(cell_dir, exist_ok=True)
    log = os.path.join(cell_dir, "log.txt")

    def train(entries, run_dir, *extra):
        files, bindings = split_cell(entries)
        run_logged([sys.executable, "-m", "lexjax.train", *[f"--gin_file={f}" for f in files],
                    *binding_flags(bindings), *extra, f"--model_dir={run_dir}"], log)

    started = time.time()
    train(pretrain, mlm)
    pretrained = time.time()
    evaluate = [sys.executable, "-m", "lexjax.evaluate", f"--model_dir={mlm}",
                f"--lengths={train_length(mlm)}", f"--max_tokens={mlm_eval_tokens}"]
    run_logged(evaluate, log)
    for name, bindings in mlm_evaluations:
        run_logged([*evaluate, f"--name={name}", *binding_flags(bindings)], log)
    train(finetune, classifier, f"--init_from={mlm}")
    run_logged([sys.executable, "-m", "lexjax.evaluate", f"--model_dir={classifier}"], log)
    masked = eval_rows(mlm, "masked_lm")[0]
    classified = eval_rows(classifier, "classification")[0]
    record = {"masked_loss": masked["masked_loss"], "masked_accuracy": masked["masked_accuracy"],
              "accuracy": classified["accuracy"], "f1": classified.get("f1"),
              "majority_baseline": classified["majority_baseline"],
              "examples": classified["examples"],
              "pretrain_us_per_token": 1e6 * median_seconds_per_token(mlm),
              "pretrain_padding": mean_metric(mlm, "padding"),
              "pretrain_seconds": pretrained - started}
    for name, _ in mlm_evaluations:
        row = eval_rows(mlm, name)[0]
        record[f"masked_loss@{name}"] = row["masked_loss"]
        record[f"masked_accuracy@{name}"] = row["masked_accuracy"]
    return record


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Rows as a Markdown table of `columns` (floats to 4 significant digits)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_matrix(names: Sequence[str], run_cell: Callable[[str], dict],
               build_report: Callable[[dict], str], out: str, only: Optional[str]) -> str:
    """Runs the cells `names` (only `only` when given) one after another, rebuilding the report
    after each; cells finished by an earlier run are read back. Returns the report's table."""
    records = {}
    for name in names:
        if only and name != only:
            continue
        print(f"cell {name} ...", file=sys.stderr, flush=True)
        records[name] = run_cell(name)
        build_report(records)
    for name in names:
        path = os.path.join(out, "cells", name, "record.json")
        if name not in records and os.path.exists(path):
            records[name] = json.load(open(path))
    return build_report(records)


def scatter_panels(rows: Sequence[dict], x: str, x_label: str,
                   panels: Sequence[tuple[str, str]], path: str, title: str = "") -> None:
    """One scatter panel per `(key, label)` of `panels` against `rows[i][x]`, each point named
    by its cell; the first panel also shows the majority baseline. Saved to `path` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.0))
    for ax, (key, label) in zip(axes, panels):
        for row in rows:
            ax.scatter(row[x], row[key])
            ax.annotate(row["cell"], (row[x], row[key]), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
        ax.set_xlabel(x_label)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].axhline(rows[0]["majority_baseline"], color="gray", linestyle="--", linewidth=1,
                    label="majority baseline")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_study(description: str, study_class: type, argv: Optional[Sequence[str]]):
    """The study runners' command line (`--gin_file`, `--out`, `--only`): returns `(study,
    args, parser)`, the study built from its gin file (relative paths from the repository)."""
    import argparse

    import gin

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--gin_file", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default=None, help="run this cell only")
    args = parser.parse_args(argv)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    gin.parse_config_file(os.path.join(repo, args.gin_file))
    try:
        return study_class(), args, parser
    finally:
        gin.clear_config()
