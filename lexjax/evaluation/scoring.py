"""The one scoring path: windows of tokens -> per-token losses, batched and sharded on a mesh.

Validation during training, `lexjax.evaluate` (every length, every protocol) and the studies all
score through a `Scorer`: each window is read as decoder input shifted right by one
(`lexjax.losses`), in batches laid out over the mesh's data axes, with the parameters where they
already are (sharded by the trainer, or restored onto the evaluation mesh). One program is
compiled per window length.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from lexjax import partitioning
from lexjax.losses import shift_right, token_losses


class Scorer:
    """Per-token losses of a model's windows on `mesh` (default: one device).

    Args:
      model: the LM.
      batch_size: windows per batch, rounded up to a multiple of the ways the mesh splits a
        batch (its data and fsdp axes); a batch short of windows is filled by repeating its
        first window, and those rows are dropped.
      mesh, rules: where to run and how activations are laid out.
    """

    def __init__(self, model: nn.Module, *, batch_size: int, mesh: Optional[Mesh] = None,
                 rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model, self.rules = model, rules
        self.mesh = mesh or partitioning.make_mesh("", jax.devices()[:1])
        ways = partitioning.batch_ways(self.mesh)
        self.batch_size = -(-batch_size // ways) * ways
        self.batch_sharding = partitioning.batch_sharding(self.mesh)

        def losses(variables, tokens):
            logits = model.apply(variables, shift_right(tokens), deterministic=True)
            return token_losses(logits, tokens)

        self._losses = jax.jit(losses, out_shardings=partitioning.replicated(self.mesh))

    def __call__(self, variables: Any, windows: np.ndarray) -> np.ndarray:
        """float32 `[W, m]`: the losses of the last m positions each window's logits cover
        (m = length for most models), for int32 `windows [W, length]`."""
        windows = np.asarray(windows, np.int32)
        out = []
        with partitioning.mesh_context(self.mesh, self.rules):
            for start in range(0, len(windows), self.batch_size):
                batch = windows[start:start + self.batch_size]
                pad = self.batch_size - len(batch)
                if pad:
                    batch = np.concatenate([batch, np.repeat(batch[:1], pad, axis=0)])
                tokens = partitioning.global_batch(self.batch_sharding, batch)
                out.append(np.asarray(self._losses(variables, tokens))[:len(batch) - pad])
        return np.concatenate(out)

    def mean_loss(self, variables: Any, windows: np.ndarray) -> float:
        """The mean loss over every scored token of `windows`."""
        return float(np.mean(self(variables, windows), dtype=np.float64))
