"""Masked-LM evaluation at several lengths (encoder length extrapolation): masked-token loss and
accuracy on windows of the test split, the masks fixed by the seed (the same at every run)."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn

from lexjax import partitioning
from lexjax.evaluation.batches import BatchEvaluator
from lexjax.objectives import MaskedLM


def evaluate_masked_lengths(model: nn.Module, variables: Any, objective: MaskedLM, data,
                            lengths: Sequence[int], *, train_length: Optional[int] = None,
                            max_tokens: int = 65536, batch_size: int = 4,
                            split: str = "test", seed: int = 0, mesh=None,
                            rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES,
                            progress: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """One row per length: `masked_loss` (nats per masked token), `masked_accuracy`,
    `masked_tokens`, `windows` (max(1, max_tokens // length) windows of the split's stream).

    `objective` must be prepared (`objective.prepare(model, data)`).
    """
    evaluator = BatchEvaluator(objective.statistics(model), batch_size=batch_size, mesh=mesh,
                               rules=rules)
    rows = []
    for length in lengths:
        examples = objective.windows(data, length=length, split=split,
                                     max_windows=max(1, max_tokens // length))
        sums = evaluator(variables, examples, seed=seed)
        count = max(float(sums["count"]), 1.0)
        row = {"length": length, "masked_loss": float(sums["loss"]) / count,
               "masked_accuracy": float(sums["correct"]) / count,
               "masked_tokens": int(sums["count"]), "windows": len(examples["targets"])}
        if train_length:
            row["x_train"] = length / train_length
        rows.append(row)
        if progress:
            progress(row)
    return rows
