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

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import gin

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from encoder_runs import (markdown_table, parse_study, pretrain_and_finetune,  # noqa: E402
                          run_matrix, scatter_panels, split_cell)


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
    return {"keys_per_query": keys_per_query(model, config.train_length),
            "finetune_length": config.train_length,
            "finetune_temp_mib": memory.temp_size_in_bytes / 2 ** 20}


def keys_per_query(model, length: int) -> float:
    """The keys one query attends to: from the mask (softmax, kernelized and YOSO attention:
    the latter two over all keys in linear time), or Luna's extra-sequence rows."""
    if hasattr(model, "mask"):
        return model.mask.mean_keys_per_query(length)
    return float(model.extra_length)


def run_cell(study: LocalAttentionStudy, name: str, out: str) -> dict:
    """Pre-trains, evaluates, fine-tunes and evaluates one cell (skipped when done)."""
    files, bindings = split_cell(study.matrix[name])
    cell_dir = os.path.join(out, "cells", name)
    record_path = os.path.join(cell_dir, "record.json")
    if os.path.exists(record_path):
        return json.load(open(record_path))
    results = pretrain_and_finetune(
        cell_dir, pretrain=[study.pretrain_gin, *files, *study.pretrain_overrides, *bindings],
        finetune=[study.finetune_gin, *files, *study.finetune_overrides, *bindings],
        mlm_eval_tokens=study.mlm_eval_tokens)
    record = {"cell": name, "entries": list(study.matrix[name]), **results,
              **step_cost(study, files, bindings)}
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    return record


COLUMNS = ("cell", "masked_loss", "masked_accuracy", "accuracy", "majority_baseline",
           "pretrain_us_per_token", "pretrain_padding", "keys_per_query", "finetune_temp_mib")


def build_report(study: LocalAttentionStudy, records: dict, out: str) -> str:
    """Writes OUT/local_attention.{md,json,csv,png}; returns the Markdown table."""
    from records import write_records

    rows = [records[name] for name in study.matrix if name in records]
    text = markdown_table(rows, COLUMNS)
    write_records(Path(out) / "local_attention", text, rows,
                  {"study": dataclasses.asdict(study)})
    if rows:
        scatter_panels(rows, "pretrain_us_per_token", "pre-training time per token (us)",
                       (("accuracy", "downstream accuracy"),
                        ("masked_loss", "masked-LM loss (test)")),
                       os.path.join(out, "local_attention.png"))
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    study, args, _ = parse_study(__doc__.split("\n\n")[0], LocalAttentionStudy, argv)
    print(run_matrix(list(study.matrix), lambda name: run_cell(study, name, args.out),
                     lambda records: build_report(study, records, args.out), args.out, args.only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
