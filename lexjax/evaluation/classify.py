"""Classifier evaluation: accuracy (and F1 / Matthews where the task defines them) on a split,
at one or several input lengths (images: the whole image), beside the split's majority
baseline."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import numpy as np

from lexjax import partitioning
from lexjax.evaluation.batches import BatchEvaluator
from lexjax.objectives import Classification
from lexjax.objectives.classification import confusion_metrics


def evaluate_classifier(model: nn.Module, variables: Any, objective: Classification, data,
                        lengths: Sequence[int], *, train_length: Optional[int] = None,
                        max_examples: Optional[int] = None, batch_size: int = 8,
                        split: str = "test", mesh=None,
                        rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES,
                        progress: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """One row per input length: `accuracy`, the task's extra metrics (`f1`, `mcc`), the mean
    `loss`, `majority_baseline` (the share of the split's most frequent class) and `examples`."""
    from lexjax import data as data_lib

    info = data_lib.task_info(data.task)
    evaluator = BatchEvaluator(objective.statistics(model), batch_size=batch_size, mesh=mesh,
                               rules=rules)
    rows = []
    for length in lengths:
        examples = objective.examples(data, length=length, split=split,
                                      max_examples=max_examples)
        sums = evaluator(variables, examples)
        scores = confusion_metrics(sums["confusion"])
        counts = np.bincount(examples["label"], minlength=info.num_classes)
        row = {"length": length, "accuracy": scores["accuracy"],
               **{m: scores[m] for m in info.metrics},
               "loss": float(sums["loss"]) / max(float(sums["count"]), 1.0),
               "majority_baseline": float(counts.max() / counts.sum()),
               "examples": int(counts.sum())}
        if train_length:
            row["x_train"] = length / train_length
        rows.append(row)
        if progress:
            progress(row)
    return rows
