"""The training loop: one jitted, sharded, donated train step; checkpoints; metrics; resume.

`train(model_dir, init_from)` reads everything else from gin (configs/runs/*.gin binds the run
macros TRAIN_STEPS, BATCH_SIZE, TRAIN_LENGTH, ... to it). The loop never waits for the device
except at log, evaluation and checkpoint steps.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Iterator, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lexjax import partitioning
from lexjax.config import build_configured_model
from lexjax.errors import UserError
from lexjax.training import checkpoints as ckpt_lib
from lexjax.training import flops as flops_lib
from lexjax.training import state as state_lib
from lexjax.training.losses import shift_right, token_losses
from lexjax.training.metrics import MetricsLogger, truncate_metrics
from lexjax.training.optimizer import make_optimizer

CONFIG_FILE = "config.gin"
OPERATIVE_CONFIG_FILE = "operative_config.gin"


class TrainingError(UserError, RuntimeError):
    """A run that cannot go on (NaN loss, a model_dir of another model, ...)."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What one training run does; filled from gin by `train`."""

    task: str
    train_steps: int
    batch_size: int
    train_length: int
    checkpoint_every: int
    log_every: int
    eval_every: int
    eval_windows: int
    seed: int
    mesh: str
    keep_checkpoints: int


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, segments_per_stream: Optional[int] = None):
    """`(state, tokens [batch, length], key) -> (state, metrics)`: one AdamW step on the
    next-token loss, dropout keyed by (key, step).

    A state-carrying model (`state.carry` not None) reads the carry of the previous step's
    segment and returns the next one, with no gradient through it (truncated backpropagation
    through time); its first input token is the previous segment's last token instead of BOS.
    The carry restarts (zeros: a fresh stream) at every multiple of `segments_per_stream` steps,
    where the data's row streams restart (see `lexjax.data.stream_batches`).
    """

    def loss_fn(params, tokens, rng, carry):
        inputs = shift_right(tokens)
        kwargs = dict(deterministic=False, rngs={"dropout": rng})
        if carry is None:
            logits = model.apply({"params": params}, inputs, **kwargs)
            return jnp.mean(token_losses(logits, tokens)), None
        inputs = inputs.at[:, 0].set(carry["last_token"])
        logits, model_carry = model.apply({"params": params}, inputs, carry=carry["model"],
                                          return_carry=True, **kwargs)
        next_carry = {"model": jax.lax.stop_gradient(model_carry), "last_token": tokens[:, -1]}
        return jnp.mean(token_losses(logits, tokens)), next_carry

    def restart_streams(carry, step):
        if carry is None or not segments_per_stream:
            return carry
        fresh = step % segments_per_stream == 0
        return jax.tree_util.tree_map(lambda x: jnp.where(fresh, jnp.zeros_like(x), x), carry)

    def train_step(state: state_lib.TrainState, tokens: jnp.ndarray, key: jax.Array):
        rng = jax.random.fold_in(key, state.step)
        carry = restart_streams(state.carry, state.step)
        (loss, carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, tokens, rng, carry)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                   "param_norm": optax.global_norm(params),
                   "learning_rate": schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             carry=carry), metrics

    return train_step


def make_eval_step(model: nn.Module):
    """`(params, tokens [batch, length]) -> (sum of token losses, number of tokens)`."""

    def eval_step(params, tokens):
        logits = model.apply({"params": params}, shift_right(tokens), deterministic=True)
        losses = token_losses(logits, tokens)
        return jnp.sum(losses), jnp.asarray(losses.size, jnp.float32)

    return eval_step


def _save_configs(model_dir: str) -> str:
    os.makedirs(model_dir, exist_ok=True)
    operative = gin.operative_config_str()
    for name, text in ((CONFIG_FILE, gin.config_str()), (OPERATIVE_CONFIG_FILE, operative)):
        with open(os.path.join(model_dir, name + ".tmp"), "w") as f:
            f.write(text)
        os.replace(os.path.join(model_dir, name + ".tmp"), os.path.join(model_dir, name))
    return operative


