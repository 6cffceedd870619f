"""The objective interface, and the causal language model (the zoo's default objective).

An objective is a frozen, gin-registered dataclass. The trainer, the bench and `evaluate` call:

    objective = config.objective.prepare(model, config.data)   # checks; resolves token ids
    spec = objective.batch_spec(model, batch_size, length)      # ShapeDtypeStructs of a batch
    loss, metrics, carry = objective.loss(model, params, batch, rng=rng, carry=carry)  # in jit
    batches = objective.training_batches(model, config, start_step)   # numpy, this host's rows
    validate = objective.validator(model, config, mesh, rules)  # params -> {"validation_...": x}

`metrics` are scalars averaged over the batch (the loop averages them again over each logging
interval); `loss` is what the optimizer minimises.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from lexjax.errors import ConfigError
from lexjax.losses import mean_loss, shift_right

if TYPE_CHECKING:
    from lexjax.training.config import TrainConfig

Batch = dict  # name -> array; numpy on the host, jax.Array in the step
Metrics = dict  # name -> float32 scalar


def is_bidirectional(model: nn.Module) -> bool:
    """Whether the model sees the whole input at every position (an encoder); any flax module
    that is not a `LanguageModel` counts as causal."""
    return bool(getattr(model, "bidirectional", False))


class Objective(abc.ABC):
    """What a run trains a model to do (see the module docstring). Subclasses are frozen
    dataclasses registered with gin under `lexjax.objectives`."""

    #: how run directories, metrics and messages name the objective
    name: ClassVar[str] = "objective"

    def prepare(self, model: nn.Module, data: Any) -> "Objective":
        """This objective checked against `model` and the run's `DataConfig`, with any
        data-dependent value (token ids, class counts) resolved; raises `ConfigError`."""
        return self

    @abc.abstractmethod
    def batch_spec(self, model: nn.Module, batch_size: int, length: int) -> Batch:
        """`ShapeDtypeStruct`s of one global batch: name -> `[batch, ...]`."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, params: Any, batch: Batch, *, rng: jax.Array,
             carry: Any = None) -> tuple[jnp.ndarray, Metrics, Any]:
        """(the loss to minimise, extra scalar metrics, the next carry), traced in the step."""

    @abc.abstractmethod
    def training_batches(self, model: nn.Module, config: "TrainConfig", start_step: int = 0
                         ) -> Iterator[Batch]:
        """This host's numpy rows of the global batches from `start_step` on."""

    @abc.abstractmethod
    def validator(self, model: nn.Module, config: "TrainConfig", mesh, rules
                  ) -> Callable[[Any], dict[str, float]]:
        """`params -> {"validation_<metric>": value}` on the validation split."""


class TokenObjective(Objective):
    """An objective on rows of the token stream (causal and masked LM): `{"targets"}`, plus
    `{"segment_ids"}` for models without carried state, int32 `[batch, length]` each
    (`lexjax.training.inputs.token_batches`: packed, padded or row streams, by model)."""

    def batch_spec(self, model, batch_size, length):
        from lexjax.training.state import carries_state
        shape = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
        if carries_state(model):
            return {"targets": shape}
        return {"targets": shape, "segment_ids": shape}

    def training_batches(self, model, config, start_step=0):
        from lexjax.training.inputs import token_batches
        return token_batches(model, config, start_step)


@gin.register(module="lexjax.objectives")
@dataclasses.dataclass(frozen=True)
class CausalLM(TokenObjective):
    """Next-token prediction (`lexjax.losses`: the model reads the tokens shifted right, BOS at
    every segment start, and is scored on every non-padding token).

    A state-carrying model (`state.carry` not None) reads the carry of the previous step's
    segment and returns the next one, with no gradient through it (truncated backpropagation
    through time); its first input token is the previous segment's last token instead of BOS.
    """

    name = "causal_lm"

    def prepare(self, model, data):
        if is_bidirectional(model):
            raise ConfigError(
                f"{type(model).__name__} is bidirectional: a next-token loss would let it read "
                "the tokens it predicts. Pre-train it with the masked-LM objective "
                "(configs/runs/mlm_quickstart.gin) or fine-tune a classifier "
                "(configs/runs/classify_quickstart.gin)")
        return self

    def loss(self, model, params, batch, *, rng, carry=None):
        from lexjax.training.inputs import reads_segment_ids
        targets, segments = batch["targets"], batch.get("segment_ids")
        kwargs = dict(deterministic=False, rngs={"dropout": rng})
        if carry is None:
            if reads_segment_ids(model):
                kwargs["segment_ids"] = segments
            logits = model.apply({"params": params}, shift_right(targets, segments), **kwargs)
            return mean_loss(logits, targets, segments), {}, None
        inputs = shift_right(targets).at[:, 0].set(carry["last_token"])
        logits, model_carry = model.apply({"params": params}, inputs, carry=carry["model"],
                                          return_carry=True, **kwargs)
        next_carry = {"model": jax.lax.stop_gradient(model_carry), "last_token": targets[:, -1]}
        return mean_loss(logits, targets), {}, next_carry

    def validator(self, model, config, mesh, rules):
        from lexjax import data
        from lexjax.evaluation.scoring import Scorer
        windows = data.eval_windows(config.data, length=config.train_length, split="validation",
                                    max_windows=config.eval_windows)
        scorer = Scorer(model, batch_size=config.batch_size, mesh=mesh, rules=rules)
        return lambda params: {"validation_loss": scorer.mean_loss({"params": params}, windows)}
