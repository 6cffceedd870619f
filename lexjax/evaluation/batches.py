"""Summed statistics of fixed evaluation examples, batched and sharded on a mesh: the scoring path
of the objectives that are not next-token prediction (masked LM, classification), as `Scorer` is
for the causal LM.

    evaluator = BatchEvaluator(statistics, batch_size=8, mesh=mesh)
    sums = evaluator(variables, examples, seed=0)   # {"loss": float, "correct": float, ...}

`statistics(variables, batch, valid, key)` returns float32 sums over the rows of one batch whose
`valid [batch]` flag is set (the last batch is filled up by repeating its first row); `key` is
fixed per batch index, so masks drawn from it are the same at every evaluation.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from lexjax import partitioning

Statistics = Callable[[Any, dict, jax.Array, jax.Array], dict]


class BatchEvaluator:
    """Sums `statistics` over examples (numpy arrays with a leading example axis) on `mesh`."""

    def __init__(self, statistics: Statistics, *, batch_size: int, mesh: Optional[Mesh] = None,
                 rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.rules = rules
        self.mesh = mesh or partitioning.make_mesh("", jax.devices()[:1])
        ways = partitioning.batch_ways(self.mesh)
        self.batch_size = -(-batch_size // ways) * ways
        self._statistics = jax.jit(statistics, out_shardings=partitioning.replicated(self.mesh))

    def __call__(self, variables: Any, examples: dict[str, np.ndarray], seed: int = 0
                 ) -> dict[str, np.ndarray]:
        """float64 sums of every statistic over all examples (each keeps its shape: a scalar,
        or e.g. a confusion matrix `[classes, classes]`)."""
        count = len(next(iter(examples.values())))
        totals: dict[str, np.ndarray] = {}
        with partitioning.mesh_context(self.mesh, self.rules):
            for index, start in enumerate(range(0, count, self.batch_size)):
                rows = {k: np.asarray(v[start:start + self.batch_size]) for k, v in
                        examples.items()}
                real = len(next(iter(rows.values())))
                fill = self.batch_size - real
                rows = {k: np.concatenate([v, np.repeat(v[:1], fill, axis=0)]) if fill else v
                        for k, v in rows.items()}
                rows["valid"] = np.arange(self.batch_size) < real
                batch = {k: partitioning.global_batch(
                             partitioning.batch_sharding(self.mesh, v.ndim), v)
                         for k, v in rows.items()}
                valid = batch.pop("valid")
                key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
                sums = jax.device_get(self._statistics(variables, batch, valid, key))
                for name, value in sums.items():
                    totals[name] = totals.get(name, 0.0) + np.asarray(value, np.float64)
        return totals
