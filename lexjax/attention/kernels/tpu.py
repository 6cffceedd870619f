"""Pallas TPU (Mosaic) kernels: forward, dq and dk/dv; they also run in interpret mode on CPU.

Layout: q `[batch, heads, n_pad, d]`, k/v `[batch, kv_heads, n_pad, d]`; what belongs to a query
row (the log-sum-exp, delta, the query's segment id) as a column `[batch, heads or 1, n_pad, 1]`,
the keys' segment ids as a row `[batch, 1, 1, n_pad]`, so each block reads them in the
orientation of its scores (query blocks `(block_q, 1)`, key blocks `(1, block_kv)`) and no
kernel moves data between lanes and sublanes (which TPU v4's Mosaic cannot: "sublane gather").

Grids put the block-sparse walk last: the forward and dq kernels run
`(batch, heads, query block i, step t)` and visit key block `grid.kv_block(i, t)`; the dk/dv
kernel runs `(batch, kv_heads, key block j, step s)` with s covering (group head, query step).
Steps past a block's count repeat the last block index (no new DMA) and skip the compute, so
work is proportional to the visited pairs. Accumulators live in VMEM scratch across the last
(sequential) grid axis; the relative bias is evaluated per block from positions (`HeadBias.fn`
on per-head scalars read from SMEM) or read as one tile of an offset table.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lexjax.attention.common import NEG_INF
from lexjax.attention.kernels import cost
from lexjax.attention.kernels.geometry import div, rem
from lexjax.attention.kernels.plan import (KernelPlan, head_bias, head_param_grads, positions,
                                           scores, visibility)

NUM_LANES = 128


def padded_head_dim(d: int) -> int:
    """Mosaic blocks span the whole head dim, so any size tiles."""
    return d


def _theta(plan: KernelPlan, theta_ref, h) -> tuple:
    return tuple(theta_ref[h, p] for p in range(plan.num_params))


def _block_bias(plan: KernelPlan, bias_ref, h, q_pos, k_pos) -> Optional[jnp.ndarray]:
    if plan.bias == "head":
        return head_bias(plan, _theta(plan, bias_ref, h), q_pos - k_pos)
    if plan.bias == "table":
        return bias_ref[...]
    return None


def _split_inputs(plan: KernelPlan, refs, count: int):
    """`count` tensor refs, then (seg_q, seg_k) or Nones, then the bias ref or None, then rest."""
    refs = list(refs)
    tensors, refs = refs[:count], refs[count:]
    seg_q = seg_k = None
    if plan.segmented:
        (seg_q, seg_k), refs = refs[:2], refs[2:]
    bias_ref = None
    if plan.bias != "none":
        bias_ref, refs = refs[0], refs[1:]
    return tensors, seg_q, seg_k, bias_ref, refs


def _bias_spec(plan: KernelPlan, head_of, pair_of) -> list:
    """BlockSpec of the bias input, if any. `head_of(*ids)` -> query head; `pair_of(*ids)` ->
    (query block, key block)."""
    if plan.bias == "head":
        return [pl.BlockSpec(memory_space=pltpu.SMEM)]
    if plan.bias == "table":
        g = plan.grid

        def index(*ids):
            i, j = pair_of(*ids)
            return head_of(*ids), plan.table.index(i, j, g), 0, 0
        return [pl.BlockSpec((None, None, g.block_q, g.block_kv), index)]
    return []


def _segment_specs(plan: KernelPlan, pair_of) -> list:
    if not plan.segmented:
        return []
    g = plan.grid
    return [pl.BlockSpec((None, g.block_q, 1), lambda b, *ids: (b, pair_of(b, *ids)[0], 0)),
            pl.BlockSpec((None, 1, g.block_kv), lambda b, *ids: (b, 0, pair_of(b, *ids)[1]))]


def _inputs(segment_ids, bias_input) -> list:
    """The kernels' extra inputs: the segment ids `[b, 1, n_pad]` as query columns
    `[b, n_pad, 1]` and key rows, then the bias input."""
    segments = [] if segment_ids is None else [jnp.swapaxes(segment_ids, 1, 2), segment_ids]
    return segments + ([bias_input] if bias_input is not None else [])


def _call(kernel, plan: KernelPlan, *, grid, in_specs, out_specs, out_shape, scratch, estimate,
          semantics, name):
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=0, grid=grid,
                                               in_specs=in_specs, out_specs=out_specs,
                                               scratch_shapes=scratch),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        cost_estimate=estimate,
        interpret=plan.interpret,
        name=name,
    )


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

def _forward_kernel(*refs, plan: KernelPlan):
    (q_ref, k_ref, v_ref), seg_q, seg_k, bias_ref, rest = _split_inputs(plan, refs, 3)
    o_ref, lse_ref, m_ref, l_ref, acc_ref = rest
    g = plan.grid
    h, i, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    j = g.kv_block(i, t)
    _, count = g.kv_range(i)

    @pl.when(t == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(t < count)
    def _step():
        shape = (g.block_q, g.block_kv)
        q_pos, k_pos = positions(i, g.block_q, shape, 0), positions(j, g.block_kv, shape, 1)
        visible = visibility(plan, q_pos, k_pos,
                             *((seg_q[...], seg_k[...]) if plan.segmented else ()))
        s = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
        s = scores(plan, s, visible, _block_bias(plan, bias_ref, h, q_pos, k_pos))
        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.where(visible, jnp.exp(s - m_next), 0.0)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        acc_ref[...] = alpha * acc_ref[...] + jax.lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        m_ref[...] = m_next

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        l = l_ref[...]
        seen = l > 0.0  # False only for padding rows that see no key
        o_ref[...] = (acc_ref[...] / jnp.where(seen, l, 1.0)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_ref[...] + jnp.log(jnp.where(seen, l, 1.0)), 0.0)


def forward(plan: KernelPlan, q, k, v, segment_ids, bias_input):
    """Returns `out [b, h, n_pad, d]` (q's dtype) and float32 `lse [b, h, n_pad, 1]`."""
    g = plan.grid
    b, h, n_pad, d = q.shape
    group = plan.group
    kv_of = lambda bb, hh, i, t: (bb, div(hh, group), g.kv_block(i, t), 0)  # noqa: E731
    pair = lambda bb, hh, i, t: (i, g.kv_block(i, t))  # noqa: E731
    in_specs = [pl.BlockSpec((None, None, g.block_q, d), lambda bb, hh, i, t: (bb, hh, i, 0)),
                pl.BlockSpec((None, None, g.block_kv, d), kv_of),
                pl.BlockSpec((None, None, g.block_kv, v.shape[-1]), kv_of)]
    in_specs += _segment_specs(plan, pair) + _bias_spec(plan, lambda bb, hh, i, t: hh, pair)
    out_specs = [pl.BlockSpec((None, None, g.block_q, v.shape[-1]),
                              lambda bb, hh, i, t: (bb, hh, i, 0)),
                 pl.BlockSpec((None, None, g.block_q, 1), lambda bb, hh, i, t: (bb, hh, i, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, h, n_pad, v.shape[-1]), q.dtype),
                 jax.ShapeDtypeStruct((b, h, n_pad, 1), jnp.float32)]
    scratch = [pltpu.VMEM((g.block_q, 1), jnp.float32), pltpu.VMEM((g.block_q, 1), jnp.float32),
               pltpu.VMEM((g.block_q, v.shape[-1]), jnp.float32)]
    call = _call(functools.partial(_forward_kernel, plan=plan), plan,
                 grid=(b, h, g.num_q_blocks, g.kv_steps), in_specs=in_specs, out_specs=out_specs,
                 out_shape=out_shape, scratch=scratch,
                 estimate=cost.forward(plan, b, d, v.shape[-1], q.dtype.itemsize),
                 semantics=("parallel", "parallel", "parallel", "arbitrary"),
                 name="lexjax_attention_fwd")
    return call(q, k, v, *_inputs(segment_ids, bias_input))


# ----------------------------------------------------------------------------------------------
# Backward: dq (+ head-bias parameter gradients) and dk/dv
# ----------------------------------------------------------------------------------------------

def _dq_kernel(*refs, plan: KernelPlan, param_grads: bool):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), seg_q, seg_k, bias_ref, rest = \
        _split_inputs(plan, refs, 6)
    dq_ref, *rest = rest
    dtheta_ref = rest.pop(0) if param_grads else None
    (acc_ref,) = rest
    g = plan.grid
    h, i, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    j = g.kv_block(i, t)
    _, count = g.kv_range(i)

    @pl.when(t == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        if param_grads:
            dtheta_ref[...] = jnp.zeros(dtheta_ref.shape, jnp.float32)

    @pl.when(t < count)
    def _step():
        shape = (g.block_q, g.block_kv)
        q_pos, k_pos = positions(i, g.block_q, shape, 0), positions(j, g.block_kv, shape, 1)
        visible = visibility(plan, q_pos, k_pos,
                             *((seg_q[...], seg_k[...]) if plan.segmented else ()))
        k = k_ref[...]
        s = jax.lax.dot_general(q_ref[...], k, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
        s = scores(plan, s, visible, _block_bias(plan, bias_ref, h, q_pos, k_pos))
        p = jnp.where(visible, jnp.exp(s - lse_ref[...]), 0.0)
        dp = jax.lax.dot_general(do_ref[...], v_ref[...], (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...])
        acc_ref[...] += plan.scale * jax.lax.dot_general(
            ds.astype(k.dtype), k, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        if param_grads:
            lane = jax.lax.broadcasted_iota(jnp.int32, dtheta_ref.shape, 1)
            update = jnp.zeros(dtheta_ref.shape, jnp.float32)
            grads = head_param_grads(plan, _theta(plan, bias_ref, h), q_pos - k_pos, ds,
                                     keepdims=True)
            for p_index, rows in enumerate(grads):
                update = jnp.where(lane == p_index, jnp.sum(rows), update)
            dtheta_ref[...] += update

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


def dq(plan: KernelPlan, q, k, v, do, lse, delta, segment_ids, bias_input, param_grads: bool):
    """Returns dq `[b, h, n_pad, d]` and, with `param_grads`, float32 per-head parameter
    gradients summed over batch and query blocks `[h, P]`."""
    g = plan.grid
    b, h, n_pad, d = q.shape
    dv_dim = v.shape[-1]
    group = plan.group
    q_of = lambda bb, hh, i, t: (bb, hh, i, 0)  # noqa: E731
    kv_of = lambda bb, hh, i, t: (bb, div(hh, group), g.kv_block(i, t), 0)  # noqa: E731
    pair = lambda bb, hh, i, t: (i, g.kv_block(i, t))  # noqa: E731
    in_specs = [pl.BlockSpec((None, None, g.block_q, d), q_of),
                pl.BlockSpec((None, None, g.block_kv, d), kv_of),
                pl.BlockSpec((None, None, g.block_kv, dv_dim), kv_of),
                pl.BlockSpec((None, None, g.block_q, dv_dim), q_of),
                pl.BlockSpec((None, None, g.block_q, 1), q_of),
                pl.BlockSpec((None, None, g.block_q, 1), q_of)]
    in_specs += _segment_specs(plan, pair) + _bias_spec(plan, lambda bb, hh, i, t: hh, pair)
    out_specs = [pl.BlockSpec((None, None, g.block_q, d), q_of)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    lanes = -(-max(plan.num_params, 1) // NUM_LANES) * NUM_LANES
    if param_grads:
        out_specs.append(pl.BlockSpec((None, None, None, 1, lanes),
                                      lambda bb, hh, i, t: (bb, hh, i, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, g.num_q_blocks, 1, lanes), jnp.float32))
    call = _call(functools.partial(_dq_kernel, plan=plan, param_grads=param_grads), plan,
                 grid=(b, h, g.num_q_blocks, g.kv_steps), in_specs=in_specs,
                 out_specs=out_specs, out_shape=out_shape,
                 scratch=[pltpu.VMEM((g.block_q, d), jnp.float32)],
                 estimate=cost.dq(plan, b, d, dv_dim, q.dtype.itemsize),
                 semantics=("parallel", "parallel", "parallel", "arbitrary"),
                 name="lexjax_attention_dq")
    outs = call(q, k, v, do, lse, delta, *_inputs(segment_ids, bias_input))
    if not param_grads:
        return outs[0], None
    dq_out, dtheta = outs
    return dq_out, dtheta.sum(axis=(0, 2, 3))[:, :plan.num_params]


def _dkv_kernel(*refs, plan: KernelPlan):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), seg_q, seg_k, bias_ref, rest = \
        _split_inputs(plan, refs, 6)
    dk_ref, dv_ref, dk_acc, dv_acc = rest
    g = plan.grid
    kv_head, j, step = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    steps = g.q_steps
    h = kv_head * plan.group + div(step, steps)
    t = rem(step, steps)
    i = g.q_block(j, t)
    _, count = g.q_range(j)

    @pl.when(step == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(t < count)
    def _step():
        shape = (g.block_q, g.block_kv)
        q_pos, k_pos = positions(i, g.block_q, shape, 0), positions(j, g.block_kv, shape, 1)
        visible = visibility(plan, q_pos, k_pos,
                             *((seg_q[...], seg_k[...]) if plan.segmented else ()))
        q, do = q_ref[...], do_ref[...]
        s = jax.lax.dot_general(q, k_ref[...], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
        s = scores(plan, s, visible, _block_bias(plan, bias_ref, h, q_pos, k_pos))
        p = jnp.where(visible, jnp.exp(s - lse_ref[...]), 0.0)
        dv_acc[...] += jax.lax.dot_general(p.astype(do.dtype).T, do, (((1,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32)
        dp = jax.lax.dot_general(do, v_ref[...], (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...])
        dk_acc[...] += plan.scale * jax.lax.dot_general(
            ds.astype(q.dtype).T, q, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def dkv(plan: KernelPlan, q, k, v, do, lse, delta, segment_ids, bias_input):
    """Returns dk, dv `[b, kv_heads, n_pad, d]` (summed over each kv head's query group)."""
    g = plan.grid
    b, kv_heads, n_pad, d = k.shape
    dv_dim = v.shape[-1]
    group, steps = plan.group, g.q_steps

    def head(bb, hh, j, s):
        return hh * group + div(s, steps)

    def pair(bb, hh, j, s):
        return g.q_block(j, rem(s, steps)), j

    q_of = lambda bb, hh, j, s: (bb, head(bb, hh, j, s), pair(bb, hh, j, s)[0], 0)  # noqa: E731
    kv_of = lambda bb, hh, j, s: (bb, hh, j, 0)  # noqa: E731
    in_specs = [pl.BlockSpec((None, None, g.block_q, d), q_of),
                pl.BlockSpec((None, None, g.block_kv, d), kv_of),
                pl.BlockSpec((None, None, g.block_kv, dv_dim), kv_of),
                pl.BlockSpec((None, None, g.block_q, dv_dim), q_of),
                pl.BlockSpec((None, None, g.block_q, 1), q_of),
                pl.BlockSpec((None, None, g.block_q, 1), q_of)]
    in_specs += _segment_specs(plan, pair) + _bias_spec(plan, head, pair)
    out_specs = [pl.BlockSpec((None, None, g.block_kv, d), kv_of),
                 pl.BlockSpec((None, None, g.block_kv, dv_dim), kv_of)]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    scratch = [pltpu.VMEM((g.block_kv, d), jnp.float32),
               pltpu.VMEM((g.block_kv, dv_dim), jnp.float32)]
    call = _call(functools.partial(_dkv_kernel, plan=plan), plan,
                 grid=(b, kv_heads, g.num_kv_blocks, group * steps), in_specs=in_specs,
                 out_specs=out_specs, out_shape=out_shape, scratch=scratch,
                 estimate=cost.dkv(plan, b, d, dv_dim, q.dtype.itemsize),
                 semantics=("parallel", "parallel", "parallel", "arbitrary"),
                 name="lexjax_attention_dkv")
    return call(q, k, v, do, lse, delta, *_inputs(segment_ids, bias_input))
