"""DeBERTa (`lexjax.models.DeBERTa`, `lexjax.layers.disentangled`): the log-bucket index against
the official formula written out here, the disentangled attention against a float64 numpy
implementation of the official / transformers scores (both projection modes, each position term,
packed documents, the mask decoder's own queries, the blocked path with several blocks, local
masks), the attention core refusing a content bias on the Pallas kernels, and the model:
bidirectional, absolute positions only in the enhanced mask decoder (which reruns the last block
twice with queries H + P), packed documents, the length limit, FLOPs against XLA, gradients."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lexjax
from lexjax.attention import MaskSpec, attend
from lexjax.layers.disentangled import (DisentangledLayer, DisentangledSelfAttention,
                                        RelativePositions)

SMALL = ["NUM_LAYERS=2", "EMBED_DIM=64", "NUM_HEADS=4", "MLP_DIM=128"]
EMBED, HEADS, HEAD_DIM = 64, 4, 16


@functools.lru_cache(maxsize=None)
def base_model():
    return lexjax.build_model(["configs/models/deberta.gin"], SMALL)


def build(**fields):
    return base_model().clone(**fields)


def tokens_of(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(3, 259, shape), jnp.int32)


@functools.lru_cache(maxsize=None)
def jitted(model):
    """`model.apply`, jitted once per model (eager applies compile op by op: slower here)."""
    return jax.jit(model.apply)


def init(model, tokens):
    return jax.jit(model.init)(jax.random.PRNGKey(0), tokens)


# -- the bucket function ------------------------------------------------------------------------

def official_bucket(r: int, buckets: int, max_position: int) -> int:
    """`make_log_bucket_position` of microsoft/DeBERTa (da_utils.py) for one distance, float64."""
    sign = (r > 0) - (r < 0)
    mid = buckets // 2
    abs_pos = mid - 1 if -mid < r < mid else abs(r)
    if abs_pos <= mid:
        return r
    log_pos = math.ceil(math.log(abs_pos / mid) / math.log((max_position - 1) / mid)
                        * (mid - 1)) + mid
    return int(log_pos * sign)


def official_index(r: int, buckets: int, max_relative: int) -> int:
    """The table row of distance r = i - j: clamp(bucket(r) + span, 0, 2 span - 1) (v1, no
    buckets: clamp(r + max_relative, ...))."""
    span = buckets or max_relative
    rel = official_bucket(r, buckets, max_relative) if buckets else r
    return min(max(rel + span, 0), 2 * span - 1)


@pytest.mark.parametrize("buckets,max_relative", [(256, 512), (32, 64), (4, 8), (0, 512),
                                                  (0, 24)])
def test_index_matches_the_official_formula_at_every_distance(buckets, max_relative):
    relative = RelativePositions(buckets, max_relative)
    assert relative.span == (buckets or max_relative)
    distances = np.arange(-5000, 5001)  # near (every bucket boundary) and far (saturated)
    expected = np.asarray([official_index(int(r), buckets, max_relative) for r in distances])
    got = np.asarray(relative.index(jnp.asarray(distances, jnp.int32)))
    bad = np.flatnonzero(got != expected)
    assert bad.size == 0, (distances[bad[:10]], got[bad[:10]], expected[bad[:10]])
    # the table is used in full and saturates at both ends
    assert expected.min() == 0 and expected.max() == 2 * relative.span - 1
    assert len(set(expected.tolist())) == 2 * relative.span
    huge = jnp.asarray([-10 ** 9, -10 ** 6, 10 ** 6, 10 ** 9], jnp.int32)
    np.testing.assert_array_equal(relative.index(huge), [0, 0, 2 * relative.span - 1,
                                                        2 * relative.span - 1])
    # any shape: [q, k] distances index element-wise
    grid = jnp.arange(40)[:, None] - jnp.arange(40)[None, :]
    np.testing.assert_array_equal(
        relative.index(grid), [[official_index(i - j, buckets, max_relative)
                                for j in range(40)] for i in range(40)])


def test_buckets_match_transformers_if_installed():
    torch = pytest.importorskip("torch")
    modeling = pytest.importorskip("transformers.models.deberta_v2.modeling_deberta_v2")
    distances = np.arange(-3000, 3001)
    ours = np.asarray(RelativePositions(256, 512).index(jnp.asarray(distances, jnp.int32))) - 256
    theirs = modeling.make_log_bucket_position(torch.tensor(distances), 256, 512).numpy()
    np.testing.assert_array_equal(ours, np.clip(theirs, -256, 255))


def test_bad_bucket_configs_are_refused():
    for buckets, max_relative in [(2, 512), (-1, 512), (256, 1)]:
        with pytest.raises(ValueError, match="position_buckets"):
            RelativePositions(buckets, max_relative)


# -- the attention against float64 numpy --------------------------------------------------------

def numpy_attention(params, x, rel, relative, terms, share, allowed, queries=None):
    """The official / transformers disentangled attention in float64 (bias-free projections, as
    the layer's): `[b, n, embed]`. `allowed`: bool `[b, n, n]` (query, key)."""
    w = {name: np.asarray(p["kernel"], np.float64) for name, p in params.items()}
    x = np.asarray(x, np.float64)
    xq = x if queries is None else np.asarray(queries, np.float64)
    rel = np.asarray(rel, np.float64)
    q = np.einsum("bne,ehd->bhnd", xq, w["query"])
    k = np.einsum("bne,ehd->bhnd", x, w["key"])
    v = np.einsum("bne,ehd->bhnd", x, w["value"])
    b, h, n, d = q.shape
    buckets, max_relative = relative.position_buckets, relative.max_relative_positions
    span = buckets or max_relative
    # relative_pos[a, c] = bucket(a - c) (transformers' build_relative_position)
    relative_pos = np.asarray([[official_bucket(a - c, buckets, max_relative) if buckets
                                else a - c for c in range(n)] for a in range(n)])
    scores = q @ k.swapaxes(-1, -2)
    if "c2p" in terms:
        pos_key = np.einsum("re,ehd->hrd", rel, w["key" if share else "position_key"])
        c2p = np.einsum("bhid,hrd->bhir", q, pos_key)        # query i vs relative key r
        c2p_pos = np.clip(relative_pos + span, 0, 2 * span - 1)
        scores = scores + np.take_along_axis(c2p, np.broadcast_to(c2p_pos, (b, h, n, n)), -1)
    if "p2c" in terms:
        pos_query = np.einsum("re,ehd->hrd", rel, w["query" if share else "position_query"])
        p2c = np.einsum("bhjd,hrd->bhjr", k, pos_query)      # key j vs relative query r
        p2c_pos = np.clip(-relative_pos + span, 0, 2 * span - 1)  # transformers: -r_pos ...
        gathered = np.take_along_axis(p2c, np.broadcast_to(p2c_pos, (b, h, n, n)), -1)
        scores = scores + gathered.swapaxes(-1, -2)            # ... on the transposed matrix
    scores = scores / math.sqrt(d * (1 + len(terms)))
    scores = np.where(allowed[:, None], scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs = probs / probs.sum(-1, keepdims=True)
    out = np.einsum("bhij,bhjd->bihd", probs, v)
    return np.einsum("bihd,hde->bie", out, w["out"])


def allowed_by(n, batch, *, window=None, chunk=None, global_tokens=0, segment_ids=None):
    """bool `[batch, n, n]` written from the masks' definitions."""
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    ok = np.ones((n, n), bool)
    if window is not None:
        ok = np.abs(i - j) < window
    if chunk is not None:
        ok = i // chunk == j // chunk
    if global_tokens:
        ok = ok | (i < global_tokens) | (j < global_tokens)
    ok = np.broadcast_to(ok, (batch, n, n))
    if segment_ids is not None:
        s = np.asarray(segment_ids)
        ok = ok & (s[:, :, None] == s[:, None, :])
    return ok


N = 50  # past max_relative 32 (saturated buckets) and not a multiple of the block (16)


def inputs(seed=0, n=N, span=16):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, n, EMBED)), jnp.float32)
    rel = jnp.asarray(rng.normal(size=(2 * span, EMBED)), jnp.float32)
    return x, rel


