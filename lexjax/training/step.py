"""The train step: one AdamW step on the run's objective (`lexjax.objectives`: next-token loss
by default), jitted with in/out shardings on a mesh and the state donated; shared by training and
the bench (`lexjax.benchmarking`).

A batch is a dict of arrays whose names, shapes and dtypes the objective gives (`batch_spec`): for
the causal LM, `"targets"` (the tokens, `[batch, length]`) and, for models without carried state,
`"segment_ids"` (`lexjax.data.segment_ids`: 1, 2, ... per document piece, 0 for padding); for
images, float32 `"image"` and int32 `"label"` (`ImageClassification`).
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
from lexjax.objectives import CausalLM, Objective
from lexjax.training import state as state_lib
from lexjax.training.config import TrainConfig
from lexjax.training.optimizer import make_optimizer

Batch = dict  # name -> array, as the objective's `batch_spec` says


def batch_spec(model: nn.Module, batch_size: int, length: int,
               objective: Objective = CausalLM()) -> Batch:
    """`ShapeDtypeStruct`s of one global batch for `model` under `objective`."""
    return objective.batch_spec(model, batch_size, length)


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, segments_per_stream: Optional[int] = None,
                    objective: Objective = CausalLM()):
    """`(state, batch, key) -> (state, metrics)`: one optimizer step on `objective`'s loss
    (prepared: `objective.prepare(model, data)`), dropout (and masks) keyed by (key, step).

    A state-carrying model's carry (`state.carry`, see `CausalLM`) restarts (zeros: a fresh
    stream) at every multiple of `segments_per_stream` steps, where the data's row streams
    restart (see `lexjax.data.stream_batches`).
    """

    def restart_streams(carry, step):
        if carry is None or not segments_per_stream:
            return carry
        fresh = step % segments_per_stream == 0
        return jax.tree_util.tree_map(lambda x: jnp.where(fresh, jnp.zeros_like(x), x), carry)

    def loss_fn(params, batch, rng, carry):
        loss, metrics, carry = objective.loss(model, params, batch, rng=rng, carry=carry)
        return loss, (metrics, carry)

    def train_step(state: state_lib.TrainState, batch: Batch, key: jax.Array):
        rng = jax.random.fold_in(key, state.step)
        carry = restart_streams(state.carry, state.step)
        (loss, (extra, carry)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, rng, carry)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        segments = batch.get("segment_ids")
        padding = (jnp.mean((segments == 0).astype(jnp.float32)) if segments is not None
                   else jnp.zeros((), jnp.float32))
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                   "param_norm": optax.global_norm(params),
                   "learning_rate": schedule(state.step), "padding": padding, **extra}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             carry=carry), metrics

    return train_step


class ShardedTrainStep:
    """One model's train step laid out on one mesh: the state's shardings (from the parameters'
    logical axes through `config.logical_axis_rules`), the abstract sharded state, and the jitted
    (sharded, donated) init and train steps. The mesh may be of real devices or of a TPU
    topology's compile-only devices (then only `lower` applies). A state-carrying model's carry
    is part of the state, sharded like activations; `segments_per_stream` is when it restarts
    (see `make_train_step`). `objective` is the run's, prepared (`config.objective.prepare`
    by default)."""

    def __init__(self, model: nn.Module, config: TrainConfig, mesh,
                 segments_per_stream: Optional[int] = None,
                 objective: Optional[Objective] = None):
        self.model, self.config, self.mesh = model, config, mesh
        self.rules = config.logical_axis_rules
        self.objective = objective or config.objective.prepare(model, config.data)
        self.optimizer, self.schedule = make_optimizer(config.optimizer, config.train_steps)
        partitioning.check_batch_divides(mesh, config.batch_size)
        self.example = batch_spec(model, config.batch_size, config.train_length, self.objective)
        inputs = state_lib.example_inputs(model, config.batch_size, config.train_length)
        state_lib.check_logical_axes(state_lib.boxed_params(model, inputs))

        def boxed_state(rng):
            params = model.init(rng, jnp.zeros(inputs.shape, inputs.dtype))["params"]
            return state_lib.TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                                        opt_state=self.optimizer.init(params),
                                        carry=state_lib.initial_carry(model, config.batch_size))

        boxed = jax.eval_shape(boxed_state, jax.random.PRNGKey(0))
        self.abstract_state = partitioning.sharded_abstract(boxed, mesh, self.rules)
        self.state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, self.abstract_state)
        self.batch_shardings = {name: partitioning.batch_sharding(mesh, spec.ndim)
                                for name, spec in self.example.items()}
        self.replicated = partitioning.replicated(mesh)
        with self.context():
            self._init = jax.jit(lambda rng: nn.unbox(boxed_state(rng)),
                                 out_shardings=self.state_shardings)
            self.jitted = jax.jit(
                make_train_step(model, self.optimizer, self.schedule, segments_per_stream,
                                self.objective),
                in_shardings=(self.state_shardings, self.batch_shardings, self.replicated),
                out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,),
                compiler_options=partitioning.compiler_options(mesh, config.compiler_options))

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
        """The global batch from this process's rows (`[batch / processes, ...]` each)."""
        return {name: jax.make_array_from_process_local_data(
                    self.batch_shardings[name],
                    np.asarray(local[name], self.example[name].dtype),
                    self.example[name].shape)
                for name in self.example}
