"""Pallas Mosaic GPU kernels (Hopper WGMMA): forward, dq and dk/dv.

Same kernel layout and block walk as the TPU kernels (`kernels/tpu.py`), expressed the Mosaic GPU
way: the CUDA grid covers (batch, head, block); each program keeps its own block in shared memory
and walks the blocks it needs with a dynamic trip count (`BlockGrid.kv_range` / `q_range`), so
only visited pairs cost anything. Streamed blocks are double-buffered: the copy of step t + 1 is
issued before step t computes. Matmuls run on the tensor cores (`plgpu.wgmma`, bf16/f16 operands,
float32 accumulators); softmax statistics live in registers in the WGMMA row layout. The dk/dv
kernel computes transposed tiles (keys on rows) so every matmul operand is already in place.

Constraints (checked in `pallas_attention`): 16-bit inputs; block_q and block_kv multiples of 64
up to 256; the head dim is zero-padded to a multiple of 64 (at most 256). Mosaic GPU ignores cost
estimates, so none is declared here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lexjax.attention.common import NEG_INF
from lexjax.attention.kernels.geometry import BlockGrid, div, rem
from lexjax.attention.kernels.plan import (KernelPlan, head_bias, head_param_grads, scores,
                                           visibility)

SLOTS = 2  # double buffering of the streamed blocks
MAX_BLOCK = 256
SWIZZLE = 128
ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per tile row
COLUMN = plgpu.Layout.WGMMA.reduce(0)  # one value per tile column


def padded_head_dim(d: int) -> int:
    return -(-d // 64) * 64


def check(g: BlockGrid, dtype, head_dim: int) -> None:
    """Raises ValueError for inputs the WGMMA kernels cannot take."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"the Pallas GPU kernels take bfloat16 or float16 inputs, got {dtype}; "
                         "cast q, k, v or use impl='xla'")
    if max(g.block_q, g.block_kv) > MAX_BLOCK or padded_head_dim(head_dim) > MAX_BLOCK:
        raise ValueError(f"GPU kernels take blocks and head dims up to {MAX_BLOCK}, got "
                         f"block_q={g.block_q}, block_kv={g.block_kv}, head_dim={head_dim}")


def _mma_smem(shape, dtype):
    """Shared memory laid out for WGMMA operands: (8, 128-byte) tiles, 128-byte swizzle."""
    elems = SWIZZLE // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)),
                                                plgpu.SwizzleTransform(SWIZZLE)))


def _interpret(plan: KernelPlan):
    if not plan.interpret:
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()


def _matmul(plan: KernelPlan, shape, a, b, transpose_b: bool = False):
    """`a @ b` (or `a @ b.T`), float32 `shape`, with `a` an SMEM ref or a register array and `b`
    an SMEM ref. On the tensor cores via WGMMA into a fresh accumulator (callers add it up);
    in interpret mode as `jnp.dot`, since Pallas' GPU interpreter cannot run transposed or
    accumulator-initialised WGMMAs."""
    if plan.interpret:
        a = a if isinstance(a, jax.Array) else a[...]
        b = b[...].T if transpose_b else b[...]
        return jnp.dot(a, b, preferred_element_type=jnp.float32)

    def compute(acc_ref):
        plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(b, (1, 0)) if transpose_b else b)
        return acc_ref[...]
    return pl.run_scoped(compute, plgpu.ACC(shape, jnp.float32))


def _cast(plan: KernelPlan, x, layout):
    """Assigns a register layout (a no-op in interpret mode, whose interpreter has no layouts)."""
    return x if plan.interpret else plgpu.layout_cast(x, layout)


def _load(plan: KernelPlan, ref, layout, optimized: bool = True):
    """Reads an SMEM ref into registers in `layout` (a plain read in interpret mode)."""
    if plan.interpret:
        return ref[...]
    return plgpu.load(ref, (), layout=layout, optimized=optimized)


