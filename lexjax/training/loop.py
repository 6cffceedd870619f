"""The training loop: resume, the sharded train step, validation, metrics and checkpoints.

`train(model, config, model_dir, init_from)` takes the model and its `TrainConfig`; the run gins
bind both (`lexjax.training.train.model = %MODEL`, `lexjax.training.train.config =
@lexjax.training.TrainConfig()`), and `python -m lexjax.train` reads them
(`lexjax.runs.configured_training`). The loop never waits for the device except at log,
validation and checkpoint steps; throughput is timed from the device's results, and validation
time is not counted as training time.

Data: a model that keeps packed documents apart trains on packed rows with their segment ids; a
model that cannot (an FFT convolution, a recurrence over the row) on padded rows, one document
piece each; a state-carrying model on row streams (`lexjax.training.inputs`).

Safety: the run directory is checked and locked before anything is written (`lexjax.run_dir`);
SIGTERM and SIGINT end the run after the current step with a checkpoint of it (`interrupts`; in
a multi-host run a signal to any host stops every host after the same step); resume skips
a damaged latest checkpoint (set aside, the previous one restored) and a torn metrics line; a
resumed run rewrites `config.gin` only once it has saved a checkpoint under the new config.

Multi-host (`--distributed`): every process runs this loop on its own rows of each global batch
(`partitioning.host_batch_shard`); orbax writes the checkpoints from all processes together;
process 0 alone writes `config.gin`, metrics and TensorBoard events, and reports.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from typing import Any, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from lexjax import partitioning
from lexjax.errors import UserError
from lexjax.paths import run_path, write_text_atomic
from lexjax.training import checkpoints as ckpt_lib
from lexjax.training import flops as flops_lib
from lexjax.training import inputs
from lexjax.training import state as state_lib
from lexjax.training.config import TrainConfig
from lexjax.training.interrupts import Interrupted, StopRequests
from lexjax.training.metrics import MetricsLogger, truncate_metrics
from lexjax.run_dir import RunLock, check_writable
from lexjax.training.step import ShardedTrainStep

CONFIG_FILE = "config.gin"
OPERATIVE_CONFIG_FILE = "operative_config.gin"


class TrainingError(UserError, RuntimeError):
    """A run that cannot go on (NaN loss, a model_dir of another model, ...)."""


def _save_configs(model_dir: str) -> str:
    directory = run_path(model_dir)
    directory.mkdir(parents=True, exist_ok=True)
    operative = gin.operative_config_str()
    for name, text in ((CONFIG_FILE, gin.config_str()), (OPERATIVE_CONFIG_FILE, operative)):
        write_text_atomic(directory / name, text)
    return operative


class _Trainer:
    """The sharded step, data, validation, fingerprint and checkpointer of one run."""

    def __init__(self, model: nn.Module, config: TrainConfig, model_dir: str,
                 init_from: Optional[str]):
        self.model, self.config = model, config
        self.model_dir, self.init_from = model_dir, init_from
        self.carries_state = state_lib.carries_state(model)
        self.mesh = partitioning.make_mesh(config.mesh)
        self.step = ShardedTrainStep(model, config, self.mesh,
                                     inputs.segments_per_stream(model, config))
        self.abstract_state = self.step.abstract_state
        self.fingerprint = state_lib.params_fingerprint(self.abstract_state.params)
        self.checkpointer = ckpt_lib.Checkpointer(model_dir, max_to_keep=config.keep_checkpoints)
        # params -> the objective's validation metrics (`validation_loss`, ...), scored as
        # `evaluate` scores, on the validation split.
        self.validation = (self.step.objective.validator(model, config, self.mesh,
                                                         config.logical_axis_rules)
                           if config.eval_every else None)

    # -- state ------------------------------------------------------------------------------
    def initial_state(self, warn) -> state_lib.TrainState:
        """The latest checkpoint's state, else a fresh state (from `init_from`'s parameters).
        If the latest cannot be read but the one before it can, the latest is damaged: it is
        set aside (with a `warn`ing) and training resumes from the one before. Otherwise the
        latest's error is raised and nothing is moved."""
        steps = self.checkpointer.all_steps()
        if not steps:
            state = self.step.init(self.config.seed)
            if self.init_from:
                state = state.replace(params=self.init_from_params(state.params, warn))
            return state
        try:
            return self.restore(steps[-1])
        except ckpt_lib.CheckpointError as error:
            if len(steps) < 2:
                raise
            try:
                state = self.restore(steps[-2])
            except ckpt_lib.CheckpointError:
                raise error from None
            moved = self.checkpointer.set_aside(steps[-1])
            warn(f"warning: {error}; set aside as {moved}, resuming from step {steps[-2]}")
            return state

    def restore(self, step: int) -> state_lib.TrainState:
        meta = self.checkpointer.meta(step)
        if meta.get("parameters_only"):
            raise TrainingError(
                f"{self.model_dir} holds parameters without optimizer state (converted from "
                f"{meta.get('converted_from')}); train in a new directory: --init_from="
                f"{self.model_dir} --model_dir=NEW")
        if meta.get("fingerprint") != self.fingerprint:
            raise TrainingError(
                f"{self.model_dir} holds checkpoints of another model ({meta.get('model')}, "
                f"fingerprint {meta.get('fingerprint')}) than the configured one "
                f"({type(self.model).__name__}, {self.fingerprint}); use a fresh --model_dir, "
                "or --init_from to start from its weights")
        params, opt_state, _ = self.checkpointer.restore(
            self.abstract_state.params, self.abstract_state.opt_state, step)
        carry = (self.checkpointer.restore_carry(self.abstract_state.carry, step)
                 if self.carries_state else None)
        return state_lib.TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                                    opt_state=opt_state, carry=carry)

    def init_from_params(self, fresh: Any, warn) -> Any:
        """The latest parameters of the `init_from` run. Of another layout (fine-tuning with a
        new head: a classifier from a masked-LM run), the parameters both models have are
        taken from it and the others keep their fresh values (`warn` lists both kinds); a
        parameter of the same name and another shape is an error."""
        source = ckpt_lib.Checkpointer(self.init_from, read_only=True)
        meta = source.meta()
        if meta.get("fingerprint") in (None, self.fingerprint):
            return source.restore_params(self.abstract_state.params)
        params, fresh_names, unused = transfer_params(
            source.restore_params(None), fresh, self.init_from,
            heads=getattr(self.model, "head_parameters", ()))
        warn(f"--init_from {self.init_from} ({meta.get('model')}): "
             f"{len(fresh_names)} parameter arrays start fresh ({_names(fresh_names)}); "
             f"{len(unused)} of its arrays are not used ({_names(unused)})")
        return params

    def meta(self) -> dict:
        """The JSON record saved with every checkpoint."""
        return {"model": type(self.model).__name__, "fingerprint": self.fingerprint,
                "train_length": self.config.train_length, "task": self.config.data.task,
                "objective": self.step.objective.name}

    def save(self, step: int, state: state_lib.TrainState) -> None:
        self.checkpointer.save(step, state.params, state.opt_state, {**self.meta(), "step": step},
                               carry=state.carry)

    def check_finite(self, values: dict, step: int) -> None:
        """The step is sound only if its loss, its gradients and the updated parameters are
        finite; else a `TrainingError` naming the last good checkpoint."""
        loss, grad_norm, param_norm = values["loss"], values["grad_norm"], values["param_norm"]
        if all(math.isfinite(x) for x in (loss, grad_norm, param_norm)):
            return
        kept = self.checkpointer.latest_step()
        last_good = ("no checkpoint was saved before it" if kept is None else
                     f"the last good checkpoint is step {kept} in {self.checkpointer.directory}")
        raise TrainingError(
            f"loss {loss}, gradient norm {grad_norm}, parameter norm {param_norm} at step "
            f"{step}; stopped without saving: {last_good}. Lower LEARNING_RATE, check "
            "the data, or train in float32 (DTYPE='float32')")