class ShardedTrainStep:
    """One model's train step laid out on one mesh: the state's shardings (from the parameters'
    logical axes through the rules), the abstract sharded state, and the jitted (sharded,
    donated) init, train and eval steps. Shared by training (with its validation) and the bench
    (`lexjax.benchmarking`); the mesh may be of real devices or of a TPU topology's compile-only
    devices (then only `lower` applies). A state-carrying model's carry is part of the state,
    sharded like activations; `segments_per_stream` is when it restarts (see `make_train_step`)."""

    def __init__(self, model: nn.Module, optimizer: optax.GradientTransformation,
                 schedule: optax.Schedule, mesh, batch_size: int, length: int,
                 rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES,
                 segments_per_stream: Optional[int] = None):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.mesh, self.rules = mesh, rules
        partitioning.check_batch_divides(mesh, batch_size)
        self.example = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
        state_lib.check_logical_axes(state_lib.boxed_params(model, self.example))

        def boxed_state(rng):
            params = model.init(rng, jnp.zeros(self.example.shape, jnp.int32))["params"]
            return state_lib.TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                                        opt_state=optimizer.init(params),
                                        carry=state_lib.initial_carry(model, batch_size))

        boxed = jax.eval_shape(boxed_state, jax.random.PRNGKey(0))
        self.abstract_state = partitioning.sharded_abstract(boxed, mesh, rules)
        self.state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, self.abstract_state)
        self.batch_sharding = partitioning.batch_sharding(mesh)
        self.replicated = partitioning.replicated(mesh)
        with self.context():
            self._init = jax.jit(lambda rng: nn.unbox(boxed_state(rng)),
                                 out_shardings=self.state_shardings)
            self.jitted = jax.jit(
                make_train_step(model, optimizer, schedule, segments_per_stream),
                in_shardings=(self.state_shardings, self.batch_sharding, self.replicated),
                out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))

    def context(self):
        """The mesh and the logical-axis rules, for tracing (activation constraints)."""
        return _Both(self.mesh, nn.logical_axis_rules(list(self.rules)))

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

    def compile_eval_step(self):
        with self.context():
            return jax.jit(make_eval_step(self.model),
                           in_shardings=(self.state_shardings.params, self.batch_sharding),
                           out_shardings=self.replicated)

    def device_batch(self, local_tokens: np.ndarray) -> jax.Array:
        """The global batch from this process's rows (`[batch / processes, length]`)."""
        return jax.make_array_from_process_local_data(self.batch_sharding, local_tokens,
                                                      self.example.shape)


