"""Pallas attention kernels over a block-sparse `MaskSpec` walk (the FlashAttention-2 algorithm):
the public entry point and its `custom_vjp`.

`pallas_attention` takes `attend`'s layout (`[batch, length, heads, head_dim]`), moves to kernel
layout (`[batch, heads, n_pad, d]`, padded to whole blocks), runs the lowering's forward kernel,
and differentiates with the lowering's dq and dk/dv kernels (FlashAttention-2: the backward
recomputes each visited block's probabilities from the saved log-sum-exp). Lowerings:

- "tpu": Pallas Mosaic TPU kernels (`kernels/tpu.py`); with `interpret=True` the same kernels run
  on any JAX backend (the CPU path of `attend(impl="pallas")`).
- "gpu": Pallas Mosaic GPU kernels for Hopper (`kernels/gpu.py`); `interpret=True` runs them in
  Pallas' GPU interpreter.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lexjax import partitioning
from lexjax.attention.kernels import gpu, tpu
from lexjax.attention.kernels.bias import HeadBias, offset_table
from lexjax.attention.kernels.geometry import BlockGrid
from lexjax.attention.kernels.plan import KernelPlan
from lexjax.attention.masks import MaskSpec
from lexjax.errors import ConfigError

LOWERINGS = {"tpu": tpu, "gpu": gpu}

# (block_q, block_kv) defaults: TPU blocks are multiples of the 128-lane vreg width; GPU blocks
# are multiples of the 64-row WGMMA tile and keep two K/V stages well inside shared memory.
DEFAULT_BLOCKS = {"tpu": (128, 128), "gpu": (64, 64)}
BLOCK_MULTIPLE = {"tpu": 128, "gpu": 64}
INTERPRET_BLOCK_MULTIPLE = 8


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def block_sizes(lowering: str, length: int, block_q: Optional[int], block_kv: Optional[int],
                interpret: bool) -> tuple[int, int]:
    """Resolved (block_q, block_kv); raises ValueError for blocks the lowering cannot tile."""
    default_q, default_kv = DEFAULT_BLOCKS[lowering]
    if interpret and lowering == "tpu":
        # Interpret mode has no tiling constraint: keep short test sequences in one block.
        short = _round_up(length, INTERPRET_BLOCK_MULTIPLE)
        default_q, default_kv = min(default_q, short), min(default_kv, short)
    blocks = (block_q or default_q, block_kv or default_kv)
    multiple = INTERPRET_BLOCK_MULTIPLE if (interpret and lowering == "tpu") else \
        BLOCK_MULTIPLE[lowering]
    for name, size in zip(("block_q", "block_kv"), blocks):
        if size % multiple:
            raise ValueError(f"{name}={size} does not tile the {lowering} lowering"
                             f"{' (interpret)' if interpret else ''}: use a multiple of "
                             f"{multiple}")
    return blocks


def _to_kernel_layout(x: jnp.ndarray, n_pad: int, d_pad: int) -> jnp.ndarray:
    """`[b, n, h, d]` -> `[b, h, n_pad, d_pad]`, zero-padded."""
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, [(0, 0), (0, 0), (0, n_pad - x.shape[2]), (0, d_pad - x.shape[3])])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(plan: KernelPlan, lowering: str, q, k, v, segment_ids, bias_input):
    out, _ = LOWERINGS[lowering].forward(plan, q, k, v, segment_ids, bias_input)
    return out


def _attention_fwd(plan, lowering, q, k, v, segment_ids, bias_input):
    values = jax.custom_derivatives.custom_vjp_primal_tree_values
    param_grads = bias_input is not None and bias_input.perturbed
    if param_grads and plan.bias == "table":
        raise ValueError(
            "the relative bias passed to a Pallas attention kernel has trainable parameters but "
            "is a plain callable; kernels differentiate only HeadBias parameters: build it as "
            "lexjax.attention.kernels.HeadBias(fn, params) (see lexjax/positions for examples)")
    q, k, v, segment_ids, bias_input = values((q, k, v, segment_ids, bias_input))
    out, lse = LOWERINGS[lowering].forward(plan, q, k, v, segment_ids, bias_input)
    grad_target = bias_input if param_grads else None
    return out, (q, k, v, segment_ids, bias_input, grad_target, out, lse)


def _attention_bwd(plan, lowering, residuals, d_out):
    q, k, v, segment_ids, bias_input, grad_target, out, lse = residuals
    if isinstance(d_out, jax.custom_derivatives.SymbolicZero):
        d_out = jnp.zeros(out.shape, out.dtype)
    kernels = LOWERINGS[lowering]
    # delta = rowsum(dO * O), in the layout of the lowering's log-sum-exp (a row or a column)
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1).reshape(
        lse.shape)
    d_out = d_out.astype(q.dtype)
    dq, dtheta = kernels.dq(plan, q, k, v, d_out, lse, delta, segment_ids, bias_input,
                             param_grads=grad_target is not None)
    dk, dv = kernels.dkv(plan, q, k, v, d_out, lse, delta, segment_ids, bias_input)
    return dq, dk, dv, None, dtheta


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


def _mesh_specs(q_shape, kv_heads: int):
    """(mesh, batch axes, head axes) to run the kernels per device, or None.

    Kernels are opaque to XLA's partitioner (it would gather every operand onto every device), so
    under a mesh (`partitioning.mesh_context`, as the trainer, the bench and evaluation trace,
    or `jax.set_mesh`) with flax logical-axis rules the kernels run inside `shard_map` over the
    mesh axes of `activation_batch` and `activation_heads` (heads only when both query and
    key/value heads divide, which keeps each shard's GQA groups whole). The sequence axis stays
    whole: every query block needs its keys.
    """
    mesh = partitioning.tracing_mesh()
    if mesh is None:
        return None
    batch_axes, heads_axes, length_axes = (
        nn.logical_to_mesh_axes((name,))[0]
        for name in ("activation_batch", "activation_heads", "activation_length"))
    split = [a for a in ((length_axes,) if isinstance(length_axes, str) else length_axes or ())
             if a in mesh.shape and mesh.shape[a] > 1]
    if split:
        raise ConfigError(
            f"the Pallas attention kernels run on whole sequences, but the mesh splits the "
            f"sequence over {split}: use attention_impl='xla' with a sequence mesh axis "
            f"(XLA gathers keys and values), or a mesh without one")

    def usable(axes, sizes):
        axes = tuple(a for a in ((axes,) if isinstance(axes, str) else (axes or ()))
                     if a in mesh.shape and mesh.shape[a] > 1)
        ways = math.prod(mesh.shape[a] for a in axes)
        return axes if axes and all(size % ways == 0 for size in sizes) else ()

    batch_axes = usable(batch_axes, (q_shape[0],))
    heads_axes = usable(heads_axes, (q_shape[2], kv_heads))
    if not batch_axes and not heads_axes:
        return None
    return mesh, batch_axes or None, heads_axes or None


def pallas_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, mask: MaskSpec,
                    bias: Optional[Union[HeadBias, Callable]] = None,
                    segment_ids: Optional[jnp.ndarray] = None, block_q: Optional[int] = None,
                    block_kv: Optional[int] = None, lowering: str = "tpu",
                    interpret: bool = False) -> jnp.ndarray:
    """Self-attention under `mask` with Pallas kernels that visit only the blocks it needs.

    Args:
      q: `[batch, length, heads, head_dim]`; k, v: `[batch, length, kv_heads, head_dim]`,
        heads a multiple of kv_heads (grouped-query attention); float32 or bfloat16.
      mask: which keys each query sees; global tokens are refused (the kernels walk one
        contiguous key-block range per query block).
      bias: None, a `HeadBias` (evaluated inside the kernel; its params get gradients), or any
        callable `rel -> [heads, *rel.shape]` (tabulated per block offset; not differentiable).
      segment_ids: optional int32 `[batch, length]`; queries see only keys of their own segment
        (packed sequences).
      block_q, block_kv: block lengths (defaults per lowering, `DEFAULT_BLOCKS`).
      lowering: "tpu" or "gpu" kernels.
      interpret: run in Pallas interpret mode (any platform, e.g. CPU tests).
    Returns:
      `[batch, length, heads, head_dim]` in q's dtype. Under a mesh with logical-axis rules the
      kernels run per device on their batch and head shards (`_mesh_specs`).
    """
    if mask.global_tokens:
        raise ValueError(f"{mask}: global tokens are not supported by the Pallas kernels yet; use "
                         "attention_impl='xla' (blocked XLA skips the unneeded blocks too)")
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown Pallas lowering {lowering!r}; have {sorted(LOWERINGS)}")
    b, n, heads, d = q.shape
    if k.shape[1] != n:
        raise ValueError(f"Pallas attention is self-attention: query length {n} != key length "
                         f"{k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    bq, bk = block_sizes(lowering, n, block_q, block_kv, interpret)
    grid = BlockGrid(mask=mask, length=n, block_q=bq, block_kv=bk)
    if lowering == "gpu":
        gpu.check(grid, q.dtype, d)

    kind, fn, table, bias_input = "none", None, None, None
    if isinstance(bias, HeadBias):
        if bias.params.ndim != 2 or bias.params.shape[0] != heads:
            raise ValueError(f"HeadBias.params must be [heads={heads}, P], got "
                             f"{bias.params.shape}")
        kind, fn = "head", bias.fn
        bias_input = jnp.asarray(bias.params, jnp.float32)
    elif bias is not None:
        bias_input, table = offset_table(bias, grid)
        if bias_input.shape[0] != heads:
            raise ValueError(f"bias returned {bias_input.shape[0]} heads, expected {heads}")
        kind = "table"
    if segment_ids is not None:
        if segment_ids.shape != (b, n):
            raise ValueError(f"segment_ids must be [batch, length] = {(b, n)}, got "
                             f"{segment_ids.shape}")
        segment_ids = jnp.pad(segment_ids.astype(jnp.int32),
                              [(0, 0), (0, grid.padded_length - n)],
                              constant_values=-1)[:, None, :]

    def local(q, k, v, segment_ids, bias_input):
        """The kernels on one device's `[b, n, h, d]` shards."""
        plan = KernelPlan(grid=grid, num_heads=q.shape[2], num_kv_heads=k.shape[2],
                          scale=d ** -0.5, segmented=segment_ids is not None, bias=kind,
                          bias_fn=fn, num_params=0 if kind != "head" else bias_input.shape[1],
                          table=table, interpret=interpret)
        n_pad, d_pad = grid.padded_length, LOWERINGS[lowering].padded_head_dim(d)
        out = _attention(plan, lowering, *(_to_kernel_layout(x, n_pad, d_pad) for x in (q, k, v)),
                         segment_ids, bias_input)
        return jnp.swapaxes(out[:, :, :n, :d], 1, 2)

    sharded = _mesh_specs(q.shape, k.shape[2])
    if sharded is None:
        return local(q, k, v, segment_ids, bias_input)
    mesh, batch_axes, heads_axes = sharded
    qkv = PartitionSpec(batch_axes, None, heads_axes, None)
    in_specs = (qkv, qkv, qkv, PartitionSpec(batch_axes, None, None),
                PartitionSpec(heads_axes) if kind != "none" else None)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=qkv,
                         check_vma=False)(q, k, v, segment_ids, bias_input)
