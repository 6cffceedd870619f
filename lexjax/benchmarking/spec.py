"""What a bench measures: the configured model, optimizer and batch shape of the training run
that the gin files describe (the values `lexjax.training.train` would receive)."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Optional

import flax.linen as nn
import gin
import optax

from lexjax.config import ConfigError, build_configured_model
from lexjax.training.loop import train
from lexjax.training.optimizer import make_optimizer


def train_setting(name: str) -> Any:
    """The value gin gives `lexjax.training.train`'s parameter `name` (macros resolved), else
    its default; `ConfigError` if it is required and unbound."""
    try:
        value = gin.query_parameter(f"lexjax.training.train.{name}")
    except ValueError:
        value = inspect.signature(train).parameters[name].default
        if value is inspect.Parameter.empty or value is gin.REQUIRED:
            raise ConfigError(f"the bench needs lexjax.training.train.{name} (a run gin such as "
                              "configs/runs/quickstart.gin binds it)") from None
        return value
    if isinstance(value, gin.config.ConfigurableReference):
        value = value.scoped_configurable_fn()
    return value


@dataclasses.dataclass
class BenchSpec:
    """The model and one training step's shape; `task` None means random tokens."""

    model: nn.Module
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    batch_size: int
    length: int
    seed: int
    task: Optional[str]

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.length


def spec_from_gin() -> BenchSpec:
    """Reads the parsed gin config (see `lexjax.config.parse_gin`)."""
    batch_size, length = int(train_setting("batch_size")), int(train_setting("train_length"))
    try:
        task = train_setting("task")
    except ConfigError:
        task = None
    model = build_configured_model()
    optimizer, schedule = make_optimizer(total_steps=int(train_setting("train_steps")))
    return BenchSpec(model=model, optimizer=optimizer, schedule=schedule, batch_size=batch_size,
                     length=length, seed=int(train_setting("seed")), task=task)