def check_layer(relative, terms, share, *, mask=MaskSpec(causal=False), segment_ids=None,
                queries=None, allowed=None, seed=0):
    x, rel = inputs(seed, span=relative.span)
    layer = DisentangledSelfAttention(num_heads=HEADS, head_dim=HEAD_DIM, relative=relative,
                                      mask=mask, terms=terms, share_projections=share)
    params = nn.unbox(layer.init(jax.random.PRNGKey(seed), x, rel)["params"])
    expected_names = {"query", "key", "value", "out"}
    if not share:
        expected_names |= {"position_key"} if "c2p" in terms else set()
        expected_names |= {"position_query"} if "p2c" in terms else set()
    assert set(params) == expected_names
    allowed = allowed_by(N, 2) if allowed is None else allowed
    expected = numpy_attention(params, x, rel, relative, terms, share, allowed, queries)
    for impl, block_size in [("reference", None), ("xla", 16)]:
        got = layer.clone(attention_impl=impl, block_size=block_size).apply(
            {"params": params}, x, rel, segment_ids, queries)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4, err_msg=impl)


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("terms", [("c2p", "p2c"), ("c2p",), ("p2c",)])
def test_attention_matches_numpy(share, terms):
    check_layer(RelativePositions(16, 32), terms, share)


def test_attention_without_buckets_matches_numpy():
    check_layer(RelativePositions(0, 12), ("c2p", "p2c"), False, seed=1)


