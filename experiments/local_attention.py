"""Simple local attention against full attention for encoders (Xiong et al. 2022, "Simple Local
Attentions Remain Competitive for Long-Context Tasks"), on the embedded data:

    python experiments/local_attention.py --gin_file=configs/experiments/local_attention.gin \
        --out=experiments/results/local_attention [--only=blocks]

Every cell of the gin matrix (`name -> [overlay gins and bindings]`) pre-trains the same encoder
with masked-LM on the embedded corpus (same tokens, steps and parameters), then fine-tunes it at a
longer length on the embedded classification task (`lexjax.stdlib_is_test`, from the MLM
checkpoint) and evaluates both. The table has per cell: masked-LM loss and accuracy on the test
split, downstream accuracy beside the majority baseline, pre-training time per token (measured:
median over the logged intervals of one run, cells run one after another on the same machine) and
the training step's attention cost (mean keys per query from the mask) and temporary memory
(XLA's memory analysis of the compiled fine-tuning step). Finished cells are skipped; the report
(`OUT/local_attention.{md,json,csv,png}`) is rebuilt from whatever cells have finished.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import gin

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from commands import binding_flags, run_logged  # noqa: E402


@gin.configurable(module="experiments")
@dataclasses.dataclass(frozen=True)
class LocalAttentionStudy:
    """The study's matrix and budgets.

    Attributes:
      matrix: cell name -> its overlay gins (paths ending in .gin) and bindings.
      pretrain_gin, pretrain_overrides: the masked-LM run every cell trains with.
      finetune_gin, finetune_overrides: the classifier fine-tuned from each MLM run (a longer
        TRAIN_LENGTH than pre-training).
      mlm_eval_tokens: test tokens for the masked-LM evaluation.
    """

    matrix: dict = dataclasses.field(default_factory=dict)
    pretrain_gin: str = "configs/runs/mlm_quickstart.gin"
    pretrain_overrides: Sequence[str] = ()
    finetune_gin: str = "configs/runs/classify_quickstart.gin"
    finetune_overrides: Sequence[str] = ()
    mlm_eval_tokens: int = 65536


def split_cell(entries: Sequence[str]) -> tuple[list[str], list[str]]:
    """A cell's entries -> (gin files, bindings)."""
    files = [e for e in entries if e.endswith(".gin")]
    return files, [e for e in entries if not e.endswith(".gin")]


def _median_seconds_per_token(run_dir: str) -> float:
    """The median over logged intervals (after the first, which holds compilation) of seconds
    per training token."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))
            if line.strip()]
    rates = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r][1:]
    return 1.0 / statistics.median(rates)


def _mean_metric(run_dir: str, name: str) -> float:
    """The mean of a logged training metric over the run (e.g. the padded fraction of rows)."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))
            if line.strip()]
    return statistics.mean(r[name] for r in rows if name in r)


def step_cost(study: LocalAttentionStudy, files: list[str], bindings: list[str]) -> dict:
    """The fine-tuning step's mean keys per query and temporary memory (XLA memory analysis of
    the step compiled for this host, batch and length as the fine-tuning run has them)."""
    import jax

    from lexjax import partitioning
    from lexjax.config import parse_gin
    from lexjax.runs import configured_training
    from lexjax.training.step import ShardedTrainStep

    parse_gin([study.finetune_gin, *files],
              [*study.finetune_overrides, *bindings, "MESH=''"])
    try:
        model, config = configured_training()
    finally:
        gin.clear_config()
    step = ShardedTrainStep(model, config, partitioning.make_mesh("", jax.devices()[:1]))
    compiled, _ = step.compile()
    memory = compiled.memory_analysis()
    return {"keys_per_query": model.mask.mean_keys_per_query(config.train_length),
            "finetune_length": config.train_length,
            "finetune_temp_mib": memory.temp_size_in_bytes / 2 ** 20}


