"""The run configuration: one frozen, gin-configurable object per training run.

`TrainConfig` holds everything `lexjax.training.train` does besides the model: the data, the
shape of the run, its intervals, seed, mesh, sharding rules and optimizer. A run gin binds it
(configs/runs/quickstart.gin):

    lexjax.training.train.model = %MODEL
    lexjax.training.train.config = @lexjax.training.TrainConfig()
    lexjax.training.TrainConfig.train_steps = %TRAIN_STEPS
    ...

Every field is checked once, when the object is built, and a bad value is a one-line
`ConfigError` naming the macro (or binding) to fix. The trainer, the bench and
`lexjax.runs.load_run` read this same object (`lexjax.runs.configured_training`); no library
code reads gin at run time.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import TYPE_CHECKING, Any, Optional

import gin

from lexjax import partitioning
from lexjax.errors import ConfigError
from lexjax.objectives import CausalLM, Objective

if TYPE_CHECKING:  # lexjax.data imports TensorFlow; the config only holds its DataConfig
    from lexjax.data import DataConfig

# The run macros of configs/runs/*.gin, by field: error messages name what a user sets.
MACROS = {"train_steps": "TRAIN_STEPS", "batch_size": "BATCH_SIZE",
          "train_length": "TRAIN_LENGTH", "checkpoint_every": "CHECKPOINT_EVERY",
          "log_every": "LOG_EVERY", "eval_every": "EVAL_EVERY", "seed": "SEED", "mesh": "MESH",
          "learning_rate": "LEARNING_RATE", "warmup_steps": "WARMUP_STEPS"}


def _name(owner: Any, field: str) -> str:
    """The macro a run gin binds to the field, else the field's own gin binding."""
    macro = MACROS.get(field)
    return f"{macro} ({field})" if macro else f"lexjax.training.{type(owner).__name__}.{field}"


def _check_int(owner: Any, field: str, minimum: int) -> None:
    value = getattr(owner, field)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{_name(owner, field)} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{_name(owner, field)} must be at least {minimum}, got {value}")
    object.__setattr__(owner, field, int(value))  # numpy ints compare and hash alike


def _check_float(owner: Any, field: str, low: float, high: float = float("inf"),
                 low_open: bool = False) -> None:
    value = getattr(owner, field)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{_name(owner, field)} must be a number, got {value!r}")
    if not (low < value if low_open else low <= value) or value > high:
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise ConfigError(f"{_name(owner, field)} must lie in {bounds}, got {value}")
    object.__setattr__(owner, field, float(value))


@gin.register(module="lexjax.training")
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay (`lexjax.training.optimizer`).

    Attributes:
      learning_rate: the peak rate (LEARNING_RATE).
      warmup_steps: linear warmup from 0 (WARMUP_STEPS; capped at a tenth of the run).
      final_fraction: the cosine decay ends at this fraction of the peak.
      weight_decay: decoupled, on matrices only. clip_norm: global gradient-norm clip.
      b1, b2, eps: Adam's moments.
    """

    learning_rate: float = 1e-3
    warmup_steps: int = 1000
    final_fraction: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-9

    def __post_init__(self):
        _check_float(self, "learning_rate", 0.0, low_open=True)
        _check_int(self, "warmup_steps", 0)
        _check_float(self, "final_fraction", 0.0, 1.0)
        _check_float(self, "weight_decay", 0.0)
        _check_float(self, "clip_norm", 0.0, low_open=True)
        for field in ("b1", "b2"):
            _check_float(self, field, 0.0, 1.0)
        _check_float(self, "eps", 0.0)


@gin.register(module="lexjax.training")
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What one training run does, besides its model.

    Attributes:
      data: the text and its tokenization (`lexjax.data.DataConfig`: MIXTURE_OR_TASK_NAME, ...).
      train_steps, batch_size (global), train_length: the run's shape.
      checkpoint_every, log_every: intervals in steps.
      eval_every: validation interval in steps (0: never); validation lands on every multiple
        of it (and on the last step) whatever `log_every` is.
      eval_windows: validation windows (of `train_length` tokens) per validation.
      seed: parameters, data order, dropout.
      mesh: device mesh string (see `lexjax.partitioning`), "" = data parallel.
      logical_axis_rules: logical axis name -> mesh axes (`partitioning.LOGICAL_AXIS_RULES`).
      compiler_options: XLA options for the train step, over the platform's defaults
        (`partitioning.TPU_COMPILER_OPTIONS` on TPU), e.g.
        `{"xla_tpu_enable_windowed_einsum_for_all_gather": True}`.
      keep_checkpoints: the newest checkpoints kept on disk.
      optimizer: the `OptimizerConfig`.
      objective: what the model learns (`lexjax.objectives`: `CausalLM()` by default,
        `MaskedLM()`, `Classification()`).
    """

    data: "DataConfig"
    train_steps: int
    batch_size: int
    train_length: int
    checkpoint_every: int = 1000
    log_every: int = 50
    eval_every: int = 0
    eval_windows: int = 64
    seed: int = 0
    mesh: str = ""
    logical_axis_rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES
    compiler_options: Optional[dict] = None
    keep_checkpoints: int = 3
    optimizer: OptimizerConfig = OptimizerConfig()
    objective: Objective = CausalLM()

    def __post_init__(self):
        if not hasattr(self.data, "task"):
            raise ConfigError(f"TrainConfig.data must be a lexjax.data.DataConfig, got "
                              f"{self.data!r}; a run gin binds it (configs/runs/quickstart.gin)")
        for field in ("train_steps", "batch_size", "train_length", "checkpoint_every",
                      "log_every", "eval_windows", "keep_checkpoints"):
            _check_int(self, field, 1)
        for field in ("eval_every", "seed"):
            _check_int(self, field, 0)
        if not isinstance(self.mesh, str):
            raise ConfigError(f"MESH (mesh) must be a string such as 'data:2,tensor:4', got "
                              f"{self.mesh!r}")
        if not isinstance(self.optimizer, OptimizerConfig):
            raise ConfigError(f"TrainConfig.optimizer must be an OptimizerConfig, got "
                              f"{self.optimizer!r}")
        if not isinstance(self.objective, Objective):
            raise ConfigError(f"TrainConfig.objective must be a lexjax.objectives objective "
                              f"(CausalLM, MaskedLM, Classification), got {self.objective!r}")
        if self.compiler_options is not None and not (
                isinstance(self.compiler_options, dict)
                and all(isinstance(k, str) for k in self.compiler_options)):
            raise ConfigError(f"TrainConfig.compiler_options must map XLA option names to "
                              f"values, e.g. {{'xla_tpu_enable_windowed_einsum_for_all_gather': "
                              f"True}}; got {self.compiler_options!r}")
        object.__setattr__(self, "logical_axis_rules",
                           partitioning.check_rules(self.logical_axis_rules))

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.train_length

    def evaluates_at(self, step: int) -> bool:
        """Whether validation runs after `step` (every `eval_every` steps, and the last one)."""
        return bool(self.eval_every) and (step % self.eval_every == 0 or step == self.train_steps)

    def logs_at(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.train_steps

    def saves_at(self, step: int) -> bool:
        return step % self.checkpoint_every == 0 or step == self.train_steps