class _Trainer:
    """Holds the sharded step, fingerprint and checkpointer of one run."""

    def __init__(self, model_dir: str, spec: RunSpec, init_from: Optional[str]):
        from lexjax import data

        partitioning.initialize_distributed()
        self.model_dir, self.spec, self.init_from = model_dir, spec, init_from
        self.model = build_configured_model()
        self.carries_state = state_lib.carries_state(self.model)
        self.segments_per_stream = (
            data.stream_segments(spec.task, length=spec.train_length,
                                 batch_size=spec.batch_size) if self.carries_state else None)
        self.optimizer, self.schedule = make_optimizer(total_steps=spec.train_steps)
        self.mesh = partitioning.make_mesh(spec.mesh)
        self.step = ShardedTrainStep(self.model, self.optimizer, self.schedule, self.mesh,
                                     spec.batch_size, spec.train_length,
                                     segments_per_stream=self.segments_per_stream)
        self.abstract_state = self.step.abstract_state
        self.fingerprint = state_lib.params_fingerprint(self.abstract_state.params)
        self.checkpointer = ckpt_lib.Checkpointer(model_dir, max_to_keep=spec.keep_checkpoints)

    # -- data -------------------------------------------------------------------------------
    def batches(self, start_step: int) -> Iterator[np.ndarray]:
        """This process's rows of the global batches from `start_step` on: independent examples,
        or, for a state-carrying model, rows that each continue one stream."""
        from lexjax import data

        spec = self.spec
        read = data.stream_batches if self.carries_state else data.train_batches
        return read(spec.task, length=spec.train_length, batch_size=spec.batch_size,
                    seed=spec.seed, start_step=start_step, shard_index=jax.process_index(),
                    num_shards=jax.process_count())

    # -- state ------------------------------------------------------------------------------
    def initial_state(self) -> state_lib.TrainState:
        latest = self.checkpointer.latest_step()
        if latest is not None:
            meta = self.checkpointer.meta(latest)
            if meta.get("fingerprint") != self.fingerprint:
                raise TrainingError(
                    f"{self.model_dir} holds checkpoints of another model ({meta.get('model')}, "
                    f"fingerprint {meta.get('fingerprint')}) than the configured one "
                    f"({type(self.model).__name__}, {self.fingerprint}); use a fresh --model_dir, "
                    "or --init_from to start from its weights")
            params, opt_state, _ = self.checkpointer.restore(
                self.abstract_state.params, self.abstract_state.opt_state, latest)
            carry = (self.checkpointer.restore_carry(self.abstract_state.carry, latest)
                     if self.carries_state else None)
            return state_lib.TrainState(step=jnp.asarray(latest, jnp.int32), params=params,
                                        opt_state=opt_state, carry=carry)
        state = self.step.init(self.spec.seed)
        if self.init_from:
            source = ckpt_lib.Checkpointer(self.init_from, read_only=True)
            params = source.restore_params(self.abstract_state.params)
            state = state.replace(params=params)
        return state

    def save(self, step: int, state: state_lib.TrainState, meta: dict) -> None:
        self.checkpointer.save(step, state.params, state.opt_state, {**meta, "step": step},
                               carry=state.carry)

    # -- compiled steps ---------------------------------------------------------------------
    def compile_train_step(self):
        return self.step.compile()

    def compile_eval_step(self):
        return self.step.compile_eval_step()

    def device_batch(self, local_tokens: np.ndarray) -> jax.Array:
        return self.step.device_batch(local_tokens)


class _Both:
    """Enters two context managers (mesh, axis rules)."""

    def __init__(self, *contexts):
        self.contexts = contexts

    def __enter__(self):
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.contexts):
            c.__exit__(*exc)


def _validation_loss(trainer: _Trainer, eval_step, params) -> Optional[float]:
    from lexjax import data

    spec = trainer.spec
    windows = data.eval_windows(spec.task, length=spec.train_length, split="validation",
                                max_windows=spec.eval_windows)
    usable = len(windows) // spec.batch_size * spec.batch_size
    if usable == 0:
        return None
    total, count = 0.0, 0.0
    for start in range(0, usable, spec.batch_size):
        s, n = eval_step(params, trainer.device_batch(windows[start:start + spec.batch_size]))
        total, count = total + float(s), count + float(n)
    return total / count