def _zeros(plan: KernelPlan, shape):
    return _cast(plan, jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _iota(plan: KernelPlan, shape, dim):
    return _cast(plan, jax.lax.broadcasted_iota(jnp.int32, shape, dim), plgpu.Layout.WGMMA)


def _rows(vector, shape):
    return lax.broadcast_in_dim(vector, shape, [0])


def _columns(vector, shape):
    return lax.broadcast_in_dim(vector, shape, [1])


def _theta(plan: KernelPlan, theta_smem, h) -> tuple:
    return tuple(theta_smem[h, p] for p in range(plan.num_params))


def _param_lanes(plan: KernelPlan) -> int:
    """Per-head parameter row length: P rounded up to 128 bytes (GMEM <-> SMEM copies move
    a multiple of the warpgroup's 128 lanes in bytes)."""
    return -(-max(plan.num_params, 1) // 32) * 32


class _Stream:
    """Double-buffered GMEM -> SMEM copies of one block per step (one barrier per slot)."""

    def __init__(self, smem, barriers):
        self.smem, self.barriers = smem, barriers

    def fetch(self, src, slot):
        plgpu.copy_gmem_to_smem(src, self.smem.at[slot], self.barriers.at[slot])

    def wait(self, slot):
        plgpu.barrier_wait(self.barriers.at[slot])
        return self.smem.at[slot]


def _copy_in(src, dst, barrier):
    plgpu.copy_gmem_to_smem(src, dst, barrier)
    plgpu.barrier_wait(barrier)


def _streams(names, scratch):
    return {name: _Stream(*scratch[name]) for name in names}


def _stream_scratch(shape, dtype, mma: bool):
    smem = _mma_smem((SLOTS,) + shape, dtype) if mma else plgpu.SMEM((SLOTS,) + shape, dtype)
    return smem, plgpu.Barrier(num_barriers=SLOTS)


def _kernel(body, plan: KernelPlan, *, out_type, scratch, grid, names):
    return plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=grid,
                        grid_names=names, compiler_params=plgpu.CompilerParams(),
                        interpret=_interpret(plan))


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

def forward(plan: KernelPlan, q, k, v, segment_ids, bias_input):
    """Returns `out [b, h, n_pad, d]` and float32 `lse [b, h, 1, n_pad]`."""
    g = plan.grid
    b, h, n_pad, d = q.shape
    dv = v.shape[-1]
    bq, bk = g.block_q, g.block_kv
    dtype = q.dtype
    streamed = ["k", "v"] + (["seg_k"] if plan.segmented else []) + (
        ["tile"] if plan.bias == "table" else [])
    scratch = {"q": _mma_smem((bq, d), dtype), "lse": plgpu.SMEM((bq,), jnp.float32),
               "once": plgpu.Barrier(num_barriers=3),
               "k": _stream_scratch((bk, d), dtype, True),
               "v": _stream_scratch((bk, dv), dtype, True)}
    if plan.segmented:
        scratch["seg_q"] = plgpu.SMEM((bq,), jnp.int32)
        scratch["seg_k"] = _stream_scratch((bk,), jnp.int32, False)
    if plan.bias == "head":
        scratch["theta"] = plgpu.SMEM((h, _param_lanes(plan)), jnp.float32)
    if plan.bias == "table":
        scratch["tile"] = _stream_scratch((bq, bk), jnp.float32, False)

    def body(*refs, **sc):
        (q_gmem, k_gmem, v_gmem), seg_gmem, bias_gmem, (o_gmem, lse_gmem) = _unpack(plan, refs, 3)
        bb, hh, i = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("i")
        kvh = div(hh, plan.group)
        start, count = g.kv_range(i)
        streams = _streams(streamed, sc)
        once = sc["once"]
        _copy_in(q_gmem.at[bb, hh, pl.ds(i * bq, bq)], sc["q"], once.at[0])
        seg_q = None
        if plan.segmented:
            _copy_in(seg_gmem.at[bb, 0, pl.ds(i * bq, bq)], sc["seg_q"], once.at[1])
            seg_q = _load(plan, sc["seg_q"], ROW)
        theta = None
        if plan.bias == "head":
            _copy_in(bias_gmem, sc["theta"], once.at[2])
            theta = _theta(plan, sc["theta"], hh)

        def fetch(t, slot):
            j = start + t
            keys = pl.ds(j * bk, bk)
            streams["k"].fetch(k_gmem.at[bb, kvh, keys], slot)
            streams["v"].fetch(v_gmem.at[bb, kvh, keys], slot)
            if plan.segmented:
                streams["seg_k"].fetch(seg_gmem.at[bb, 0, keys], slot)
            if plan.bias == "table":
                streams["tile"].fetch(bias_gmem.at[hh, plan.table.index(i, j, g)], slot)

        fetch(0, 0)
        shape = (bq, bk)
        q_pos = i * bq + _iota(plan, shape, 0)

        def step(t, carry):
            acc, m, l = carry
            slot = rem(t, SLOTS)

            @pl.when(t + 1 < count)
            def _prefetch():
                fetch(t + 1, 1 - slot)

            k_smem = streams["k"].wait(slot)
            s = _matmul(plan, shape, sc["q"], k_smem, transpose_b=True)
            k_pos = (start + t) * bk + _iota(plan, shape, 1)
            segs = ()
            if plan.segmented:
                seg_k = _load(plan, streams["seg_k"].wait(slot), COLUMN)
                segs = (_rows(seg_q, shape), _columns(seg_k, shape))
            visible = visibility(plan, q_pos, k_pos, *segs)
            bias = None
            if plan.bias == "head":
                bias = head_bias(plan, theta, q_pos - k_pos)
            elif plan.bias == "table":
                bias = _load(plan, streams["tile"].wait(slot), plgpu.Layout.WGMMA,
                                  optimized=False)
            s = scores(plan, s, visible, bias)
            m_next = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp(m - m_next)
            p = jnp.where(visible, jnp.exp(s - _rows(m_next, shape)), 0.0)
            l = alpha * l + p.sum(axis=1)
            acc = acc * _rows(alpha, acc.shape)
            acc = acc + _matmul(plan, acc.shape, p.astype(dtype), streams["v"].wait(slot))
            return acc, m_next, l

        m0 = _cast(plan, jnp.full((bq,), NEG_INF, jnp.float32), ROW)
        l0 = _cast(plan, jnp.zeros((bq,), jnp.float32), ROW)
        acc, m, l = lax.fori_loop(0, count, step, (_zeros(plan, (bq, dv)), m0, l0))
        seen = l > 0.0
        safe_l = jnp.where(seen, l, 1.0)
        sc["q"][...] = (acc / _rows(safe_l, acc.shape)).astype(dtype)
        sc["lse"][...] = jnp.where(seen, m + jnp.log(safe_l), 0.0)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(sc["q"], o_gmem.at[bb, hh, pl.ds(i * bq, bq)])
        plgpu.copy_smem_to_gmem(sc["lse"], lse_gmem.at[bb, hh, 0, pl.ds(i * bq, bq)])
        plgpu.wait_smem_to_gmem(0)

    out_type = (jax.ShapeDtypeStruct((b, h, n_pad, dv), dtype),
                jax.ShapeDtypeStruct((b, h, 1, n_pad), jnp.float32))
    call = _kernel(body, plan, out_type=out_type, scratch=scratch,
                   grid=(b, h, g.num_q_blocks), names=("b", "h", "i"))
    return call(q, k, v, *_optional_inputs(plan, segment_ids, _head_params(plan, bias_input)))


def _head_params(plan: KernelPlan, bias_input):
    """Head-bias params padded to `_param_lanes` columns (tables pass through)."""
    if plan.bias != "head":
        return bias_input
    return jnp.pad(bias_input, [(0, 0), (0, _param_lanes(plan) - plan.num_params)])


def _optional_inputs(plan: KernelPlan, segment_ids, bias_input) -> list:
    return ([segment_ids] if plan.segmented else []) + (
        [bias_input] if plan.bias != "none" else [])


def _unpack(plan: KernelPlan, refs, tensors: int):
    """kernel refs -> (tensor refs, segment ids ref, bias ref, output refs)."""
    refs = list(refs)
    head, refs = refs[:tensors], refs[tensors:]
    seg = refs.pop(0) if plan.segmented else None
    bias = refs.pop(0) if plan.bias != "none" else None
    return head, seg, bias, refs


# ----------------------------------------------------------------------------------------------
# Backward: dq (+ head-bias parameter gradients)
# ----------------------------------------------------------------------------------------------

def dq(plan: KernelPlan, q, k, v, do, lse, delta, segment_ids, bias_input, param_grads: bool):
    """Returns dq `[b, h, n_pad, d]` and, with `param_grads`, float32 `[h, P]` gradients of the
    head-bias parameters (each program writes its per-row partial sums `[P, block_q]`; XLA adds
    them up, as Mosaic GPU reduces one axis at a time)."""
    g = plan.grid
    b, h, n_pad, d = q.shape
    dv = v.shape[-1]
    bq, bk = g.block_q, g.block_kv
    dtype = q.dtype
    lanes = _param_lanes(plan)
    streamed = ["k", "v"] + (["seg_k"] if plan.segmented else []) + (
        ["tile"] if plan.bias == "table" else [])
    scratch = {"q": _mma_smem((bq, d), dtype), "do": _mma_smem((bq, dv), dtype),
               "lse": plgpu.SMEM((bq,), jnp.float32), "delta": plgpu.SMEM((bq,), jnp.float32),
               "once": plgpu.Barrier(num_barriers=6),
               "k": _stream_scratch((bk, d), dtype, True),
               "v": _stream_scratch((bk, dv), dtype, True)}
    if plan.segmented:
        scratch["seg_q"] = plgpu.SMEM((bq,), jnp.int32)
        scratch["seg_k"] = _stream_scratch((bk,), jnp.int32, False)
    if plan.bias == "head":
        scratch["theta"] = plgpu.SMEM((h, lanes), jnp.float32)
        scratch["dtheta"] = plgpu.SMEM((plan.num_params, bq), jnp.float32)
    if plan.bias == "table":
        scratch["tile"] = _stream_scratch((bq, bk), jnp.float32, False)

    def body(*refs, **sc):
        tensors, seg_gmem, bias_gmem, outs = _unpack(plan, refs, 6)
        q_gmem, k_gmem, v_gmem, do_gmem, lse_gmem, delta_gmem = tensors
        dq_gmem, dtheta_gmem = outs if param_grads else (outs[0], None)
        bb, hh, i = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("i")
        kvh = div(hh, plan.group)
        start, count = g.kv_range(i)
        streams = _streams(streamed, sc)
        once = sc["once"]
        rows = pl.ds(i * bq, bq)
        _copy_in(q_gmem.at[bb, hh, rows], sc["q"], once.at[0])
        _copy_in(do_gmem.at[bb, hh, rows], sc["do"], once.at[1])
        _copy_in(lse_gmem.at[bb, hh, 0, rows], sc["lse"], once.at[2])
        _copy_in(delta_gmem.at[bb, hh, 0, rows], sc["delta"], once.at[3])
        shape = (bq, bk)
        lse_rows = _rows(_load(plan, sc["lse"], ROW), shape)
        delta_rows = _rows(_load(plan, sc["delta"], ROW), shape)
        seg_q = None
        if plan.segmented:
            _copy_in(seg_gmem.at[bb, 0, rows], sc["seg_q"], once.at[4])
            seg_q = _load(plan, sc["seg_q"], ROW)
        theta = None
        if plan.bias == "head":
            _copy_in(bias_gmem, sc["theta"], once.at[5])
            theta = _theta(plan, sc["theta"], hh)

        def fetch(t, slot):
            j = start + t
            keys = pl.ds(j * bk, bk)
            streams["k"].fetch(k_gmem.at[bb, kvh, keys], slot)
            streams["v"].fetch(v_gmem.at[bb, kvh, keys], slot)
            if plan.segmented:
                streams["seg_k"].fetch(seg_gmem.at[bb, 0, keys], slot)
            if plan.bias == "table":
                streams["tile"].fetch(bias_gmem.at[hh, plan.table.index(i, j, g)], slot)

        fetch(0, 0)
        q_pos = i * bq + _iota(plan, shape, 0)

        def step(t, carry):
            acc, grads = carry
            slot = rem(t, SLOTS)

            @pl.when(t + 1 < count)
            def _prefetch():
                fetch(t + 1, 1 - slot)

            k_smem, v_smem = streams["k"].wait(slot), streams["v"].wait(slot)
            s = _matmul(plan, shape, sc["q"], k_smem, transpose_b=True)
            k_pos = (start + t) * bk + _iota(plan, shape, 1)
            rel = q_pos - k_pos
            segs = ()
            if plan.segmented:
                seg_k = _load(plan, streams["seg_k"].wait(slot), COLUMN)
                segs = (_rows(seg_q, shape), _columns(seg_k, shape))
            visible = visibility(plan, q_pos, k_pos, *segs)
            bias = None
            if plan.bias == "head":
                bias = head_bias(plan, theta, rel)
            elif plan.bias == "table":
                bias = _load(plan, streams["tile"].wait(slot), plgpu.Layout.WGMMA,
                                  optimized=False)
            s = scores(plan, s, visible, bias)
            p = jnp.where(visible, jnp.exp(s - lse_rows), 0.0)
            dp = _matmul(plan, shape, sc["do"], v_smem, transpose_b=True)
            ds = p * (dp - delta_rows)
            acc = acc + _matmul(plan, acc.shape, ds.astype(dtype), k_smem)
            if param_grads:
                grads = tuple(a + c for a, c in
                              zip(grads, head_param_grads(plan, theta, rel, ds)))
            return acc, grads

        grads0 = tuple(_cast(plan, jnp.zeros((bq,), jnp.float32), ROW)
                       for _ in range(plan.num_params)) if param_grads else ()
        acc, grads = lax.fori_loop(0, count, step, (_zeros(plan, (bq, d)), grads0))
        sc["q"][...] = (plan.scale * acc).astype(dtype)
        for p_index, grad_rows in enumerate(grads):
            sc["dtheta"][p_index] = grad_rows
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(sc["q"], dq_gmem.at[bb, hh, rows])
        if param_grads:
            plgpu.copy_smem_to_gmem(sc["dtheta"], dtheta_gmem.at[bb, hh, i])
        plgpu.wait_smem_to_gmem(0)

    out_type = [jax.ShapeDtypeStruct(q.shape, dtype)]
    if param_grads:
        out_type.append(jax.ShapeDtypeStruct((b, h, g.num_q_blocks, plan.num_params, bq),
                                             jnp.float32))
    call = _kernel(body, plan, out_type=tuple(out_type), scratch=scratch,
                   grid=(b, h, g.num_q_blocks), names=("b", "h", "i"))
    outs = call(q, k, v, do, lse, delta,
                *_optional_inputs(plan, segment_ids, _head_params(plan, bias_input)))
    if not param_grads:
        return outs[0], None
    return outs[0], outs[1].sum(axis=(0, 2, 4))


# ----------------------------------------------------------------------------------------------
# Backward: dk / dv (transposed tiles: keys on rows, queries on columns)
# ----------------------------------------------------------------------------------------------

def dkv(plan: KernelPlan, q, k, v, do, lse, delta, segment_ids, bias_input):
    """Returns dk, dv `[b, kv_heads, n_pad, d]` (summed over each kv head's query group)."""
    g = plan.grid
    b, kv_heads, n_pad, d = k.shape
    dv = v.shape[-1]
    bq, bk = g.block_q, g.block_kv
    dtype = q.dtype
    streamed = ["q", "do", "lse", "delta"] + (["seg_q"] if plan.segmented else []) + (
        ["tile"] if plan.bias == "table" else [])
    scratch = {"k": _mma_smem((bk, d), dtype), "v": _mma_smem((bk, dv), dtype),
               "once": plgpu.Barrier(num_barriers=4),
               "q": _stream_scratch((bq, d), dtype, True),
               "do": _stream_scratch((bq, dv), dtype, True),
               "lse": _stream_scratch((bq,), jnp.float32, False),
               "delta": _stream_scratch((bq,), jnp.float32, False)}
    if plan.segmented:
        scratch["seg_k"] = plgpu.SMEM((bk,), jnp.int32)
        scratch["seg_q"] = _stream_scratch((bq,), jnp.int32, False)
    if plan.bias == "head":
        scratch["theta"] = plgpu.SMEM((plan.num_heads, _param_lanes(plan)), jnp.float32)
    if plan.bias == "table":
        scratch["tile"] = _stream_scratch((bk, bq), jnp.float32, False)
    bias_input = _head_params(plan, bias_input)
    if plan.bias == "table":
        bias_input = jnp.swapaxes(bias_input, -1, -2)  # tiles with keys on rows

    def body(*refs, **sc):
        tensors, seg_gmem, bias_gmem, (dk_gmem, dv_gmem) = _unpack(plan, refs, 6)
        q_gmem, k_gmem, v_gmem, do_gmem, lse_gmem, delta_gmem = tensors
        bb, kvh, j = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("j")
        start, count = g.q_range(j)
        streams = _streams(streamed, sc)
        once = sc["once"]
        keys = pl.ds(j * bk, bk)
        _copy_in(k_gmem.at[bb, kvh, keys], sc["k"], once.at[0])
        _copy_in(v_gmem.at[bb, kvh, keys], sc["v"], once.at[1])
        shape = (bk, bq)
        k_pos = j * bk + _iota(plan, shape, 0)
        seg_k = None
        if plan.segmented:
            _copy_in(seg_gmem.at[bb, 0, keys], sc["seg_k"], once.at[2])
            seg_k = _rows(_load(plan, sc["seg_k"], ROW), shape)
        if plan.bias == "head":
            _copy_in(bias_gmem, sc["theta"], once.at[3])
        total = plan.group * count  # steps: (group head, query block) pairs

        def locate(step_index):
            return kvh * plan.group + div(step_index, count), start + rem(step_index, count)

        def fetch(step_index, slot):
            hh, i = locate(step_index)
            rows = pl.ds(i * bq, bq)
            streams["q"].fetch(q_gmem.at[bb, hh, rows], slot)
            streams["do"].fetch(do_gmem.at[bb, hh, rows], slot)
            streams["lse"].fetch(lse_gmem.at[bb, hh, 0, rows], slot)
            streams["delta"].fetch(delta_gmem.at[bb, hh, 0, rows], slot)
            if plan.segmented:
                streams["seg_q"].fetch(seg_gmem.at[bb, 0, rows], slot)
            if plan.bias == "table":
                streams["tile"].fetch(bias_gmem.at[hh, plan.table.index(i, j, g)], slot)

        @pl.when(total > 0)
        def _first():
            fetch(0, 0)

        def step(step_index, carry):
            dk_acc, dv_acc = carry
            slot = rem(step_index, SLOTS)
            hh, i = locate(step_index)

            @pl.when(step_index + 1 < total)
            def _prefetch():
                fetch(step_index + 1, 1 - slot)

            q_smem, do_smem = streams["q"].wait(slot), streams["do"].wait(slot)
            s_t = _matmul(plan, shape, sc["k"], q_smem, transpose_b=True)
            q_pos = i * bq + _iota(plan, shape, 1)
            segs = ()
            if plan.segmented:
                seg_q = _load(plan, streams["seg_q"].wait(slot), COLUMN)
                segs = (_columns(seg_q, shape), seg_k)
            visible = visibility(plan, q_pos, k_pos, *segs)
            bias = None
            if plan.bias == "head":
                bias = head_bias(plan, _theta(plan, sc["theta"], hh), q_pos - k_pos)
            elif plan.bias == "table":
                bias = _load(plan, streams["tile"].wait(slot), plgpu.Layout.WGMMA,
                                  optimized=False)
            s_t = scores(plan, s_t, visible, bias)
            lse_cols = _columns(_load(plan, streams["lse"].wait(slot), COLUMN), shape)
            p_t = jnp.where(visible, jnp.exp(s_t - lse_cols), 0.0)
            dv_acc = dv_acc + _matmul(plan, dv_acc.shape, p_t.astype(dtype), do_smem)
            dp_t = _matmul(plan, shape, sc["v"], do_smem, transpose_b=True)
            delta_cols = _columns(_load(plan, streams["delta"].wait(slot), COLUMN),
                                  shape)
            ds_t = p_t * (dp_t - delta_cols)
            dk_acc = dk_acc + _matmul(plan, dk_acc.shape, ds_t.astype(dtype), q_smem)
            return dk_acc, dv_acc

        dk_acc, dv_acc = lax.fori_loop(0, total, step, (_zeros(plan, (bk, d)), _zeros(plan, (bk, dv))))
        sc["k"][...] = (plan.scale * dk_acc).astype(dtype)
        sc["v"][...] = dv_acc.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(sc["k"], dk_gmem.at[bb, kvh, keys])
        plgpu.copy_smem_to_gmem(sc["v"], dv_gmem.at[bb, kvh, keys])
        plgpu.wait_smem_to_gmem(0)

    out_type = (jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype))
    call = _kernel(body, plan, out_type=out_type, scratch=scratch,
                   grid=(b, kv_heads, g.num_kv_blocks), names=("b", "h", "j"))
    return call(q, k, v, do, lse, delta, *_optional_inputs(plan, segment_ids, bias_input))