def transfer_params(saved: Any, fresh: Any, source: str, heads: tuple[str, ...] = ()
                    ) -> tuple[Any, list[str], list[str]]:
    """`fresh` (a parameter tree of arrays) with every array that `saved` holds under the same
    path and shape; returns (the tree, the paths kept fresh, the paths of `saved` not used).
    Arrays under the top-level names `heads` (a model's `head_parameters`: a classifier of
    another class count) stay fresh when their shapes differ.

    Raises:
      TrainingError: if another array of the same path has another shape, or nothing is shared.
    """
    saved_leaves = {jax.tree_util.keystr(p): x
                    for p, x in jax.tree_util.tree_flatten_with_path(saved)[0]}
    paths, leaves, fresh_names = [], [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(fresh)[0]:
        name = jax.tree_util.keystr(path)
        paths.append(name)
        if name not in saved_leaves:
            fresh_names.append(name)
            leaves.append(leaf)
            continue
        value = saved_leaves[name]
        if tuple(value.shape) != tuple(leaf.shape) and getattr(path[0], "key", None) in heads:
            fresh_names.append(name)
            leaves.append(leaf)
            continue
        if tuple(value.shape) != tuple(leaf.shape):
            raise TrainingError(
                f"--init_from {source}: parameter {name} has shape {tuple(value.shape)} there "
                f"and {tuple(leaf.shape)} here: the model sizes differ; fine-tune with the "
                "sizes in that run's config.gin")
        leaves.append(jax.device_put(jnp.asarray(value, leaf.dtype), leaf.sharding))
    if len(fresh_names) == len(paths):
        raise TrainingError(f"--init_from {source} shares no parameter with this model "
                            "(another architecture); start it fresh or pick a matching run")
    unused = sorted(set(saved_leaves) - (set(paths) - set(fresh_names)))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(fresh), leaves), \
        fresh_names, unused