@gin.configurable(module="lexjax.training", denylist=["model_dir", "init_from"])
def train(model_dir: str, init_from: Optional[str] = None, *,
          task: str = gin.REQUIRED, train_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED, train_length: int = gin.REQUIRED,
          checkpoint_every: int = 1000, log_every: int = 50, eval_every: int = 0,
          eval_windows: int = 64, seed: int = 0, mesh: str = "",
          keep_checkpoints: int = 3, progress: Optional[bool] = None) -> dict:
    """Trains `%MODEL` on `task` into `model_dir`, resuming from its latest checkpoint.

    Args:
      model_dir: where checkpoints, metrics.jsonl, TensorBoard events and configs go.
      init_from: another run's model_dir: start from its latest parameters (fine-tuning; a new
        optimizer state, any TRAIN_LENGTH). Ignored when model_dir already has a checkpoint.
      task: a registered seqio task (MIXTURE_OR_TASK_NAME), e.g. "lexjax.stdlib_code".
      train_steps, batch_size (global), train_length: the run's shape.
      checkpoint_every, log_every, eval_every (0: never): intervals in steps.
      eval_windows: validation windows per evaluation. seed: parameters, data order, dropout.
      mesh: device mesh string (see lexjax.partitioning), "" = data parallel over all devices.
    Returns:
      the last logged metrics.
    """
    spec = RunSpec(task, train_steps, batch_size, train_length, checkpoint_every, log_every,
                   eval_every, eval_windows, seed, mesh, keep_checkpoints)
    trainer = _Trainer(model_dir, spec, init_from)
    state = trainer.initial_state()
    start_step = int(state.step)
    truncate_metrics(model_dir, start_step)
    operative = _save_configs(model_dir)
    if start_step >= train_steps:
        trainer.checkpointer.close()
        return {"step": start_step}

    compiled, compile_seconds = trainer.compile_train_step()
    eval_step = trainer.compile_eval_step() if eval_every else None
    flops_per_step = (flops_lib.training_flops_per_step(trainer.model, batch_size, train_length)
                      or flops_lib.xla_flops(compiled))
    peak, peak_source = flops_lib.device_peak_flops()
    num_devices = trainer.mesh.size
    process_rows = batch_size // jax.process_count()
    batches = trainer.batches(start_step)
    key = jax.random.PRNGKey(seed)
    logger = MetricsLogger(model_dir, total_steps=train_steps, start_step=start_step,
                           progress=progress)
    if start_step == 0:
        logger.text("config/operative", operative)
    logger.message(
        f"{type(trainer.model).__name__}: "
        f"{state_lib.parameter_count(state.params) / 1e6:.2f}M parameters, mesh "
        f"{dict(trainer.mesh.shape)}, compiled in {compile_seconds:.1f}s, peak "
        f"{peak / 1e9:.1f} GFLOP/s per device ({peak_source}), from step {start_step}")

    meta = {"model": type(trainer.model).__name__, "fingerprint": trainer.fingerprint,
            "train_length": train_length, "task": task}
    last: dict = {}
    summed = None
    interval_start, interval_steps = time.perf_counter(), 0
    try:
        for step in range(start_step + 1, train_steps + 1):
            tokens = trainer.device_batch(next(batches)[:process_rows])
            state, metrics = compiled(state, tokens, key)
            summed = metrics if summed is None else jax.tree_util.tree_map(jnp.add, summed,
                                                                           metrics)
            interval_steps += 1
            final = step == train_steps
            if step % log_every == 0 or final:
                values = {k: float(v) / interval_steps for k, v in jax.device_get(summed).items()}
                values["learning_rate"] = float(metrics["learning_rate"])
                seconds = time.perf_counter() - interval_start
                _check_finite(values, step, trainer)
                values["tokens_per_sec"] = interval_steps * batch_size * train_length / seconds
                values["step_seconds"] = seconds / interval_steps
                if flops_per_step:
                    values["mfu"] = flops_per_step * interval_steps / seconds / (peak * num_devices)
                if eval_step and (step % eval_every == 0 or final):
                    validation = _validation_loss(trainer, eval_step, state.params)
                    if validation is not None:
                        values["validation_loss"] = validation
                logger.write(step, values)
                last = {"step": step, **values}
                summed, interval_steps = None, 0
                interval_start = time.perf_counter()
            if step % checkpoint_every == 0 or final:
                if not last or last["step"] != step:
                    _check_finite({k: float(v) for k, v in metrics.items()}, step, trainer)
                trainer.save(step, state, meta)
    finally:
        trainer.checkpointer.close()
        logger.close()
    return last


def _check_finite(values: dict, step: int, trainer: _Trainer) -> None:
    """The step is sound only if its loss, its gradients and the updated parameters are finite."""
    loss, grad_norm, param_norm = values["loss"], values["grad_norm"], values["param_norm"]
    if not all(math.isfinite(x) for x in (loss, grad_norm, param_norm)):
        kept = trainer.checkpointer.latest_step()
        last_good = ("no checkpoint was saved before it" if kept is None else
                     f"the last good checkpoint is step {kept} in "
                     f"{trainer.checkpointer.directory}")
        raise TrainingError(
            f"loss {loss}, gradient norm {grad_norm}, parameter norm {param_norm} at step "
            f"{step}; stopped without saving: {last_good}. Lower LEARNING_RATE, check "
            "the data, or train in float32 (DTYPE='float32')")
