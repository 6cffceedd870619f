"""The train state and its creation: parameters (float32, unboxed), optimizer state, step.

Every parameter must carry logical axis names (`nn.with_logical_partitioning`); state creation
refuses a model with an unannotated parameter, as t5x does, so the sharding rules always apply.
"""
from __future__ import annotations

import hashlib
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """`step` int32 scalar, `params` and `opt_state` pytrees of arrays; `carry`: what a
    state-carrying model (one with `init_carry`) hands from one step's segment to the next
    (`{"model": the model's carry, "last_token": int32 [batch]}`), else None."""

    step: jnp.ndarray
    params: Any
    opt_state: Any
    carry: Any = None


class UnannotatedParameterError(ValueError):
    """A parameter without logical axis names."""


def example_inputs(model: nn.Module, batch_size: int, length: int) -> jax.ShapeDtypeStruct:
    """What `model.init` and the train step feed the model: its own `input_spec(batch_size)`
    where it has one (a ViT's images), else int32 tokens `[batch_size, length]`."""
    spec = getattr(model, "input_spec", None)
    if callable(spec):
        return spec(batch_size)
    return jax.ShapeDtypeStruct((batch_size, length), jnp.int32)


def boxed_params(model: nn.Module, example_tokens: jax.ShapeDtypeStruct) -> Any:
    """Abstract (shape-only) boxed parameters, with their `nn.Partitioned` axis metadata."""
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), example_tokens)
    return variables["params"]


def check_logical_axes(boxed: Any) -> None:
    """Raises `UnannotatedParameterError` naming every parameter without logical axis names."""
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    missing = [jax.tree_util.keystr(path) for path, leaf in leaves
               if not isinstance(leaf, nn.Partitioned)]
    if missing:
        raise UnannotatedParameterError(
            f"parameters without logical axis names: {missing[:5]}; create them with "
            "nn.with_logical_partitioning(init, axes) so sharding rules can place them")


def carries_state(model: nn.Module) -> bool:
    """Whether the model carries state across training segments (it defines `init_carry`)."""
    return callable(getattr(model, "init_carry", None))


def initial_carry(model: nn.Module, batch_size: int) -> Any:
    """The train-state carry of a fresh stream for a state-carrying model, its leaves boxed with
    logical axis names (`model.carry_axes()`; the batch dimension is `activation_batch`) so the
    sharding rules place it like activations; None for other models."""
    if not carries_state(model):
        return None
    carry = {"model": model.init_carry(batch_size),
             "last_token": jnp.zeros((batch_size,), jnp.int32)}
    axes = {"model": model.carry_axes(), "last_token": ("activation_batch",)}
    return jax.tree_util.tree_map(lambda x, names: nn.LogicallyPartitioned(x, names=names),
                                  carry, axes)


def params_fingerprint(params: Any) -> str:
    """A short hash of the parameter names and shapes: tells two models apart in a model_dir."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    text = ";".join(f"{jax.tree_util.keystr(p)}:{tuple(x.shape)}" for p, x in leaves)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def parameter_count(params: Any) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