def _names(paths: list[str], shown: int = 4) -> str:
    more = f", ... {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(paths[:shown]) + more if paths else "none"


@gin.register(module="lexjax.training", allowlist=["model", "config"])
def train(model: nn.Module, config: TrainConfig, model_dir: str,
          init_from: Optional[str] = None, *, progress: Optional[bool] = None) -> dict:
    """Trains `model` as `config` says into `model_dir`, resuming from its latest checkpoint.

    Args:
      model: the LM (gin: `lexjax.training.train.model = %MODEL`).
      config: the run (gin: `lexjax.training.train.config = @lexjax.training.TrainConfig()`).
      model_dir: where checkpoints, metrics.jsonl, TensorBoard events and configs go; checked
        writable and locked against a second trainer for the whole run.
      init_from: another run's model_dir: start from its latest parameters (fine-tuning; a new
        optimizer state, any TRAIN_LENGTH). Ignored when model_dir already has a checkpoint.
      progress: show a progress bar (default: when stderr is a terminal; else plain lines).
    Returns:
      the last logged metrics.
    Raises:
      Interrupted: after SIGTERM / SIGINT, once the step reached is checkpointed.
    """
    partitioning.initialize_distributed()
    writer = partitioning.is_primary_process()
    if writer:
        check_writable(model_dir)
    with RunLock(model_dir) if writer else contextlib.nullcontext():
        return _train(model, config, model_dir, init_from, progress)