def run_cell(study: LocalAttentionStudy, name: str, out: str) -> dict:
    """Pre-trains, evaluates, fine-tunes and evaluates one cell (each part skipped when done)."""
    files, bindings = split_cell(study.matrix[name])
    cell_dir = os.path.join(out, "cells", name)
    record_path = os.path.join(cell_dir, "record.json")
    if os.path.exists(record_path):
        return json.load(open(record_path))
    mlm, classifier = os.path.join(cell_dir, "mlm"), os.path.join(cell_dir, "classifier")
    os.makedirs(cell_dir, exist_ok=True)
    log = os.path.join(cell_dir, "log.txt")
    started = time.time()
    run_logged([sys.executable, "-m", "lexjax.train", f"--gin_file={study.pretrain_gin}",
                *[f"--gin_file={f}" for f in files],
                *binding_flags([*study.pretrain_overrides, *bindings]), f"--model_dir={mlm}"],
               log)
    pretrained = time.time()
    run_logged([sys.executable, "-m", "lexjax.evaluate", f"--model_dir={mlm}",
                f"--lengths={_train_length(mlm)}", f"--max_tokens={study.mlm_eval_tokens}"], log)
    run_logged([sys.executable, "-m", "lexjax.train", f"--gin_file={study.finetune_gin}",
                *[f"--gin_file={f}" for f in files],
                *binding_flags([*study.finetune_overrides, *bindings]), f"--init_from={mlm}",
                f"--model_dir={classifier}"], log)
    run_logged([sys.executable, "-m", "lexjax.evaluate", f"--model_dir={classifier}"], log)
    masked = json.load(open(os.path.join(mlm, "eval", "masked_lm.json")))["rows"][0]
    classified = json.load(open(os.path.join(classifier, "eval", "classification.json")))["rows"][0]
    record = {"cell": name, "entries": list(study.matrix[name]),
              "masked_loss": masked["masked_loss"], "masked_accuracy": masked["masked_accuracy"],
              "accuracy": classified["accuracy"], "f1": classified.get("f1"),
              "majority_baseline": classified["majority_baseline"],
              "examples": classified["examples"],
              "pretrain_us_per_token": 1e6 * _median_seconds_per_token(mlm),
              "pretrain_padding": _mean_metric(mlm, "padding"),
              "pretrain_seconds": pretrained - started, **step_cost(study, files, bindings)}
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    return record


def _train_length(run_dir: str) -> int:
    from lexjax.runs import configured_run
    return configured_run(run_dir)[1].train_length


COLUMNS = ("cell", "masked_loss", "masked_accuracy", "accuracy", "majority_baseline",
           "pretrain_us_per_token", "pretrain_padding", "keys_per_query", "finetune_temp_mib")


def build_report(study: LocalAttentionStudy, records: dict, out: str) -> str:
    """Writes OUT/local_attention.{md,json,csv,png}; returns the Markdown table."""
    from records import write_records

    rows = [records[name] for name in study.matrix if name in records]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    write_records(Path(out) / "local_attention", text, rows,
                  {"study": dataclasses.asdict(study)})
    if rows:
        plot(rows, os.path.join(out, "local_attention.png"))
    return text


def plot(rows: list[dict], path: str) -> None:
    """Downstream accuracy and masked-LM loss against pre-training time per token."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.0))
    for ax, key, label in ((axes[0], "accuracy", "downstream accuracy"),
                           (axes[1], "masked_loss", "masked-LM loss (test)")):
        for row in rows:
            ax.scatter(row["pretrain_us_per_token"], row[key])
            ax.annotate(row["cell"], (row["pretrain_us_per_token"], row[key]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel("pre-training time per token (us)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].axhline(rows[0]["majority_baseline"], color="gray", linestyle="--", linewidth=1,
                    label="majority baseline")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gin_file", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default=None, help="run this cell only")
    args = parser.parse_args(argv)
    gin.parse_config_file(os.path.join(REPO, args.gin_file) if not os.path.isabs(args.gin_file)
                          else args.gin_file)
    study = LocalAttentionStudy()
    gin.clear_config()
    records = {}
    for name in study.matrix:
        if args.only and name != args.only:
            continue
        print(f"cell {name} ...", file=sys.stderr, flush=True)
        records[name] = run_cell(study, name, args.out)
        build_report(study, records, args.out)
    for name in study.matrix:  # cells finished by an earlier run
        path = os.path.join(args.out, "cells", name, "record.json")
        if name not in records and os.path.exists(path):
            records[name] = json.load(open(path))
    print(build_report(study, records, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