def test_no_position_terms_is_content_attention():
    check_layer(RelativePositions(16, 32), (), True, seed=2)


def test_packed_documents_and_mask_decoder_queries_match_numpy():
    segments = np.asarray([[1] * 20 + [2] * 30, [1] * 33 + [2] * 12 + [3] * 5], np.int32)
    queries = inputs(seed=7)[0]
    check_layer(RelativePositions(16, 32), ("c2p", "p2c"), True,
                segment_ids=jnp.asarray(segments), queries=queries,
                allowed=allowed_by(N, 2, segment_ids=segments), seed=3)


@pytest.mark.parametrize("mask,allowed,packed", [
    (MaskSpec(causal=False, window=16), allowed_by(N, 2, window=16), False),
    (MaskSpec(causal=False, chunk=16, global_tokens=2),
     allowed_by(N, 2, chunk=16, global_tokens=2), False),
    (MaskSpec(causal=False, chunk=16, global_tokens=2),
     allowed_by(N, 2, chunk=16, global_tokens=2,
                segment_ids=np.asarray([[1] * 27 + [2] * 23] * 2)), True),
])
def test_local_masks_match_numpy(mask, allowed, packed):
    segments = jnp.asarray([[1] * 27 + [2] * 23] * 2, jnp.int32) if packed else None
    check_layer(RelativePositions(16, 32), ("c2p", "p2c"), True, mask=mask,
                segment_ids=segments, allowed=allowed, seed=4)


def test_pallas_refuses_a_content_bias():
    q = jnp.ones((1, 16, 2, 8), jnp.float32)

    def zero_bias(q_pos, k_pos):
        return jnp.zeros((1, 2, q_pos.shape[-1], k_pos.shape[-1]))

    for impl in ("pallas", "pallas_tpu", "pallas_gpu"):
        with pytest.raises(ValueError, match="content bias"):
            attend(q, q, q, mask=MaskSpec(causal=False), impl=impl, content_bias=zero_bias)
    # ... while reference and xla take it (a zero bias changes nothing)
    plain = attend(q, q, q, mask=MaskSpec(causal=False), impl="reference")
    for impl in ("reference", "xla"):
        np.testing.assert_allclose(attend(q, q, q, mask=MaskSpec(causal=False), impl=impl,
                                          content_bias=zero_bias), plain, atol=1e-6)


# -- the model ----------------------------------------------------------------------------------
# Parameters do not depend on the length, nor on enhanced_mask_decoder / position_terms (a model
# that does not read mask_decoder_position ignores it): the MLM and classifier variables are
# initialized once. Most tests use [2, L] tokens so that the jitted applies are shared.
L = 16


@functools.lru_cache(maxsize=None)
def variables_of(num_classes=None):
    return init(build(num_classes=num_classes), tokens_of((1, 8)))


