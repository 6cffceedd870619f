"""`pl.CostEstimate`s counting only the block pairs a kernel visits.

XLA's cost analysis of a Pallas call knows nothing but what the kernel declares, and compiler
estimates for TPU topologies rely on it; so each kernel declares the FLOPs (2 per multiply-add of
its matmuls), the exponentials and the HBM bytes of the blocks it actually visits. Per visited
pair (block_q x block_kv) and query head:

- forward: q k^T and p v: `2 bq bk (d + dv)` FLOPs, `bq bk` exp; k and v blocks read.
- dq: q k^T, dO v^T, dS k: `2 bq bk (2d + dv)`; `bq bk` exp; k and v blocks read.
- dk/dv: q k^T, P^T dO, dO v^T, dS^T q: `4 bq bk (d + dv)`; `bq bk` exp; q, dO, and the two
  float32 row statistics read.
Each kernel also reads or writes once the blocks it keeps resident (q/out in the forward,
q/dO/dq in dq, k/v/dk/dv in dk/dv), plus segment ids and bias tiles when present.
"""
from __future__ import annotations

from jax.experimental import pallas as pl

from lexjax.attention.kernels.plan import KernelPlan

F32 = 4


def _extras(plan: KernelPlan, pairs: int) -> int:
    """Bytes per (batch, head) for segment ids and bias tiles over `pairs` visited pairs."""
    g = plan.grid
    total = 0
    if plan.segmented:
        total += F32 * (g.padded_length + pairs * g.block_kv)
    if plan.bias == "table":
        total += F32 * pairs * g.block_q * g.block_kv
    return total


def forward(plan: KernelPlan, batch: int, d: int, dv: int, itemsize: int) -> pl.CostEstimate:
    g = plan.grid
    pairs, n = g.visited_pairs, g.padded_length
    per_head = pairs * g.block_q * g.block_kv
    bytes_per_head = (itemsize * (n * (d + dv) + pairs * g.block_kv * (d + dv)) + F32 * n
                      + _extras(plan, pairs))
    heads = batch * plan.num_heads
    return pl.CostEstimate(flops=heads * 2 * per_head * (d + dv),
                           transcendentals=heads * per_head,
                           bytes_accessed=heads * bytes_per_head)


def dq(plan: KernelPlan, batch: int, d: int, dv: int, itemsize: int) -> pl.CostEstimate:
    g = plan.grid
    pairs, n = g.visited_pairs, g.padded_length
    per_head = pairs * g.block_q * g.block_kv
    bytes_per_head = (itemsize * (n * (2 * d + dv) + pairs * g.block_kv * (d + dv))
                      + 2 * F32 * n + _extras(plan, pairs))
    heads = batch * plan.num_heads
    return pl.CostEstimate(flops=heads * 2 * per_head * (2 * d + dv),
                           transcendentals=heads * per_head,
                           bytes_accessed=heads * bytes_per_head)


def dkv(plan: KernelPlan, batch: int, d: int, dv: int, itemsize: int) -> pl.CostEstimate:
    g = plan.grid
    pairs, n = int(g.q_counts.sum()), g.padded_length
    per_head = pairs * g.block_q * g.block_kv
    q_side = itemsize * pairs * g.block_q * (d + dv) + 2 * F32 * pairs * g.block_q
    kv_side = itemsize * n * 2 * (d + dv)
    heads, kv_heads = batch * plan.num_heads, batch * plan.num_kv_heads
    return pl.CostEstimate(
        flops=heads * 4 * per_head * (d + dv),
        transcendentals=heads * per_head,
        bytes_accessed=heads * (q_side + _extras(plan, pairs)) + kv_heads * kv_side)
