"""Evaluation (lexjax.evaluation, python -m lexjax.evaluate) against independent references:
LeX eq. 3 evaluated directly in float64, an O(N^2) numpy s_hat, windows and losses recomputed
from the corpus files themselves with numpy log-softmax."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import write_corpus
from lexjax.attention import MaskSpec
from lexjax.config import build_model, parse_gin
from lexjax.evaluation import Scorer, evaluate_lengths, resolution, sliding_windows
from lexjax.evaluation.extrapolation import summarize
from lexjax.evaluation.resolution import mean_score_by_distance

GIN_FILES = ["configs/runs/quickstart.gin", "configs/data/text_files.gin"]
TASK = "lexjax.text_files"


# ----------------------------------------------------------------------------------------------
# Attention resolution (LeX eq. 3 and 11)
# ----------------------------------------------------------------------------------------------

def eq3(scores):
    """R(s) = sum_{i=0}^{N-2} e^{s_i} (e^{s_i} - e^{s_{i+1}}) / (sum_{i=0}^{N-1} e^{s_i})^2,
    term by term in Python floats."""
    e = [math.exp(s) for s in scores]
    return sum(e[i] * (e[i] - e[i + 1]) for i in range(len(e) - 1)) / sum(e) ** 2


def test_resolution_hand_value():
    # e^s = [3, 2, 1]: numerator 3 * (3 - 2) + 2 * (2 - 1) = 5, denominator 6^2.
    assert resolution(np.log([3.0, 2.0, 1.0])) == pytest.approx(5 / 36, rel=1e-12)


@pytest.mark.parametrize("scores", [
    [2.0, 1.0, 0.5, 0.0, -1.0],
    [0.3, -0.2, 0.9, 0.1, 0.0, -2.5, 1.7],
    [0.0, 0.0, 0.0],
    [-1.0, 0.0, 1.0],
])
def test_resolution_against_eq3(scores):
    assert resolution(np.array(scores)) == pytest.approx(eq3(scores), rel=1e-12, abs=1e-15)


def test_resolution_properties():
    s = np.array([1.5, 1.0, 0.2, -0.3, -0.4, -2.0])
    for c in (-700.0, -3.0, 5.0, 800.0):  # invariant, and no overflow where e^s would
        assert resolution(s + c) == pytest.approx(resolution(s), rel=1e-12)
    assert resolution(np.zeros(16)) == 0.0  # indistinguishable distances
    assert resolution(s) > 0 > resolution(s[::-1])  # decaying vs growing with distance


def direct_mean_score(q, k, bias):
    """s_hat[n] = mean over batch and heads of 1/(N-n) sum_{i=n}^{N-1} (q_i.k_{i-n}/sqrt(d) +
    bias[h, n]); query head h reads key head h // (heads / kv_heads) (grouped-query attention)."""
    q, k, bias = (np.asarray(x, np.float64) for x in (q, k, bias))
    b, n, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros(n)
    for dist in range(n):
        total = 0.0
        for head in range(h):
            for i in range(dist, n):
                dot = np.sum(q[:, i, head] * k[:, i - dist, head // group], axis=-1)
                total += np.sum(dot / math.sqrt(d) + bias[head, dist])
        out[dist] = total / (n - dist) / (b * h)
    return out


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_mean_score_by_distance_against_direct_sum(kv_heads):
    rng = np.random.default_rng(1)
    b, n, h, d = 2, 13, 4, 8
    q = rng.normal(size=(b, n, h, d)).astype(np.float32)
    k = rng.normal(size=(b, n, kv_heads, d)).astype(np.float32)
    bias = rng.normal(size=(h, n)).astype(np.float32)
    got = mean_score_by_distance(jnp.asarray(q), jnp.asarray(k), jnp.asarray(bias))
    assert got.dtype == np.float64 and got.shape == (n,)
    np.testing.assert_allclose(got, direct_mean_score(q, k, bias), rtol=1e-4, atol=1e-5)


def test_mean_score_by_distance_uses_grouped_query_head_mapping():
    """Only kv head 0 is non-zero: with heads 0,1 -> kv 0 and 2,3 -> kv 1, only query heads 0
    and 1 contribute (a tiled mapping h % kv_heads would pick heads 0 and 2)."""
    b, n, h, d = 1, 6, 4, 2
    q = np.zeros((b, n, h, d), np.float32)
    q[..., 1, :] = 1.0  # only query head 1 is non-zero
    k = np.zeros((b, n, 2, d), np.float32)
    k[..., 0, :] = 1.0  # only kv head 0 is non-zero
    got = mean_score_by_distance(jnp.asarray(q), jnp.asarray(k), jnp.zeros((h, n)))
    np.testing.assert_allclose(got, np.full(n, d / math.sqrt(d) / h), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Sliding windows and their summary
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length,stride,max_windows", [(8, 3, None), (8, 3, 4), (8, 8, None),
                                                       (10, 4, 2), (6, 1, None)])
def test_sliding_protocol_scores_every_token_once(length, stride, max_windows):
    rng = np.random.default_rng(0)
    stream = rng.random(50)  # distinct values: a token scored twice or missed changes the mean
    windows, context_only = sliding_windows(stream, length, stride, max_windows)
    count = len(range(0, len(stream) - length + 1, stride))
    w = count if max_windows is None else min(count, max_windows)
    assert windows.shape == (w, length) and context_only == length - stride
    for j in range(w):  # window j starts j strides in
        np.testing.assert_array_equal(windows[j], stream[j * stride:j * stride + length])
    covered = (w - 1) * stride + length
    result = summarize(length, windows, context_only, bytes_per_token=1.0, windows=w)
    assert result.scored_tokens == covered
    assert result.loss == pytest.approx(float(np.mean(stream[:covered])), rel=1e-12)
    np.testing.assert_allclose(result.per_position_loss, windows.mean(axis=0), rtol=1e-12)


def test_sliding_windows_rejects_bad_stride():
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(np.arange(20), 8, 9, None)
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(np.arange(20), 8, 0, None)


# ----------------------------------------------------------------------------------------------
# evaluate_lengths on a tiny model and a tiny corpus
# ----------------------------------------------------------------------------------------------

def tiny_bindings(glob, **overrides):
    values = dict(NUM_LAYERS=2, EMBED_DIM=32, NUM_HEADS=4, MLP_DIM=64, TRAIN_STEPS=2,
                  BATCH_SIZE=2, TRAIN_LENGTH=16, CHECKPOINT_EVERY=2, LOG_EVERY=1, EVAL_EVERY=0,
                  WARMUP_STEPS=1, MIXTURE_OR_TASK_NAME=repr(TASK), TEXT_FILES_GLOB=repr(glob))
    values.update(overrides)
    return [f"{k} = {v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    cache = str(tmp_path_factory.mktemp("data_cache"))
    mp.setenv("LEXJAX_DATA_CACHE", cache)
    root = str(tmp_path_factory.mktemp("corpus"))
    yield write_corpus(root, train_files=12), root, cache
    gin.clear_config()
    mp.undo()


def stream_from_files(root):
    """The test split, built here from the files: sorted by name, each file's bytes + 3 (byte
    vocabulary: 0 pad, 1 EOS, 2 UNK), then EOS."""
    from lexjax.data import split_of

    tokens = []
    for name in sorted(os.listdir(root)):
        if split_of(name) == "test":
            with open(os.path.join(root, name), "rb") as f:
                tokens.extend(b + 3 for b in f.read())
            tokens.append(1)
    return np.array(tokens, np.int64)


def np_token_losses(apply, variables, windows):
    """float64 `[W, L]` next-token losses: numpy log-softmax of the logits of BOS + window[:-1]."""
    windows = np.asarray(windows, np.int64)
    inputs = np.concatenate([np.zeros_like(windows[:, :1]), windows[:, :-1]], axis=1)
    logits = np.asarray(apply(variables, jnp.asarray(inputs, jnp.int32)), np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
    return log_z - np.take_along_axis(logits, windows[..., None], axis=-1)[..., 0]


@pytest.fixture(scope="module")
def fresh_model(corpus):
    glob, _, _ = corpus
    model = build_model(GIN_FILES, tiny_bindings(glob))
    variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(3), jnp.zeros((1, 16), jnp.int32)))
    return model, variables


def data_config(glob):
    from lexjax.data import DataConfig
    return DataConfig(task=TASK, text_files_glob=glob)


def test_evaluate_lengths_against_numpy(corpus, fresh_model):
    glob, root, _ = corpus
    model, variables = fresh_model
    lengths, max_tokens = [16, 48], 192
    # batch_size 3 does not divide 4 windows of 48: the last batch is padded and cut again.
    results = evaluate_lengths(model, variables, data_config(glob), lengths,
                               max_tokens=max_tokens, batch_size=3, resolution_max_length=16)
    stream = stream_from_files(root)
    apply = jax.jit(model.apply)
    assert [r.length for r in results] == lengths
    for r in results:
        w = max_tokens // r.length
        assert len(stream) >= w * r.length  # the corpus is big enough for the budget
        windows = stream[:w * r.length].reshape(w, r.length)
        losses = np_token_losses(apply, variables, windows)
        assert (r.windows, r.scored_tokens) == (w, w * r.length)
        assert r.loss == pytest.approx(losses.mean(), rel=1e-5)
        assert r.perplexity == pytest.approx(math.exp(losses.mean()), rel=1e-5)
        assert r.bits_per_byte == pytest.approx(r.loss / math.log(2), rel=1e-12)  # 1 byte/token
        np.testing.assert_allclose(r.per_position_loss, losses.mean(axis=0), rtol=1e-4)
        if r.length <= 16:
            assert r.resolution is not None and math.isfinite(r.resolution)
        else:
            assert r.resolution is None  # above resolution_max_length
        assert r.row(16)["x_train"] == r.length / 16


def test_evaluate_lengths_sliding_against_numpy(corpus, fresh_model):
    glob, root, _ = corpus
    model, variables = fresh_model
    length, stride, max_tokens = 32, 8, 256
    (r,) = evaluate_lengths(model, variables, data_config(glob), [length],
                            max_tokens=max_tokens, batch_size=4, stride=stride,
                            resolution_max_length=0)
    stream = stream_from_files(root)
    w = max_tokens // length
    windows = np.stack([stream[j * stride:j * stride + length] for j in range(w)])
    losses = np_token_losses(jax.jit(model.apply), variables, windows)
    scored = np.concatenate([losses[0], losses[1:, length - stride:].ravel()])
    assert r.windows == w and r.scored_tokens == length + (w - 1) * stride == scored.size
    assert r.loss == pytest.approx(scored.mean(), rel=1e-5)
    assert r.resolution is None  # resolution_max_length=0


# ----------------------------------------------------------------------------------------------
# python -m lexjax.evaluate
# ----------------------------------------------------------------------------------------------

def test_the_scorer_gives_the_same_losses_on_a_sharded_mesh(corpus, fresh_model):
    """The one scoring path (validation, evaluate, studies): batches laid out over the data
    axis of a mesh score exactly as on one device, and as numpy does."""
    from lexjax import partitioning

    _, root, _ = corpus
    model, variables = fresh_model
    windows = stream_from_files(root)[:6 * 16].reshape(6, 16)
    one = Scorer(model, batch_size=4)(variables, windows)
    mesh = partitioning.make_mesh("data:2,tensor:2", jax.devices()[:4])
    sharded = Scorer(model, batch_size=4, mesh=mesh)
    placed = jax.device_put(variables, partitioning.replicated(mesh))
    np.testing.assert_allclose(sharded(placed, windows), one, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one, np_token_losses(jax.jit(model.apply), variables, windows),
                               rtol=1e-5)
    three = Scorer(model, batch_size=3, mesh=mesh)  # rounded up to the mesh's 2 batch ways
    assert three.batch_size == 4
    np.testing.assert_allclose(three(placed, windows), one, rtol=1e-5, atol=1e-6)


def test_resolution_is_none_for_a_model_without_softmax_attention(corpus):
    from lexjax.evaluation import attention_resolution

    model = build_model(["configs/models/gss.gin"], ["NUM_LAYERS=1", "EMBED_DIM=16",
                                                     "MLP_DIM=32", "VOCAB_SIZE=64"])
    tokens = jnp.ones((1, 8), jnp.int32)
    assert attention_resolution(model, model.init(jax.random.PRNGKey(0), tokens), tokens) is None


@pytest.fixture(scope="module")
def tiny_run(corpus, tmp_path_factory):
    from lexjax.runs import configured_training
    from lexjax.training import train

    glob, _, _ = corpus
    model_dir = str(tmp_path_factory.mktemp("eval_run") / "run")
    parse_gin(GIN_FILES, tiny_bindings(glob))
    train(*configured_training(), model_dir, progress=False)
    gin.clear_config()
    return model_dir


def test_load_run_returns_what_it_read_and_leaves_no_gin_state(tiny_run, corpus):
    from lexjax.runs import load_run

    glob, _, _ = corpus
    run = load_run(tiny_run)
    assert gin.config_str().strip() == ""
    assert run.config.data.task == TASK and run.config.data.text_files_glob == glob
    assert (run.config.train_length, run.step, run.meta["model"]) == (16, 2, "Transformer")
    assert run.model.num_layers == 2 and set(run.variables) == {"params"}


def test_evaluate_cli_writes_the_report(tiny_run, corpus, tmp_path):
    _, _, cache = corpus
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", LEXJAX_DATA_CACHE=cache)
    # --task: another corpus than the run's (the in-process test below covers the run's own).
    proc = subprocess.run(
        [sys.executable, "-m", "lexjax.evaluate", f"--model_dir={tiny_run}", "--lengths=16,32",
         "--max_tokens=64", "--batch_size=2", "--task=lexjax.stdlib_code"],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = os.path.join(tiny_run, "eval")
    names = sorted(os.listdir(out))
    assert names == [f"extrapolation.{e}" for e in ("csv", "json", "md", "png")]
    with open(os.path.join(out, "extrapolation.json")) as f:
        report = json.load(f)
    rows = report["rows"]
    assert [r["length"] for r in rows] == [16, 32]
    assert report["train_length"] == 16 and report["task"] == "lexjax.stdlib_code"
    assert report["step"] == 2
    for r in rows:
        assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2), rel=1e-9)
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-9)
        assert r["windows"] == 64 // r["length"] and r["x_train"] == r["length"] / 16
    with open(os.path.join(out, "extrapolation.csv")) as f:
        table = list(csv.DictReader(f))
    assert [int(r["length"]) for r in table] == [16, 32]
    assert float(table[0]["loss"]) == pytest.approx(rows[0]["loss"], rel=1e-9)
    with open(os.path.join(out, "extrapolation.md")) as f:
        markdown = f.read()
    assert markdown.count("\n| 16 |") == 1 and markdown.count("\n| 32 |") == 1
    with open(os.path.join(out, "extrapolation.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| length |" in proc.stdout and "Traceback" not in proc.stderr


def test_evaluate_main_on_a_text_files_run_uses_its_own_task(tiny_run, tmp_path):
    import lexjax.evaluate

    gin.clear_config()  # as in a fresh `python -m lexjax.evaluate` process
    # The run's own task needs the run's gin data bindings (the text-files glob) at evaluation.
    assert lexjax.evaluate.main([f"--model_dir={tiny_run}", "--lengths=16", "--max_tokens=32",
                                 "--batch_size=2", "--name=own_task"]) == 0
    with open(os.path.join(tiny_run, "eval", "own_task.json")) as f:
        assert json.load(f)["task"] == TASK


@pytest.mark.parametrize("mask", [MaskSpec(blockwise=4), MaskSpec(window=5),
                                  MaskSpec(chunk=4), MaskSpec()])
def test_mean_score_by_distance_counts_only_the_pairs_the_mask_admits(mask):
    """Against every (query, key) score written out in float64 and averaged by distance over the
    pairs the inference mask admits; -inf where it admits none (BCA at 13 tokens, blocks of 4:
    distances above 7 are never attended)."""
    rng = np.random.default_rng(2)
    b, n, h, d = 2, 13, 4, 8
    q = rng.normal(size=(b, n, h, d))
    k = rng.normal(size=(b, n, 2, d))
    bias = rng.normal(size=(h, n))
    scores = np.einsum("bqhd,bkhd->bhqk", q, np.repeat(k, 2, axis=2)) / math.sqrt(d)
    distance = np.arange(n)[:, None] - np.arange(n)[None, :]
    scores = scores + bias[:, np.clip(distance, 0, n - 1)][None]
    admitted = np.asarray(mask.allows(np.arange(n)[:, None], np.arange(n)[None, :]))
    want = np.full(n, -np.inf)
    for dist in range(n):
        pairs = admitted & (distance == dist)
        if pairs.any():
            want[dist] = scores[:, :, pairs].mean()
    got = mean_score_by_distance(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                 jnp.asarray(bias, jnp.float32), mask)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    if mask.blockwise:
        assert np.all(np.isinf(got[2 * 4:])) and np.all(np.isfinite(got[:2 * 4]))
        assert resolution(got) > resolution(np.where(np.isinf(got), got[7], got))


def test_resolution_under_bca_reads_the_inference_mask():
    """A model evaluated under blockwise causal attention is measured on the scores that mask
    admits: distances of two blocks or more are never attended (-inf), and R differs from the
    training mask's."""
    from lexjax.evaluation import attention_resolution

    model = build_model(["configs/models/transformer.gin", "configs/positions/xpos.gin"],
                        ["NUM_LAYERS=1", "EMBED_DIM=16", "NUM_HEADS=2", "MLP_DIM=32",
                         "VOCAB_SIZE=64"])
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 64, (2, 16)), jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), tokens)
    full_r, full = attention_resolution(model, variables, tokens)
    bca_r, bca = attention_resolution(model.clone(inference_mask=MaskSpec(blockwise=4)),
                                      variables, tokens)
    assert np.all(np.isfinite(full)) and np.all(np.isinf(bca[8:])) and bca_r != full_r
    assert np.all(np.isfinite(bca[:8]))
