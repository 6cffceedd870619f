"""The attention-resolution metric of the LeX paper (Sun et al. 2023, eqs. 3 and 11).

With s[n] the expected pre-softmax score at distance n, estimated as
    s_hat[n] = 1/(N - n) * E[ sum_{i=n}^{N-1} e_{i, i-n} ]      (eq. 11)
(averaged over layers, heads and texts; e = q.k / sqrt(d) + relative bias),
    R(s) = sum_i e^{s[i]} (e^{s[i]} - e^{s[i+1]}) / (sum_i e^{s[i]})^2        (eq. 3)
is high when scores fall off monotonically with distance and stay distinguishable. R is invariant
to adding a constant to s; here i runs over 0 .. N-2 in the numerator and 0 .. N-1 below.
The sums over i of q_i . k_{i-n} for all n at once are a cross-correlation, computed by FFT in
O(N log N) per head instead of forming the [N, N] scores.

Under a local inference mask (blockwise causal attention, BCA; a window) only the pairs the mask
admits count: s_hat[n] averages the admitted pairs at distance n, and a distance no query attends
at has s = -inf (e^s = 0 in eq. 3), as the scores the model actually computes. The local
averages are computed block by block, O(N x span).
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lexjax.attention import MaskSpec
from lexjax.attention.blocked import default_block_size


def mean_score_by_distance(q: jnp.ndarray, k: jnp.ndarray, bias: jnp.ndarray,
                           mask: Optional[MaskSpec] = None) -> np.ndarray:
    """s_hat[n] for one layer: q `[b, N, heads, d]`, k `[b, N, kv_heads, d]`, bias `[heads, N]`
    (by distance) -> float64 `[N]`, averaged over batch, heads and the (query, key) pairs at
    distance n that a causal `mask` admits (None: every causal pair); -inf where it admits
    none."""
    b, n, h, d = q.shape
    k = jnp.repeat(k, h // k.shape[2], axis=2)
    if mask is not None and mask.is_local:
        return _local_score_by_distance(q, k, bias, mask)
    size = 2 * n
    qf = jnp.fft.rfft(q.astype(jnp.float32), n=size, axis=1)
    kf = jnp.fft.rfft(k.astype(jnp.float32), n=size, axis=1)
    corr = jnp.fft.irfft(jnp.sum(qf * jnp.conj(kf), axis=-1), n=size, axis=1)[:, :n]  # [b, N, h]
    counts = n - jnp.arange(n, dtype=jnp.float32)
    scores = corr / counts[None, :, None] / np.sqrt(d) + jnp.transpose(bias)[None]
    return np.asarray(jnp.mean(scores, axis=(0, 2)), np.float64)


def _local_score_by_distance(q: jnp.ndarray, k: jnp.ndarray, bias: jnp.ndarray,
                             mask: MaskSpec) -> np.ndarray:
    """`mean_score_by_distance` under a local mask, one query block at a time (q and k with the
    same heads)."""
    b, n, h, d = q.shape
    block = min(default_block_size(mask), n)
    before, after = mask.key_blocks_around(block)
    sums, counts = np.zeros(n), np.zeros(n)
    for start in range(0, n, block):
        q_pos = np.arange(start, min(start + block, n))
        k_pos = np.arange(max(0, start - before * block), min(n, start + (after + 1) * block))
        distance = q_pos[:, None] - k_pos[None, :]
        admitted = np.asarray(mask.allows(q_pos[:, None], k_pos[None, :])) & (distance >= 0)
        scores = jnp.einsum("bqhd,bkhd->hqk", q[:, q_pos].astype(jnp.float32),
                            k[:, k_pos].astype(jnp.float32)) / (b * np.sqrt(d))
        scores = scores + bias[:, np.clip(distance, 0, n - 1)]
        total = np.asarray(jnp.sum(scores, axis=0), np.float64) / h  # [q, k]: mean over b, h
        sums += np.bincount(distance[admitted], weights=total[admitted], minlength=n)
        counts += np.bincount(distance[admitted], minlength=n)
    return np.where(counts > 0, sums / np.maximum(counts, 1), -np.inf)


def resolution(scores: np.ndarray) -> float:
    """R(s) of eq. 3 for expected scores by distance `[N]` (-inf: a distance never attended)."""
    e = np.exp(np.asarray(scores, np.float64) - np.max(scores))
    return float(np.sum(e[:-1] * (e[:-1] - e[1:])) / np.sum(e) ** 2)


def collect_attention_inputs(intermediates: Any) -> list[dict]:
    """The per-layer `{"q", "k", "bias"}` records sown by attention layers (scanned stacks are
    split into layers)."""
    found = []

    def visit(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "attention_inputs":
                    found.extend(value)
                else:
                    visit(value)
    visit(intermediates)
    layers = []
    for record in found:
        if record["q"].ndim == 5:  # stacked by nn.scan: [layers, b, N, heads, d]
            layers.extend({name: value[i] for name, value in record.items()}
                          for i in range(record["q"].shape[0]))
        else:
            layers.append(record)
    return layers


def inference_mask(model) -> Optional[MaskSpec]:
    """The mask a model attends under at evaluation (`deterministic=True`): its
    `inference_mask` (BCA) or its `mask`; None for a model with neither."""
    return getattr(model, "inference_mask", None) or getattr(model, "mask", None)


def attention_resolution(model, variables, tokens: jnp.ndarray
                         ) -> Optional[tuple[float, np.ndarray]]:
    """`(R, s_hat [N])` of a model on `tokens [b, N]` (decoder inputs), averaged over layers,
    over the pairs its inference mask admits; None for a model without softmax self-attention
    layers (`lexjax.layers.SelfAttention`), which record nothing to measure."""
    _, state = model.apply(variables, tokens, mutable=["intermediates"])
    layers = collect_attention_inputs(jax.device_get(state.get("intermediates", {})))
    if not layers:
        return None
    mask = inference_mask(model)
    scores = np.mean([mean_score_by_distance(l["q"], l["k"], l["bias"], mask) for l in layers],
                     axis=0)
    return resolution(scores), scores