def test_mlm_and_classifier_are_bidirectional():
    model, variables = build(), variables_of()
    tokens = tokens_of((2, L))
    logits = jitted(model)(variables, tokens)
    assert logits.shape == (2, L, 384) and bool(jnp.all(jnp.isfinite(logits)))
    later = jitted(model)(variables, tokens.at[:, L - 2].set(9))
    assert float(jnp.max(jnp.abs(later[:, 1] - logits[:, 1]))) > 1e-5  # a later token counts
    classifier, cvars = build(num_classes=3), variables_of(3)
    assert "mask_decoder_position" not in cvars["params"]
    out = jitted(classifier)(cvars, tokens)
    assert out.shape == (2, 3) and bool(jnp.all(jnp.isfinite(out)))
    moved = jitted(classifier)(cvars, tokens.at[:, L - 2].set(9))
    assert float(jnp.max(jnp.abs(moved - out))) > 1e-6


def test_positions_enter_only_through_the_position_terms():
    """Without the mask decoder and the position terms the encoder has no position information:
    permuting the tokens permutes the logits. With the terms it does not."""
    tokens = tokens_of((2, L), seed=3)
    perm = np.random.default_rng(0).permutation(L)
    for terms, equivariant in [((), True), (("c2p", "p2c"), False)]:
        model = build(enhanced_mask_decoder=False, position_terms=terms)
        permuted = jitted(model)(variables_of(), tokens[:, perm])
        gap = float(jnp.max(jnp.abs(permuted - jitted(model)(variables_of(), tokens)[:, perm])))
        assert (gap < 1e-4) == equivariant, (terms, gap)


