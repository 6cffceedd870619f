"""Masked-LM pre-training efficiency: vanilla MLM (15%, and 50%) against late [MASK] insertion
(3ML, "Mask More and Mask Later": 50% masked, the insertion layer swept) at an equal FLOPs budget,
on the embedded data:

    python experiments/mlm_efficiency.py --gin_file=configs/experiments/mlm_efficiency.gin \
        --out=experiments/results/mlm_efficiency [--only=3ml_self@4]

The budget is the baseline cell's FLOPs per pre-training step (the models' own analytic count,
`flops_per_token`, checked against XLA's cost analysis of the compiled step in the table) times
its steps; every cell trains as many steps as the budget buys. Each cell then fine-tunes a
classifier from its MLM run on the embedded classification task (`lexjax.stdlib_is_test`; 3ML's
decoder is dropped) and is evaluated: masked-LM loss and accuracy at its own masking rate and at
15% (comparable across cells), downstream accuracy beside the majority baseline, wall time.
Finished cells are skipped; the report (`OUT/mlm_efficiency.{md,json,csv,png}`) is rebuilt from
whatever cells have finished.
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
class MLMEfficiencyStudy:
    """The study's matrix and budgets.

    Attributes:
      matrix: cell name -> its gin files and bindings (for pre-training and fine-tuning).
      baseline: the cell whose FLOPs per step times `baseline_steps` is every cell's budget.
      baseline_steps: the baseline's pre-training steps.
      pretrain_gin, pretrain_overrides: the masked-LM run every cell trains with (without
        TRAIN_STEPS: the budget sets it).
      finetune_gin, finetune_overrides: the classifier fine-tuned from each MLM run.
      compare_rate: every MLM run is also evaluated at this masking rate.
      mlm_eval_tokens: test tokens for each masked-LM evaluation.
    """

    matrix: dict = dataclasses.field(default_factory=dict)
    baseline: str = "mlm_15"
    baseline_steps: int = 400
    pretrain_gin: str = "configs/runs/mlm_quickstart.gin"
    pretrain_overrides: Sequence[str] = ()
    finetune_gin: str = "configs/runs/classify_quickstart.gin"
    finetune_overrides: Sequence[str] = ()
    compare_rate: float = 0.15
    mlm_eval_tokens: int = 65536


def step_flops(study: MLMEfficiencyStudy, name: str) -> dict:
    """A cell's pre-training step: the model's analytic FLOPs (3 x forward) and XLA's count of
    the compiled step on one device, the masking rate, and the insertion layer."""
    import jax

    from lexjax import partitioning
    from lexjax.config import parse_gin
    from lexjax.runs import configured_training
    from lexjax.training.flops import training_flops_per_step, xla_flops
    from lexjax.training.step import ShardedTrainStep

    files, bindings = split_cell(study.matrix[name])
    parse_gin([study.pretrain_gin, *files], [*study.pretrain_overrides, *bindings, "MESH=''"])
    try:
        model, config = configured_training()
    finally:
        gin.clear_config()
    step = ShardedTrainStep(model, config, partitioning.make_mesh("", jax.devices()[:1]))
    compiled, _ = step.compile()
    return {"flops_per_step": training_flops_per_step(model, config.batch_size,
                                                      config.train_length),
            "xla_flops_per_step": xla_flops(compiled),
            "mask_rate": config.objective.mask_rate,
            "insert_layer": getattr(model, "inserted_after", None)}


def run_cell(study: MLMEfficiencyStudy, name: str, out: str) -> dict:
    """Pre-trains (steps from the budget), evaluates, fine-tunes and evaluates one cell."""
    cell_dir = os.path.join(out, "cells", name)
    record_path = os.path.join(cell_dir, "record.json")
    if os.path.exists(record_path):
        return json.load(open(record_path))
    cost = step_flops(study, name)
    budget = step_flops(study, study.baseline)["flops_per_step"] * study.baseline_steps
    steps = max(1, round(budget / cost["flops_per_step"]))
    schedule = [f"TRAIN_STEPS={steps}", f"CHECKPOINT_EVERY={steps}",
                f"WARMUP_STEPS={max(1, steps // 10)}"]
    entries = study.matrix[name]
    results = pretrain_and_finetune(
        cell_dir, pretrain=[study.pretrain_gin, *study.pretrain_overrides, *schedule, *entries],
        finetune=[study.finetune_gin, *entries, *study.finetune_overrides],
        mlm_eval_tokens=study.mlm_eval_tokens,
        mlm_evaluations=[("compare", [f"MASK_RATE={study.compare_rate}"])])
    record = {"cell": name, "entries": list(entries), "steps": steps, **cost,
              "step_flops_vs_baseline": cost["flops_per_step"] * study.baseline_steps / budget,
              "budget_flops": budget, **results}
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    return record


COLUMNS = ("cell", "mask_rate", "insert_layer", "step_flops_vs_baseline", "steps",
           "masked_loss", "masked_loss@compare", "masked_accuracy@compare", "accuracy",
           "majority_baseline", "pretrain_seconds")


def build_report(study: MLMEfficiencyStudy, records: dict, out: str) -> str:
    """Writes OUT/mlm_efficiency.{md,json,csv,png}; returns the Markdown table."""
    from records import write_records

    rows = [records[name] for name in study.matrix if name in records]
    text = markdown_table(rows, COLUMNS)
    write_records(Path(out) / "mlm_efficiency", text, rows, {"study": dataclasses.asdict(study)})
    if rows:
        scatter_panels(rows, "step_flops_vs_baseline",
                       "pre-training FLOPs per step (baseline = 1)",
                       (("accuracy", "downstream accuracy"),
                        ("masked_loss@compare", "masked-LM loss at 15% (test)")),
                       os.path.join(out, "mlm_efficiency.png"),
                       title="equal pre-training FLOPs budget")
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    study, args, parser = parse_study(__doc__.split("\n\n")[0], MLMEfficiencyStudy, argv)
    if study.baseline not in study.matrix:
        parser.error(f"the baseline cell {study.baseline!r} is not in the matrix")
    print(run_matrix(list(study.matrix), lambda name: run_cell(study, name, args.out),
                     lambda records: build_report(study, records, args.out), args.out, args.only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