def _train(model: nn.Module, config: TrainConfig, model_dir: str, init_from: Optional[str],
           progress: Optional[bool]) -> dict:
    trainer = _Trainer(model, config, model_dir, init_from)
    primary = partitioning.is_primary_process()  # writes the run's files and reports
    save_configs = _save_configs if primary else lambda _: gin.operative_config_str()
    logger = None
    try:
        state = trainer.initial_state(warn=_print_stderr if primary else _ignore)
        start_step = int(state.step)
        if primary:
            truncate_metrics(model_dir, start_step)
        fresh = start_step == 0
        operative = save_configs(model_dir) if fresh else None  # a resume: after its first save
        if start_step >= config.train_steps:
            _print_stderr(f"nothing to train: {model_dir} is at step {start_step} of "
                          f"TRAIN_STEPS {config.train_steps}; raise TRAIN_STEPS to go on")
            return {"step": start_step}

        compiled, compile_seconds = trainer.step.compile()
        flops_per_step = (flops_lib.training_flops_per_step(model, config.batch_size,
                                                            config.train_length)
                          or flops_lib.xla_flops(compiled))
        peak, peak_source = flops_lib.device_peak_flops()
        batches = inputs.training_batches(model, config, start_step)
        key = jax.random.PRNGKey(config.seed)
        logger = MetricsLogger(model_dir, total_steps=config.train_steps, start_step=start_step,
                               progress=progress, enabled=primary)
        if fresh:
            logger.text("config/operative", operative)
        logger.message(
            f"{type(model).__name__}: {state_lib.parameter_count(state.params) / 1e6:.2f}M "
            f"parameters, mesh {dict(trainer.mesh.shape)}, compiled in {compile_seconds:.1f}s, "
            f"peak {peak / 1e9:.1f} GFLOP/s per device ({peak_source}), from step {start_step}")

        last: dict = {}
        summed = None
        interval_start, interval_steps = time.perf_counter(), 0
        saved_step = start_step
        with StopRequests() as stop:
            for step in range(start_step + 1, config.train_steps + 1):
                state, metrics = compiled(state, trainer.step.device_batch(next(batches)), key)
                summed = metrics if summed is None else jax.tree_util.tree_map(
                    jnp.add, summed, metrics)
                interval_steps += 1
                record = {}
                if config.logs_at(step):
                    means = jax.device_get(summed)  # waits for the interval's last step
                    seconds = time.perf_counter() - interval_start
                    record = {k: float(v) / interval_steps for k, v in means.items()}
                    record["learning_rate"] = float(metrics["learning_rate"])
                    trainer.check_finite(record, step)
                    record["tokens_per_sec"] = interval_steps * config.tokens_per_step / seconds
                    record["step_seconds"] = seconds / interval_steps
                    if flops_per_step:
                        achieved = flops_per_step * interval_steps / seconds / trainer.mesh.size
                        record["mfu"], peak = flops_lib.utilization(achieved, peak, peak_source)
                    summed, interval_steps = None, 0
                    interval_start = time.perf_counter()
                if config.evaluates_at(step):
                    jax.block_until_ready(state.params)  # the interval's steps are done
                    validation_start = time.perf_counter()
                    record.update(trainer.validation(state.params))
                    interval_start += time.perf_counter() - validation_start  # not training
                if record:
                    logger.write(step, record)
                    last = {"step": step, **record}
                stopping = stop.agreed()  # read once: a signal may land at any line
                if config.saves_at(step) or stopping:
                    if "loss" not in record:
                        trainer.check_finite({k: float(v) for k, v in metrics.items()}, step)
                    trainer.save(step, state)
                    saved_step = step
                    if operative is None:
                        trainer.checkpointer.wait()
                        operative = save_configs(model_dir)
                if stopping:
                    trainer.checkpointer.wait()
                    message = (f"stopped by {signal.Signals(stopping).name} at step {step}; "
                               f"checkpoint saved in {trainer.checkpointer.directory}; run the "
                               "same command to resume")
                    logger.message(logger.summary())
                    raise Interrupted(message, stopping)
        logger.message(logger.summary(f"last checkpoint: step {saved_step}"))
        return last
    finally:
        trainer.checkpointer.close()
        if logger is not None:
            logger.close()


def _print_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _ignore(text: str) -> None:
    """The warnings of processes other than 0 (process 0 prints the same ones)."""
