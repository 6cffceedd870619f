"""The train step: one AdamW step on the next-token loss, jitted with in/out shardings on a mesh
and the state donated; shared by training and the bench (`lexjax.benchmarking`).

A batch is a dict of int32 `[batch, length]` arrays: `"targets"` (the tokens) and, for models
without carried state, `"segment_ids"` (`lexjax.data.segment_ids`: 1, 2, ... per document piece,
0 for padding). A model that keeps documents apart (`keeps_segments_apart`) reads the segment ids;
every model starts each segment from BOS and is not scored on padding (`lexjax.losses`).
"""
from __future__ import annotations

import time
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lexjax import partitioning
from lexjax.losses import mean_loss, shift_right
from lexjax.training import state as state_lib
from lexjax.training.config import TrainConfig
from lexjax.training.inputs import reads_segment_ids
from lexjax.training.optimizer import make_optimizer

Batch = dict  # {"targets": int32 [batch, length], "segment_ids": int32 [batch, length]}


def batch_spec(model: nn.Module, batch_size: int, length: int) -> Batch:
    """`ShapeDtypeStruct`s of one global batch for `model`."""
    shape = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
    if state_lib.carries_state(model):
        return {"targets": shape}
    return {"targets": shape, "segment_ids": shape}


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, segments_per_stream: Optional[int] = None):
    """`(state, batch, key) -> (state, metrics)`: one optimizer step on the next-token loss,
    dropout keyed by (key, step).

    A state-carrying model (`state.carry` not None) reads the carry of the previous step's
    segment and returns the next one, with no gradient through it (truncated backpropagation
    through time); its first input token is the previous segment's last token instead of BOS.
    The carry restarts (zeros: a fresh stream) at every multiple of `segments_per_stream` steps,
    where the data's row streams restart (see `lexjax.data.stream_batches`).
    """
    passes_segments = reads_segment_ids(model)

    def loss_fn(params, batch, rng, carry):
        targets, segments = batch["targets"], batch.get("segment_ids")
        kwargs = dict(deterministic=False, rngs={"dropout": rng})
        if carry is None:
            if passes_segments:
                kwargs["segment_ids"] = segments
            logits = model.apply({"params": params}, shift_right(targets, segments), **kwargs)
            return mean_loss(logits, targets, segments), None
        inputs = shift_right(targets).at[:, 0].set(carry["last_token"])
        logits, model_carry = model.apply({"params": params}, inputs, carry=carry["model"],
                                          return_carry=True, **kwargs)
        next_carry = {"model": jax.lax.stop_gradient(model_carry), "last_token": targets[:, -1]}
        return mean_loss(logits, targets), next_carry

    def restart_streams(carry, step):
        if carry is None or not segments_per_stream:
            return carry
        fresh = step % segments_per_stream == 0
        return jax.tree_util.tree_map(lambda x: jnp.where(fresh, jnp.zeros_like(x), x), carry)

    def train_step(state: state_lib.TrainState, batch: Batch, key: jax.Array):
        rng = jax.random.fold_in(key, state.step)
        carry = restart_streams(state.carry, state.step)
        (loss, carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, rng, carry)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        segments = batch.get("segment_ids")
        padding = (jnp.mean((segments == 0).astype(jnp.float32)) if segments is not None
                   else jnp.zeros((), jnp.float32))
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                   "param_norm": optax.global_norm(params),
                   "learning_rate": schedule(state.step), "padding": padding}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             carry=carry), metrics

    return train_step


class ShardedTrainStep:
    """One model's train step laid out on one mesh: the state's shardings (from the parameters'
    logical axes through `config.logical_axis_rules`), the abstract sharded state, and the jitted
    (sharded, donated) init and train steps. The mesh may be of real devices or of a TPU
    topology's compile-only devices (then only `lower` applies). A state-carrying model's carry
    is part of the state, sharded like activations; `segments_per_stream` is when it restarts
    (see `make_train_step`)."""

    def __init__(self, model: nn.Module, config: TrainConfig, mesh,
                 segments_per_stream: Optional[int] = None):
        self.model, self.config, self.mesh = model, config, mesh
        self.rules = config.logical_axis_rules
        self.optimizer, self.schedule = make_optimizer(config.optimizer, config.train_steps)
        partitioning.check_batch_divides(mesh, config.batch_size)
        self.example = batch_spec(model, config.batch_size, config.train_length)
        state_lib.check_logical_axes(state_lib.boxed_params(model, self.example["targets"]))

        def boxed_state(rng):
            tokens = jnp.zeros(self.example["targets"].shape, jnp.int32)
            params = model.init(rng, tokens)["params"]
            return state_lib.TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                                        opt_state=self.optimizer.init(params),
                                        carry=state_lib.initial_carry(model, config.batch_size))

        boxed = jax.eval_shape(boxed_state, jax.random.PRNGKey(0))
        self.abstract_state = partitioning.sharded_abstract(boxed, mesh, self.rules)
        self.state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, self.abstract_state)
        batch_sharding = partitioning.batch_sharding(mesh)
        self.batch_shardings = {name: batch_sharding for name in self.example}
        self.replicated = partitioning.replicated(mesh)
        with self.context():
            self._init = jax.jit(lambda rng: nn.unbox(boxed_state(rng)),
                                 out_shardings=self.state_shardings)
            self.jitted = jax.jit(
                make_train_step(model, self.optimizer, self.schedule, segments_per_stream),
                in_shardings=(self.state_shardings, self.batch_shardings, self.replicated),
                out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))

    def context(self):
        """The mesh and the logical-axis rules, for tracing (activation constraints)."""
        return partitioning.mesh_context(self.mesh, self.rules)

    def init(self, seed: int) -> state_lib.TrainState:
        """The initial state, created sharded (never whole on one device)."""
        with self.context():
            return self._init(jax.random.PRNGKey(seed))

    def lower(self):
        """`jax.stages.Lowered` of the train step for the abstract state and batch."""
        key = jax.ShapeDtypeStruct((2,), jnp.uint32)
        with self.context():
            return self.jitted.lower(self.abstract_state, self.example, key)

    def compile(self):
        """`(compiled train step, seconds spent lowering and compiling)`."""
        start = time.perf_counter()
        compiled = self.lower().compile()
        return compiled, time.perf_counter() - start

    def device_batch(self, local: dict[str, np.ndarray]) -> Batch:
        """The global batch from this process's rows (`[batch / processes, length]` each)."""
        return {name: jax.make_array_from_process_local_data(
                    self.batch_shardings[name], np.asarray(local[name], np.int32),
                    self.example[name].shape)
                for name in self.example}
