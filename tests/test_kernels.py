"""Pallas attention kernels (lexjax.attention.kernels).

- The block walk visits exactly the block pairs a brute force over `MaskSpec.allows` finds.
- Declared costs equal closed-form counts of the visited blocks per mask kind.
- Interpret mode on CPU: forward and dq/dk/dv (and learned head-bias parameters) equal
  `attend(impl="reference")` for every mask kind, with and without in-kernel biases, ragged
  lengths, grouped-query heads, segment ids, unequal blocks, bfloat16.
- The TPU kernels compile ahead of time with the real Mosaic compiler (libtpu, v5e topology);
  the GPU kernels lower to Mosaic GPU custom calls (jax.export for CUDA); the GPU kernels'
  logic runs in Pallas' GPU interpreter.
- Dispatch and gin select the kernels without other changes.
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lexjax
from lexjax import partitioning
from lexjax import positions as P
from lexjax.attention import IMPLEMENTATIONS, MaskSpec, attend
from lexjax.attention.kernels import BlockGrid, HeadBias, cost, pallas_attention
from lexjax.attention.kernels.impl import attend_with_kernels, lowering_for_backend
from lexjax.attention.kernels.plan import KernelPlan, mask_allows

MASKS = {
    "full": MaskSpec(),
    "full_bidir": MaskSpec(causal=False),
    "window7": MaskSpec(window=7),
    "window16": MaskSpec(window=16),
    "window5_bidir": MaskSpec(causal=False, window=5),
    "chunk12": MaskSpec(chunk=12),
    "chunk10_bidir": MaskSpec(causal=False, chunk=10),
    "blockwise8": MaskSpec(blockwise=8),
    "blockwise10": MaskSpec(blockwise=10),
}
# Cheaper XLA:CPU compilation of the interpreted kernels (the tests are compile-bound).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# ----------------------------------------------------------------------------------------------
# The block walk and the kernel's mask
# ----------------------------------------------------------------------------------------------

def needed_pairs(mask, n, bq, bk):
    """Brute force: (query block, key block) pairs holding a visible (query, key), both < n."""
    q = np.arange(n)[:, None]
    k = np.arange(n)[None, :]
    qi, kj = np.nonzero(np.asarray(mask.allows(q, k)))
    return set(zip((qi // bq).tolist(), (kj // bk).tolist()))


@pytest.mark.parametrize("blocks", [(8, 8), (8, 16), (16, 8), (24, 16)])
@pytest.mark.parametrize("name", sorted(MASKS))
def test_block_walk_visits_exactly_the_needed_pairs(name, blocks):
    n = 45
    grid = BlockGrid(MASKS[name], n, *blocks)
    want = needed_pairs(MASKS[name], n, *blocks)
    real_q_blocks = range(-(-n // grid.block_q))
    by_query = set()
    for i in real_q_blocks:
        start, count = grid.kv_range(i)
        by_query |= {(i, start + t) for t in range(count)}
        assert grid.kv_block(i, count + 3) == start + count - 1  # steps past the count clamp
    by_key = set()
    for j in range(grid.num_kv_blocks):
        start, count = grid.q_range(j)
        by_key |= {(start + t, j) for t in range(count)}
    assert by_query == want
    assert by_key == want
    assert grid.kv_steps == max(grid.kv_range(i)[1] for i in real_q_blocks)


@pytest.mark.parametrize("name", sorted(MASKS))
def test_kernel_mask_equals_maskspec_allows(name):
    q = jnp.arange(70, dtype=jnp.int32)[:, None]
    k = jnp.arange(70, dtype=jnp.int32)[None, :]
    np.testing.assert_array_equal(np.asarray(mask_allows(MASKS[name], q, k)),
                                  np.asarray(MASKS[name].allows(q, k)))


# ----------------------------------------------------------------------------------------------
# Declared costs = closed-form counts of visited blocks (N = 4096, blocks of 128)
# ----------------------------------------------------------------------------------------------

def closed_form_pairs(kind, nb, m):
    """Visited block pairs for nb blocks per side; local extents are m blocks."""
    if kind == "full":
        return nb * (nb + 1) // 2
    if kind == "full_bidir":
        return nb * nb
    if kind == "window":  # a block sees itself and the m before it
        return sum(min(i, m) + 1 for i in range(nb))
    if kind == "window_bidir":
        return sum(min(i, m) + 1 + min(nb - 1 - i, m) for i in range(nb))
    if kind == "chunk":
        return (nb // m) * m * (m + 1) // 2
    if kind == "chunk_bidir":
        return (nb // m) * m * m
    if kind == "blockwise":  # BCA block 0: a triangle; later ones add the whole previous block
        return m * (m + 1) // 2 + (nb // m - 1) * (m * m + m * (m + 1) // 2)
    raise ValueError(kind)


COST_MASKS = {"full": MaskSpec(), "full_bidir": MaskSpec(causal=False),
              "window": MaskSpec(window=512), "window_bidir": MaskSpec(causal=False, window=512),
              "chunk": MaskSpec(chunk=512), "chunk_bidir": MaskSpec(causal=False, chunk=512),
              "blockwise": MaskSpec(blockwise=512)}


@pytest.mark.parametrize("kind", sorted(COST_MASKS))
def test_cost_estimates_count_only_visited_blocks(kind):
    n, b, heads, kv_heads, d, batch = 4096, 128, 8, 2, 128, 2
    grid = BlockGrid(COST_MASKS[kind], n, b, b)
    pairs = closed_form_pairs(kind, n // b, 512 // b)
    assert grid.visited_pairs == pairs
    assert int(grid.q_counts.sum()) == pairs
    plan = KernelPlan(grid=grid, num_heads=heads, num_kv_heads=kv_heads, scale=1.0)
    per_pair = b * b * batch * heads
    fwd = cost.forward(plan, batch, d, d, 2)
    assert fwd.flops == 4 * d * per_pair * pairs  # q k^T and p v
    assert fwd.transcendentals == per_pair * pairs
    assert cost.dq(plan, batch, d, d, 2).flops == 6 * d * per_pair * pairs
    assert cost.dkv(plan, batch, d, d, 2).flops == 8 * d * per_pair * pairs
    # k and v blocks are read once per visited pair and query head.
    assert fwd.bytes_accessed > 2 * d * 2 * b * pairs * batch * heads


# ----------------------------------------------------------------------------------------------
# Interpret mode == reference: outputs and all gradients
# ----------------------------------------------------------------------------------------------

def plain_bias(heads):
    """A plain callable (tabulated by the kernels): sign-sensitive and different per head."""
    amp = jnp.linspace(0.5, 2.0, heads)

    def bias(rel):
        a = amp.reshape((heads,) + (1,) * rel.ndim)
        return a * jnp.sin(0.37 * rel.astype(jnp.float32) + 0.5) - 0.05 * a * jnp.abs(rel)
    return bias


def bias_factory(kind, heads, head_dim):
    """(variables, variables -> bias) for a bias kind; learned schemes have parameters."""
    if kind is None:
        return {}, lambda variables: None
    if kind == "plain":
        return {}, lambda variables: plain_bias(heads)
    scheme = {"alibi": P.ALiBi(), "kerple": P.Kerple(),
              "t5": P.T5Buckets(num_buckets=6, max_distance=12)}[kind]
    method = type(scheme).relative_bias
    variables = scheme.init(jax.random.key(1), heads, head_dim, method=method)
    return variables, lambda v: scheme.apply(v, heads, head_dim, method=method)


def packed_segments(batch, n):
    """Three documents per row, boundaries differing per row."""
    rows = [np.repeat(np.arange(3), np.diff([0, 7 + r, 25 + 2 * r, n])) for r in range(batch)]
    return jnp.asarray(np.stack(rows), jnp.int32)


KERNEL_CASES = {
    # name: (mask, bias kind, segments, dtype, (block_q, block_kv))
    "full_alibi": (MaskSpec(), "alibi", False, jnp.float32, (16, 16)),
    "full_bidir_segments": (MaskSpec(causal=False), None, True, jnp.float32, (16, 16)),
    "window_bidir_segments_unequal_blocks": (MaskSpec(causal=False, window=7), None, True,
                                             jnp.float32, (8, 24)),
    "chunk_plain_callable": (MaskSpec(chunk=12), "plain", False, jnp.float32, (16, 16)),
    "chunk_bidir_bf16": (MaskSpec(causal=False, chunk=10), None, False, jnp.bfloat16, (16, 16)),
    "blockwise_t5_learned_segments": (MaskSpec(blockwise=10), "t5", True, jnp.float32, (16, 16)),
    "blockwise_unequal_blocks": (MaskSpec(blockwise=16), None, False, jnp.float32, (24, 8)),
}


def _relative_errors(got, want):
    return [float(jnp.linalg.norm((a - b).astype(jnp.float32))
                  / jnp.maximum(jnp.linalg.norm(b.astype(jnp.float32)), 1e-30))
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]


@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_interpret_kernels_equal_reference(case, rng):
    mask, bias_kind, segmented, dtype, (bq, bk) = KERNEL_CASES[case]
    batch, n, heads, kv_heads, d = 2, 45, 4, 2, 16  # ragged length, grouped-query heads
    q, k, v = (jnp.asarray(rng.standard_normal((batch, n, h, d)), dtype)
               for h in (heads, kv_heads, kv_heads))
    cotangent = jnp.asarray(rng.standard_normal((batch, n, heads, d)), dtype)
    segments = packed_segments(batch, n) if segmented else None
    variables, make_bias = bias_factory(bias_kind, heads, d)

    def run(kernel):
        def f(q, k, v, variables):
            bias = make_bias(variables)
            if kernel:
                return pallas_attention(q, k, v, mask=mask, bias=bias, segment_ids=segments,
                                        block_q=bq, block_kv=bk, interpret=True)
            return attend(q, k, v, mask=mask, bias=bias, impl="reference", segment_ids=segments)

        def out_and_grads(q, k, v, variables):
            out, pullback = jax.vjp(f, q, k, v, variables)
            return out, pullback(cotangent)
        return out_and_grads

    args = (q, k, v, variables)
    got = jax.jit(run(True)).lower(*args).compile(FAST_COMPILE)(*args)
    want = jax.jit(run(False))(*args)
    tolerance = 1e-4 if dtype == jnp.float32 else 2e-2
    errors = _relative_errors(got, want)
    assert len(errors) == 4 + len(jax.tree.leaves(variables))
    assert max(errors) < tolerance, dict(zip(["out", "dq", "dk", "dv", "params"], errors))
    assert got[0].dtype == dtype


def test_kernels_run_per_device_under_a_mesh(rng):
    """Under `jax.set_mesh` + logical-axis rules the kernels run in shard_map over batch (data,
    fsdp) and heads (tensor); outputs and gradients, learned KERPLE parameters included, equal
    the reference. Also the window-with-learned-bias case of the interpret tests above."""
    batch, n, heads, kv_heads, d = 4, 40, 4, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal((batch, n, h, d)), jnp.float32)
               for h in (heads, kv_heads, kv_heads))
    segments = packed_segments(batch, n)
    variables, make_bias = bias_factory("kerple", heads, d)
    mask = MaskSpec(window=11)

    def run(impl):
        def f(q, k, v, variables):
            return attend(q, k, v, mask=mask, bias=make_bias(variables), impl=impl,
                          segment_ids=segments, block_size=16 if impl == "pallas" else None)

        def out_and_grads(q, k, v, variables):
            out, pullback = jax.vjp(f, q, k, v, variables)
            return out, pullback(jnp.cos(out))
        return out_and_grads

    args = (q, k, v, variables)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2),
                             ("data", "fsdp", "tensor"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(partitioning.LOGICAL_AXIS_RULES)):
        assert "shard_map" in str(jax.make_jaxpr(run("pallas"))(*args))
        got = jax.jit(run("pallas")).lower(*args).compile(FAST_COMPILE)(*args)
    want = jax.jit(run("reference"))(*args)
    assert max(_relative_errors(got, want)) < 1e-4


def test_pallas_lowering_follows_the_backend():
    """`impl="pallas"` interprets the TPU kernels on CPU (exercised end to end by the gin test
    below) and runs the native kernels on TPU and GPU."""
    assert lowering_for_backend("cpu") == ("tpu", True)
    assert lowering_for_backend("tpu") == ("tpu", False)
    assert lowering_for_backend("gpu") == ("gpu", False)


@pytest.mark.parametrize("scheme", [P.ALiBi(), P.Sandwich(), P.Kerple(),
                                    P.Kerple(variant="power"), P.T5Buckets(),
                                    P.T5Buckets(bidirectional=True)],
                         ids=["alibi", "sandwich", "kerple_log", "kerple_power", "t5", "t5_bidir"])
def test_position_head_bias_kernel_form_equals_dense_form(scheme):
    """The schemes' `HeadBias.fn` (what kernels evaluate) equals their vectorized form."""
    heads, head_dim = 6, 32
    method = type(scheme).relative_bias
    variables = scheme.init(jax.random.key(0), heads, head_dim, method=method)
    bias = scheme.apply(variables, heads, head_dim, method=method)
    assert isinstance(bias, HeadBias) and bias.params.shape[0] == heads
    rel = jnp.arange(-300, 301, dtype=jnp.int32).reshape(1, -1)
    dense = jax.jit(lambda r: bias(r))(rel)
    per_head = jax.jit(jax.vmap(lambda theta: bias.fn(theta, rel)))(bias.params)
    assert dense.shape == (heads, 1, 601)
    np.testing.assert_allclose(np.asarray(per_head), np.asarray(dense), rtol=2e-6, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# Errors and dispatch
# ----------------------------------------------------------------------------------------------

def test_learned_plain_callable_bias_raises_clear_error(rng):
    q = jnp.asarray(rng.standard_normal((1, 16, 2, 8)), jnp.float32)
    slopes = jnp.asarray([0.5, 0.25])

    def loss(slopes):
        bias = lambda rel: -slopes.reshape(2, *(1,) * rel.ndim) * jnp.abs(rel)  # noqa: E731
        return pallas_attention(q, q, q, mask=MaskSpec(), bias=bias, interpret=True).sum()
    with pytest.raises(ValueError, match="HeadBias"):
        jax.grad(loss)(slopes)


def test_invalid_configurations_raise(rng):
    q = jnp.asarray(rng.standard_normal((1, 16, 2, 8)), jnp.float32)
    with pytest.raises(ValueError, match="multiple of 128"):
        pallas_attention(q, q, q, mask=MaskSpec(), block_q=64, lowering="tpu")
    with pytest.raises(ValueError, match="multiple of 8"):
        pallas_attention(q, q, q, mask=MaskSpec(), block_q=12, interpret=True)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        pallas_attention(q, q, q, mask=MaskSpec(), lowering="gpu")
    with pytest.raises(ValueError, match="unknown Pallas lowering"):
        pallas_attention(q, q, q, mask=MaskSpec(), lowering="cuda", interpret=True)
    with pytest.raises(TypeError, match="backend"):  # the keyword is `lowering`
        pallas_attention(q, q, q, mask=MaskSpec(), backend="tpu", interpret=True)
    with pytest.raises(ValueError, match="segment_ids must be"):
        pallas_attention(q, q, q, mask=MaskSpec(), interpret=True,
                         segment_ids=jnp.zeros((1, 15), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids must be"):
        attend(q, q, q, impl="xla", segment_ids=jnp.zeros((1, 15), jnp.int32))
    with pytest.raises(ValueError, match="heads"):
        pallas_attention(q, q, q, mask=MaskSpec(), interpret=True,
                         bias=HeadBias(fn=lambda th, r: th[0] * r, params=jnp.ones((3, 1))))


def test_pallas_implementations_are_registered():
    assert {"pallas", "pallas_tpu", "pallas_gpu"} <= set(IMPLEMENTATIONS)
    assert IMPLEMENTATIONS["pallas"] is attend_with_kernels  # lowering from the backend
    for lowering in ("tpu", "gpu"):
        forced = IMPLEMENTATIONS[f"pallas_{lowering}"]
        assert forced.func is attend_with_kernels and forced.keywords == {"lowering": lowering}


def test_gin_selects_the_kernel_without_other_changes(rng):
    bindings = ["NUM_LAYERS=1", "EMBED_DIM=32", "NUM_HEADS=4", "MLP_DIM=64", "VOCAB_SIZE=64",
                "lexjax.models.Transformer.mask = @lexjax.attention.MaskSpec()",
                "lexjax.attention.MaskSpec.window = 8"]
    gins = ["configs/models/transformer.gin", "configs/positions/alibi.gin"]
    xla = lexjax.build_model(gins, bindings)
    pallas = lexjax.build_model(gins, bindings + ['lexjax.models.Transformer.attention_impl = '
                                                  '"pallas"'])
    assert pallas.attention_impl == "pallas"
    tokens = jnp.asarray(rng.integers(0, 64, (1, 24)), jnp.int32)
    variables = jax.jit(xla.init)(jax.random.key(0), tokens)
    want = jax.jit(xla.apply)(variables, tokens)
    got = jax.jit(pallas.apply).lower(variables, tokens).compile(FAST_COMPILE)(variables, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Lowering: real Mosaic TPU compilation ahead of time, Mosaic GPU lowering, GPU interpreter
# ----------------------------------------------------------------------------------------------

def _kerple_like(heads):
    """A learned two-parameter head bias (KERPLE-log form) with its params."""
    return (lambda params: HeadBias(
        fn=lambda th, r: -th[0] * jnp.log(1.0 + th[1] * jnp.abs(r.astype(jnp.float32))),
        params=params)), jax.ShapeDtypeStruct((heads, 2), jnp.float32)


def _lowering_problem(mask, impl, bias, sharding=None, n=1024):
    """(forward, backward) functions and their abstract args: bf16, GQA, segments, learned bias."""
    heads, kv_heads, d = 4, 2, 128
    make_bias, params = _kerple_like(heads)

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    args = (spec((1, n, heads, d), jnp.bfloat16), spec((1, n, kv_heads, d), jnp.bfloat16),
            spec((1, n, kv_heads, d), jnp.bfloat16), spec((1, n), jnp.int32),
            spec(params.shape, params.dtype))

    def forward(q, k, v, segments, params):
        b = {"head": make_bias(params), "plain": plain_bias(heads), None: None,
             "sandwich": P.Sandwich().relative_bias(heads, d)}[bias]
        return attend(q, k, v, mask=mask, bias=b, impl=impl, segment_ids=segments)

    backward = jax.grad(lambda *a: forward(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 4))
    return jax.jit(forward), jax.jit(backward), args


def _tpu_sharding(topology_name: str = "v5e:1x1"):
    try:
        from jax.experimental import topologies
        topology = topologies.get_topology_desc(topology_name=topology_name, platform="tpu")
    except (ImportError, RuntimeError) as e:  # RuntimeError: JaxRuntimeError without libtpu
        pytest.skip(f"libtpu is not installed (pip install 'lexjax[tpu]'): {e}")
    mesh = jax.sharding.Mesh(np.array(topology.devices[:1]), ("x",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


@pytest.mark.parametrize("mask,bias", [(MaskSpec(window=256), "head"),
                                       (MaskSpec(causal=False, chunk=384), "plain"),
                                       (MaskSpec(blockwise=256), "sandwich")],
                         ids=["window_learned_head_bias", "chunk_bidir_table", "blockwise_sandwich"])
def test_tpu_kernels_compile_with_mosaic(mask, bias):
    forward, backward, args = _lowering_problem(mask, "pallas_tpu", bias, _tpu_sharding())
    compiled = forward.lower(*args).compile()
    hlo = forward.lower(*args).as_text()
    assert "tpu_custom_call" in hlo
    grid = BlockGrid(mask, 1024, 128, 128)
    heads, d = 4, 128
    declared = 4 * d * 128 * 128 * heads * grid.visited_pairs
    # XLA's cost analysis of the compiled forward is the kernel's declaration: the visited pairs
    # (plus, for a tabulated plain bias, the XLA ops that build the table).
    flops = compiled.cost_analysis()["flops"]
    assert flops == declared if bias != "plain" else declared < flops < 1.01 * declared
    bwd_hlo = backward.lower(*args).as_text()
    assert bwd_hlo.count("tpu_custom_call") >= 3  # forward + dq + dk/dv
    backward.lower(*args).compile()


@pytest.mark.parametrize("topology", ["v4:1x1x1", "v5p:1x1x1", "v6e:1x1"])
def test_tpu_kernels_compile_on_every_generation(topology):
    """Forward and backward with segments, GQA and a learned head bias (its parameter gradients
    reduced in the dq kernel): no relayout between lanes and sublanes, which v4 cannot do."""
    forward, backward, args = _lowering_problem(MaskSpec(window=256), "pallas_tpu", "head",
                                                _tpu_sharding(topology))
    forward.lower(*args).compile()
    backward.lower(*args).compile()


def test_pallas_picks_the_lowering_of_the_platform_compiled_for():
    """impl="pallas" under a TPU topology's mesh compiles the Mosaic kernels (not the
    interpreter of the CPU host); without a mesh it follows the default backend."""
    from lexjax import partitioning
    from lexjax.attention.kernels.impl import target_platform
    assert target_platform() == jax.default_backend() == "cpu"
    sharding = _tpu_sharding()
    with partitioning.mesh_context(sharding.mesh):
        assert target_platform() == "tpu"
        forward, _, args = _lowering_problem(MaskSpec(window=256), "pallas", None, sharding)
        assert "tpu_custom_call" in forward.lower(*args).as_text()
    assert target_platform() == "cpu"


def _custom_calls(module_text):
    return re.findall(r"stablehlo.custom_call @([A-Za-z0-9_$.]+)", module_text)


def test_gpu_kernels_lower_to_mosaic_gpu():
    forward, backward, args = _lowering_problem(MaskSpec(window=512), "pallas_gpu", "head")
    fwd_calls = _custom_calls(jax.export.export(forward, platforms=("cuda",))(*args)
                              .mlir_module())
    bwd_calls = _custom_calls(jax.export.export(backward, platforms=("cuda",))(*args)
                              .mlir_module())
    assert fwd_calls.count("mosaic_gpu_v2") == 1
    assert bwd_calls.count("mosaic_gpu_v2") == 3  # forward + dq + dk/dv


def _gpu_interpreter_problem(rng, heads, kv_heads):
    n, d = 128, 64
    q = jnp.asarray(rng.standard_normal((1, n, heads, d)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((1, n, kv_heads, d)), jnp.bfloat16)
            for _ in range(2))
    segments = jnp.asarray((np.arange(n) * 3 // n)[None], jnp.int32)
    return (q, k, v), segments, MaskSpec(window=70)


def test_gpu_forward_kernel_in_the_gpu_interpreter_equals_reference(rng):
    """The GPU forward's walk, double-buffered streams, mask, segments, in-kernel bias and online
    softmax (matmuls run as jnp.dot: the interpreter has no transposed WGMMA)."""
    (q, k, v), segments, mask = _gpu_interpreter_problem(rng, 1, 1)
    alibi = P.ALiBi().relative_bias(1, q.shape[-1])
    got = pallas_attention(q, k, v, mask=mask, bias=alibi, segment_ids=segments, lowering="gpu",
                           interpret=True)
    want = attend(q, k, v, mask=mask, bias=alibi, impl="reference", segment_ids=segments)
    assert max(_relative_errors(got, want)) < 2e-2


def test_gpu_kernel_gradients_in_the_gpu_interpreter_equal_reference(rng):
    """dq (with learned head-bias parameters) and dk/dv of the GPU kernels, GQA."""
    (q, k, v), segments, mask = _gpu_interpreter_problem(rng, 2, 1)
    make_bias, _ = _kerple_like(2)
    params = jnp.asarray([[0.7, 0.3], [0.2, 0.9]], jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def out_and_grads(kernel):
        def f(q, k, v, params):
            bias = make_bias(params)
            if kernel:
                return pallas_attention(q, k, v, mask=mask, bias=bias, segment_ids=segments,
                                        lowering="gpu", interpret=True).astype(jnp.float32)
            return attend(q, k, v, mask=mask, bias=bias, impl="reference",
                          segment_ids=segments).astype(jnp.float32)
        out, pullback = jax.vjp(f, q, k, v, params)
        return out, pullback(cotangent)
    assert max(_relative_errors(out_and_grads(True), out_and_grads(False))) < 2e-2


@pytest.mark.parametrize("capability, device_kind, refused", [
    ("9.0", "NVIDIA H100 80GB HBM3", False), ("8.0", "NVIDIA A100-SXM4-80GB", True),
    ("8.9", "NVIDIA L4", True), (None, "TPU v5 lite", False)])
def test_gpu_kernels_are_refused_on_gpus_before_hopper(capability, device_kind, refused):
    from types import SimpleNamespace

    from lexjax.attention.kernels.impl import check_gpu_kernels_run_on
    from lexjax.errors import ConfigError
    device = SimpleNamespace(platform="gpu" if capability else "tpu",
                             compute_capability=capability, device_kind=device_kind)
    if refused:
        with pytest.raises(ConfigError, match=f"Hopper.*{capability}.*attention_impl='xla'"):
            check_gpu_kernels_run_on(device)
    else:
        check_gpu_kernels_run_on(device)