def test_enhanced_mask_decoder_reruns_the_last_block_with_absolute_positions():
    tokens = tokens_of((2, L), seed=5)
    model, variables = build(), variables_of()
    table = nn.unbox(variables["params"])["mask_decoder_position"]["embedding"]
    assert table.shape == (512, EMBED)
    plain = build(enhanced_mask_decoder=False)
    assert "mask_decoder_position" not in nn.unbox(
        jax.eval_shape(plain.init, jax.random.PRNGKey(0), tokens)["params"])

    # dataflow: layer_0(E) = H; layer_1(H, queries H + P) = Q1; layer_1(H, queries Q1) = Q2
    names = []

    @jax.jit
    def traced(variables, tokens):
        calls = []

        def record(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if (isinstance(context.module, DisentangledLayer)
                    and context.method_name == "__call__"):
                names.append(context.module.name)
                calls.append((args[0], args[3] if len(args) > 3 else None, out))
            return out

        with nn.intercept_methods(record):
            return model.apply(variables, tokens), calls

    logits, calls = traced(variables, tokens)
    assert names == ["layer_0", "layer_1", "layer_1"]
    (_, no_queries, hidden), (first_x, first_q, first_out), (second_x, second_q, _) = calls
    assert no_queries is None
    np.testing.assert_array_equal(first_x, hidden)
    np.testing.assert_array_equal(second_x, hidden)
    np.testing.assert_allclose(first_q, hidden + table[:L][None], atol=1e-6)
    np.testing.assert_array_equal(second_q, first_out)
    assert float(jnp.max(jnp.abs(jitted(plain)(variables, tokens) - logits))) > 1e-4

    # the table reaches the MLM logits through the rows of the positions only (a random push:
    # one along the all-ones direction would vanish in the layer norms)
    push = jnp.asarray(np.random.default_rng(2).normal(size=table.shape), jnp.float32)
    rows = (jnp.arange(table.shape[0]) < L)[:, None]

    def with_table(params, new):
        return {"params": {**params, "mask_decoder_position": {"embedding": new}}}
    moved = jitted(model)(with_table(variables["params"], table + jnp.where(rows, push, 0)),
                          tokens)
    assert float(jnp.max(jnp.abs(moved - logits))) > 1e-3
    np.testing.assert_array_equal(jitted(model)(
        with_table(variables["params"], table + jnp.where(rows, 0, push)), tokens), logits)
    # the classifier reads the plain stack: a table beside its parameters is never read
    classifier, cparams = build(num_classes=3), variables_of(3)["params"]
    out = jitted(classifier)({"params": cparams}, tokens)
    for new in (table, table + push):
        np.testing.assert_array_equal(jitted(classifier)(with_table(cparams, new), tokens), out)


def test_mlm_longer_than_max_positions_is_refused():
    params = variables_of()["params"]
    short = {"params": {**params, "mask_decoder_position": {
        "embedding": nn.unbox(params["mask_decoder_position"]["embedding"])[:32]}}}
    model = build(max_positions=32)
    assert jitted(model)(short, tokens_of((1, 32))).shape == (1, 32, 384)
    with pytest.raises(ValueError, match=r"32 absolute positions but the input has 40.*MAX_POSITIONS"):
        jitted(model)(short, tokens_of((1, 40)))
    # the plain stack and classifiers read any length (relative positions only)
    plain = build(max_positions=32, enhanced_mask_decoder=False)
    assert jitted(plain)(short, tokens_of((1, 40))).shape == (1, 40, 384)
    classifier = build(max_positions=32, num_classes=3)
    assert jitted(classifier)(variables_of(3), tokens_of((1, 40))).shape == (1, 3)


@pytest.mark.parametrize("block_size", [None, 8])
def test_packed_documents_get_their_own_logits(block_size):
    """Each document of a packed row (and padding after them) gets the logits it gets alone:
    attention stays inside the document, relative distances are the document's, and the mask
    decoder's absolute positions restart at each document. Block 8: several query blocks."""
    model, variables = build(attention_block_size=block_size), variables_of()
    alone = tokens_of((2, 8), 1)  # two documents, each run alone
    packed = jnp.concatenate([alone[:1], alone[1:], jnp.zeros((1, 4), jnp.int32)], axis=1)
    segments = jnp.asarray([[1] * 8 + [2] * 8 + [0] * 4], jnp.int32)
    together = jitted(model)(variables, packed, segment_ids=segments)
    separate = jitted(model)(variables, alone)
    np.testing.assert_allclose(together[:, :8], separate[:1], atol=2e-5)
    np.testing.assert_allclose(together[:, 8:16], separate[1:], atol=2e-5)
    # without segment ids the second document sees the first, at other absolute positions
    unpacked = jitted(model)(variables, packed)
    assert float(jnp.max(jnp.abs(unpacked[:, 8:16] - together[:, 8:16]))) > 1e-4


def test_flops_per_token_matches_xla():
    """The analytic count against XLA's cost analysis of the compiled forward pass. Not exact:
    XLA also counts elementwise work (layer norms, GELU, residuals, the softmax's exp / sum /
    divide, the mask) and the c2p / p2c scores against all 2 span relative embeddings the same
    way, so they agree within 0.75-1.3."""
    model = build()
    length = 256
    variables = variables_of()
    toks = jax.ShapeDtypeStruct((1, length), jnp.int32)
    cost = jax.jit(model.apply).lower(variables, toks).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"] / length
    ratio = model.flops_per_token(length) / xla
    assert 0.75 < ratio < 1.3, (model.flops_per_token(length), xla)
    # the position terms and the mask decoder's extra pass are counted
    assert build(position_terms=()).flops_per_token(length) < model.flops_per_token(length)
    assert (build(enhanced_mask_decoder=False).flops_per_token(length)
            < model.flops_per_token(length))


def test_gradients_are_finite_and_reach_the_position_tables():
    """Every parameter gets a finite, non-zero gradient (v1's separate position projections
    included); of the relative and absolute tables exactly the rows that are read do."""
    model = build(share_position_projections=False)
    n = 24
    tokens = tokens_of((2, n), seed=6)
    variables = init(model, tokens)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, n, 384)), jnp.float32)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, tokens) * weights)))(
        variables["params"])
    grads = nn.unbox(grads)
    for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert bool(jnp.all(jnp.isfinite(leaf))), jax.tree_util.keystr(path)
        assert float(jnp.max(jnp.abs(leaf))) > 0, jax.tree_util.keystr(path)
    for layer in ("layer_0", "layer_1"):
        assert {"position_key", "position_query"} <= set(grads[layer]["attention"])
    # exactly the rows of the distances that occur (|i - j| < n) get gradients
    relative = model.relative_positions
    used = np.zeros(2 * relative.span, bool)
    used[[official_index(r, relative.position_buckets, relative.max_relative_positions)
          for r in range(-(n - 1), n)]] = True
    rel_rows = np.abs(np.asarray(grads["relative_embeddings"])).max(-1) > 0
    np.testing.assert_array_equal(rel_rows, used)
    pos_rows = np.abs(np.asarray(grads["mask_decoder_position"]["embedding"])).max(-1) > 0
    np.testing.assert_array_equal(pos_rows, np.arange(model.max_positions) < n)
