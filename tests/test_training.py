"""The trainer (lexjax.training) end to end on a tiny model and a tiny local corpus.

Every run is a real `lexjax.training.train(model, config, model_dir)` call with the model and
`TrainConfig` that gin binds, exactly as the CLI reads them (configs/runs/quickstart.gin +
configs/data/text_files.gin + bindings), on a
1-layer, 32-wide model over a few KB of text written to a tmp dir. The runs are shared by the
tests through module-scoped fixtures (each run costs a few seconds, mostly XLA compilation), and
each test checks one property against an independent reference: a second run, a numpy
recomputation, a hand-computed schedule, TensorFlow's own event-file reader, XLA's cost analysis.
"""
from __future__ import annotations

import math
import os
import re
import shutil

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lexjax
from helpers import write_corpus
from lexjax.attention import MaskSpec
from lexjax.config import build_model, parse_gin
from lexjax.models import Transformer
from lexjax.positions import NoPE
from lexjax.runs import configured_training
from lexjax.training import (CheckpointError, Checkpointer, OptimizerConfig, ShardedTrainStep,
                             TrainingError, TrainState, check_logical_axes,
                             learning_rate_schedule, make_optimizer, make_train_step, train)
from lexjax.training import state as state_lib
from lexjax.training.flops import xla_flops
from lexjax.training.metrics import read_metrics

GIN_FILES = ["configs/runs/quickstart.gin", "configs/data/text_files.gin"]
TASK = "lexjax.text_files"
BATCH, LENGTH, STEPS = 4, 16, 8


# ----------------------------------------------------------------------------------------------
# A tiny corpus and tiny runs
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The corpus glob, with LEXJAX_DATA_CACHE in a tmp dir for the whole module."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LEXJAX_DATA_CACHE", str(tmp_path_factory.mktemp("data_cache")))
    glob = write_corpus(str(tmp_path_factory.mktemp("corpus")))
    yield glob
    gin.clear_config()
    mp.undo()


def bindings(glob, **overrides):
    values = dict(NUM_LAYERS=1, EMBED_DIM=32, NUM_HEADS=2, MLP_DIM=64, TRAIN_STEPS=STEPS,
                  BATCH_SIZE=BATCH, TRAIN_LENGTH=LENGTH, CHECKPOINT_EVERY=4, LOG_EVERY=1,
                  EVAL_EVERY=0, WARMUP_STEPS=2, MIXTURE_OR_TASK_NAME=repr(TASK),
                  TEXT_FILES_GLOB=repr(glob))
    values.update(overrides)
    return [f"{k} = {v}" for k, v in values.items()]


def run(model_dir, glob, init_from=None, gin_files=GIN_FILES, **overrides):
    """One run, configured as `python -m lexjax.train` configures it."""
    parse_gin(gin_files, bindings(glob, **overrides))
    model, config = configured_training()
    return train(model, config, str(model_dir), init_from, progress=False)


def data_config(glob):
    from lexjax.data import DataConfig
    return DataConfig(task=TASK, text_files_glob=glob)


def configured_model(glob, **overrides):
    return build_model(GIN_FILES, bindings(glob, **overrides))


def abstract_params(model, length=LENGTH):
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                           jax.ShapeDtypeStruct((1, length), jnp.int32))["params"]
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                  nn.unbox(boxed))


def restore_params(model_dir, model, step=None):
    checkpointer = Checkpointer(str(model_dir), read_only=True)
    return checkpointer.restore_params(abstract_params(model), step)


def np_mean_loss(model, params, tokens, segments=None):
    """Mean next-token cross entropy, float64 numpy: the model reads BOS (0) + tokens[:, :-1]
    (with `segments`: BOS at every segment's first token, and the model keeps them apart)."""
    tokens = np.asarray(tokens, np.int64)
    inputs = np.concatenate([np.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
    kwargs = {}
    if segments is not None:
        starts = np.concatenate([np.ones_like(segments[:, :1], bool),
                                 segments[:, 1:] != segments[:, :-1]], axis=1)
        inputs = np.where(starts, 0, inputs)
        kwargs["segment_ids"] = jnp.asarray(segments, jnp.int32)
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(inputs, jnp.int32), **kwargs),
                        np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
    picked = np.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return float(np.mean(log_z - picked))


def assert_trees_close(a, b, **tol):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path),
                                   **tol)


class Killed(BaseException):
    """Stands in for the process being killed (not an Exception, like KeyboardInterrupt)."""


TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step being written: "<step>" + this


def plant_partial_checkpoint(checkpoints, step, template_step):
    """What a kill in the middle of orbax writing `step` leaves: its temporary directory, with
    some files missing and the array data truncated."""
    tmp = os.path.join(checkpoints, f"{step}{TMP_SUFFIX}")
    shutil.copytree(os.path.join(checkpoints, str(template_step)), tmp)
    for dirpath, _, filenames in os.walk(tmp):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if name == "commit_success.txt" or name.startswith("_CHECKPOINT_METADATA"):
                os.remove(path)
            elif os.path.getsize(path) > 8:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
    return tmp


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Run A: 8 steps straight. Run B: the same, killed in the middle of saving step 8 (a
    half-written temporary checkpoint dir is left; step 4 is the last complete one), then resumed
    to 8. A's final in-memory train state is captured for `lexjax.load`."""
    root = tmp_path_factory.mktemp("runs")
    out = {"A": root / "A", "B": root / "B"}

    captured = {}
    original_compile = ShardedTrainStep.compile

    def capturing_compile(sharded):
        compiled, seconds = original_compile(sharded)

        def step(*args):
            state, metrics = compiled(*args)
            captured.update(sharded=sharded, state=state)
            return state, metrics
        return step, seconds

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ShardedTrainStep, "compile", capturing_compile)
        out["A_result"] = run(out["A"], corpus)
    out["A_model"] = captured["sharded"].model
    out["A_state"] = jax.device_get(captured["state"])

    original_save = Checkpointer.save

    def killed_while_saving(self, step, params, opt_state, meta, carry=None):
        if step == 8:
            self.wait()
            out["planted"] = plant_partial_checkpoint(self.directory, 8, template_step=4)
            raise Killed(f"killed while saving step {step}")
        return original_save(self, step, params, opt_state, meta, carry)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Checkpointer, "save", killed_while_saving)
        with pytest.raises(Killed):
            run(out["B"], corpus)
    out["B_metrics_after_kill"] = read_metrics(str(out["B"]))
    out["B_latest_after_kill"] = Checkpointer(str(out["B"]), read_only=True).latest_step()
    out["B_result"] = run(out["B"], corpus)
    return out


# ----------------------------------------------------------------------------------------------
# Resume, interruption, corruption
# ----------------------------------------------------------------------------------------------

def test_resume_after_kill_reproduces_the_uninterrupted_run(runs, corpus):
    straight = read_metrics(str(runs["A"]))
    resumed = read_metrics(str(runs["B"]))
    # The killed run had logged steps 1..8; the resumed run dropped 5..8 and logged them again.
    assert [r["step"] for r in runs["B_metrics_after_kill"]] == list(range(1, 9))
    assert [r["step"] for r in straight] == list(range(1, STEPS + 1))
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(straight, resumed):
        for key in ("loss", "grad_norm", "learning_rate"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    # The runs train (the loss moves) and the final parameters agree.
    assert straight[-1]["loss"] != pytest.approx(straight[0]["loss"], rel=1e-3)
    model = configured_model(corpus)
    assert Checkpointer(str(runs["B"]), read_only=True).latest_step() == STEPS
    assert_trees_close(restore_params(runs["A"], model), restore_params(runs["B"], model),
                       rtol=1e-5, atol=1e-6)


def test_kill_mid_save_leaves_previous_checkpoint_as_latest(runs):
    # The half-written step-8 dir existed after the kill, and was not taken as a checkpoint.
    assert runs["B_latest_after_kill"] == 4
    checkpoints = os.path.join(str(runs["B"]), "checkpoints")
    # The resumed run wrote step 8 through the leftover temporary dir and finalised it.
    assert not os.path.exists(runs["planted"])
    assert Checkpointer(str(runs["B"]), read_only=True).latest_step() == 8
    assert sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit()) == [4, 8]


def test_stray_temporary_dir_is_ignored_by_latest_step(runs, tmp_path):
    model_dir = tmp_path / "copy"
    shutil.copytree(runs["A"], model_dir)
    checkpoints = os.path.join(str(model_dir), "checkpoints")
    plant_partial_checkpoint(checkpoints, 12, template_step=8)
    assert Checkpointer(str(model_dir), read_only=True).latest_step() == 8


def corrupt(step_dir, how):
    params = os.path.join(step_dir, "params")
    if how == "delete_params":
        shutil.rmtree(params)
    else:  # truncate every file of the parameters item to nothing
        for dirpath, _, filenames in os.walk(params):
            for name in filenames:
                open(os.path.join(dirpath, name), "w").close()


@pytest.mark.parametrize("how", ["truncate_params", "delete_params"])
def test_a_damaged_latest_checkpoint_is_set_aside_and_training_resumes_before_it(
        runs, corpus, tmp_path, capsys, how):
    model_dir = tmp_path / "copy"
    shutil.copytree(runs["A"], model_dir)
    step_dir = os.path.join(str(model_dir), "checkpoints", "8")
    corrupt(step_dir, how)
    with pytest.raises(CheckpointError) as info:  # loading names the damaged step
        lexjax.load(str(model_dir))
    assert step_dir in str(info.value)
    result = run(model_dir, corpus, TRAIN_STEPS=12)
    warning = [line for line in capsys.readouterr().err.splitlines() if "set aside" in line]
    assert len(warning) == 1 and step_dir in warning[0], warning
    assert result["step"] == 12 and os.path.isdir(step_dir + ".unreadable")
    records = read_metrics(str(model_dir))
    assert [r["step"] for r in records] == list(range(1, 13))  # each step logged once
    straight = read_metrics(str(runs["A"]))
    assert records[:4] == straight[:4]  # resumed from step 4: its history kept, 5.. retrained


def test_when_the_step_before_is_unreadable_too_nothing_is_set_aside(runs, corpus, tmp_path):
    """Two unreadable steps are not damage to skip (a changed optimizer, say): the latest's error
    is raised and no checkpoint is moved or overwritten."""
    model_dir = tmp_path / "copy"
    shutil.copytree(runs["A"], model_dir)
    for step in (4, 8):
        corrupt(os.path.join(str(model_dir), "checkpoints", str(step)), "delete_params")
    with pytest.raises(CheckpointError, match=os.path.join("checkpoints", "8")):
        run(model_dir, corpus, TRAIN_STEPS=12)
    assert sorted(os.listdir(os.path.join(str(model_dir), "checkpoints"))) == ["4", "8"]
    assert [r["step"] for r in read_metrics(str(model_dir))] == list(range(1, STEPS + 1))


def test_a_torn_metrics_line_does_not_stop_a_resume(runs, corpus, tmp_path):
    model_dir = tmp_path / "torn"
    shutil.copytree(runs["A"], model_dir)
    with open(os.path.join(str(model_dir), "metrics.jsonl"), "a") as f:
        f.write('{"step": 9, "lo')  # a crash in the middle of a write
    assert run(model_dir, corpus, TRAIN_STEPS=10)["step"] == 10
    assert [r["step"] for r in read_metrics(str(model_dir))] == list(range(1, 11))


def test_a_resume_that_fails_before_saving_leaves_config_gin_alone(runs, corpus, tmp_path):
    model_dir = tmp_path / "diverged"
    shutil.copytree(runs["A"], model_dir)
    before = (model_dir / "config.gin").read_text()
    with pytest.raises(TrainingError, match="loss"):
        run(model_dir, corpus, TRAIN_STEPS=16, LEARNING_RATE=1e30)
    assert (model_dir / "config.gin").read_text() == before
    run(model_dir, corpus, TRAIN_STEPS=12)  # a resume that saves rewrites it
    assert "TRAIN_STEPS = 12" in (model_dir / "config.gin").read_text()


def test_a_run_directory_is_held_by_one_trainer_until_its_process_ends(corpus, tmp_path):
    """Another process holds the lock: training is refused naming its pid; once that process is
    killed (-9: no clean-up), the directory is free again."""
    import subprocess
    import sys

    from lexjax.run_dir import RunDirectoryError
    busy = str(tmp_path / "busy")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lexjax.run_dir import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)", busy],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryError, match=f"in use by another trainer \\(pid "
                                                    f"{holder.pid} on "):
            run(busy, corpus)
    finally:
        holder.kill()
        holder.wait()
    assert run(busy, corpus, TRAIN_STEPS=1)["step"] == 1


def test_model_dir_of_another_model_raises_training_error(runs, corpus, tmp_path):
    model_dir = tmp_path / "copy"
    shutil.copytree(runs["A"], model_dir)
    config_before = (model_dir / "config.gin").read_text()
    metrics_before = (model_dir / "metrics.jsonl").read_text()
    with pytest.raises(TrainingError, match="another model") as info:
        run(model_dir, corpus, EMBED_DIM=48, TRAIN_STEPS=12)
    assert str(model_dir) in str(info.value)
    assert "--model_dir" in str(info.value)  # says what to do
    # Nothing of the existing run was touched.
    assert (model_dir / "config.gin").read_text() == config_before
    assert (model_dir / "metrics.jsonl").read_text() == metrics_before
    assert Checkpointer(str(model_dir), read_only=True).latest_step() == STEPS


# ----------------------------------------------------------------------------------------------
# Fine-tuning from another run
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finetune(runs, corpus, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("finetune") / "ft"
    result = run(model_dir, corpus, init_from=str(runs["A"]), TRAIN_LENGTH=2 * LENGTH,
                 TRAIN_STEPS=2, CHECKPOINT_EVERY=2, EVAL_EVERY=2,
                 **{"lexjax.training.TrainConfig.eval_windows": 8})
    return model_dir, result


def test_init_from_starts_from_the_source_parameters(runs, corpus, finetune):
    from lexjax import data

    model_dir, _ = finetune
    model = configured_model(corpus)
    source = restore_params(runs["A"], model)
    # The fine-tune's first loss is the source's final parameters' loss on the fine-tune's first
    # batch (length 32, the source trained at 16: packed documents kept apart), recomputed here
    # in float64 numpy.
    first_batch = next(data.train_batches(data_config(corpus), length=2 * LENGTH,
                                          batch_size=BATCH, seed=0))
    segments = data.segment_ids(first_batch)
    expected = np_mean_loss(model, source, first_batch, segments)
    metrics = read_metrics(str(model_dir))
    assert [r["step"] for r in metrics] == [1, 2]
    assert metrics[0]["loss"] == pytest.approx(expected, rel=1e-5)
    # ... which a fresh initialisation would not give.
    fresh = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, LENGTH), jnp.int32)))
    assert np_mean_loss(model, fresh["params"], first_batch, segments) != pytest.approx(
        expected, rel=1e-3)
    meta = Checkpointer(str(model_dir), read_only=True).meta()
    assert meta["train_length"] == 2 * LENGTH and meta["step"] == 2


def test_init_from_uses_a_fresh_optimizer_state(runs, corpus, finetune):
    model_dir, _ = finetune
    model = configured_model(corpus)
    params = abstract_params(model)
    optimizer, _ = make_optimizer(OptimizerConfig(learning_rate=1e-3), total_steps=2)
    abstract_opt = jax.eval_shape(optimizer.init, params)
    checkpointer = Checkpointer(str(model_dir), read_only=True)
    _, opt_state, _ = checkpointer.restore(params, abstract_opt)
    counts = [int(x) for x in jax.tree_util.tree_leaves(opt_state)
              if np.issubdtype(np.asarray(x).dtype, np.integer)]
    assert counts and all(c == 2 for c in counts)  # 2 fine-tune steps, not 8 + 2
    _, source_opt, _ = Checkpointer(str(runs["A"]), read_only=True).restore(params, abstract_opt)
    source_counts = [int(x) for x in jax.tree_util.tree_leaves(source_opt)
                     if np.issubdtype(np.asarray(x).dtype, np.integer)]
    assert all(c == STEPS for c in source_counts)


def test_validation_loss_against_numpy(corpus, finetune):
    from lexjax import data

    model_dir, result = finetune
    model = configured_model(corpus)
    params = restore_params(model_dir, model)  # step 2: the parameters evaluated at step 2
    windows = data.eval_windows(data_config(corpus), length=2 * LENGTH, split="validation",
                                max_windows=8)
    assert len(windows) == 8  # two full batches of 4
    (record,) = [r for r in read_metrics(str(model_dir)) if "validation_loss" in r]
    assert record["step"] == 2
    assert record["validation_loss"] == pytest.approx(np_mean_loss(model, params, windows),
                                                      rel=1e-5)
    assert result["validation_loss"] == record["validation_loss"]


def test_init_from_is_ignored_when_the_model_dir_has_a_checkpoint(runs, corpus, finetune):
    model_dir, _ = finetune
    # Already at its last step: a second call neither re-initialises nor trains.
    before = restore_params(model_dir, configured_model(corpus))
    assert run(model_dir, corpus, init_from=str(runs["A"]), TRAIN_LENGTH=2 * LENGTH,
               TRAIN_STEPS=2, CHECKPOINT_EVERY=2, EVAL_EVERY=2) == {"step": 2}
    assert_trees_close(before, restore_params(model_dir, configured_model(corpus)), rtol=0,
                       atol=0)


# ----------------------------------------------------------------------------------------------
# NaN guard
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[1e30, 1e39], ids=["lr1e30", "lr1e39_inf_in_f32"])
def diverged(request, corpus, tmp_path_factory):
    """A run that diverges. 1e30: the parameters blow up after two updates; 1e39 overflows
    float32, so the very first update (learning rate inf, times a warmup factor of 0 = NaN)
    makes every parameter NaN while that step's loss and gradients are still finite."""
    model_dir = tmp_path_factory.mktemp("nan") / "run"
    with pytest.raises(TrainingError) as info:
        run(model_dir, corpus, LEARNING_RATE=request.param, CHECKPOINT_EVERY=1, TRAIN_STEPS=8)
    return model_dir, str(info.value), request.param


def test_nan_loss_raises_training_error_naming_the_step(diverged):
    model_dir, message, _ = diverged
    logged = read_metrics(str(model_dir))
    assert all(math.isfinite(r["loss"]) for r in logged)
    step = int(re.search(r"at step (\d+)", message).group(1))
    # the first step whose loss, gradients or updated parameters are not finite
    assert step == (logged[-1]["step"] if logged else 0) + 1
    assert re.search(r"\b(nan|inf)\b", message, re.IGNORECASE)
    latest = Checkpointer(str(model_dir), read_only=True).latest_step() if os.path.isdir(
        os.path.join(str(model_dir), "checkpoints")) else None
    named = re.search(r"checkpoint is step (\d+)", message)
    if latest is None:
        assert "no checkpoint was saved" in message
    else:
        assert int(named.group(1)) == latest < step


def test_nan_guard_keeps_only_finite_checkpoints(diverged, corpus):
    model_dir, _, _ = diverged
    if Checkpointer(str(model_dir), read_only=True).latest_step() is None:
        return  # diverged at the first update: nothing was saved, which is what we want
    params = restore_params(model_dir, configured_model(corpus))
    bad = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(params)
           if not np.isfinite(np.asarray(x)).all()]
    assert not bad, f"latest checkpoint has non-finite parameters: {bad}"


# ----------------------------------------------------------------------------------------------
# Metrics, TensorBoard, learning-rate schedule
# ----------------------------------------------------------------------------------------------

def hand_schedule(t, peak, total, warmup_steps, final_fraction=0.1):
    """Linear warmup 0 -> peak over w = max(1, min(warmup_steps, total // 10)) steps, then
    cosine from peak to final_fraction * peak at `total`, constant after."""
    w = max(1, min(warmup_steps, total // 10))
    if t < w:
        return peak * t / w
    if t >= total:
        return peak * final_fraction
    end = peak * final_fraction
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (t - w) / (total - w)))


@pytest.mark.parametrize("total,warmup", [(100, 50), (1000, 30), (8, 2), (600, 100)])
def test_learning_rate_schedule_against_hand_computation(total, warmup):
    peak = 3e-3
    schedule = learning_rate_schedule(peak, total, warmup)
    for t in sorted({0, 1, 2, 5, 9, 10, 11, total // 2, total - 1, total, total + 7}):
        assert float(schedule(t)) == pytest.approx(hand_schedule(t, peak, total, warmup),
                                                   rel=1e-5, abs=1e-12), t
    assert float(schedule(total)) == pytest.approx(0.1 * peak, rel=1e-6)


def test_metrics_jsonl_records(runs):
    records = read_metrics(str(runs["A"]))
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert {"step", "loss", "learning_rate", "tokens_per_sec", "mfu", "grad_norm",
                "step_seconds"} <= set(r)
        assert math.isfinite(r["loss"]) and 0 < r["mfu"] < 1 and r["tokens_per_sec"] > 0
        # tokens/s and seconds/step describe the same interval.
        assert r["tokens_per_sec"] * r["step_seconds"] == pytest.approx(BATCH * LENGTH, rel=1e-9)
        # The logged rate is the one applied by that step's update: schedule(step - 1)
        # (quickstart LEARNING_RATE 3e-3; WARMUP_STEPS=2 is capped to max(1, 8 // 10) = 1).
        assert r["learning_rate"] == pytest.approx(hand_schedule(r["step"] - 1, 3e-3, STEPS, 2),
                                                   rel=1e-5, abs=1e-12)
    # MFU = model FLOPs/s over peak: its ratio to tokens/s is the same at every step.
    ratios = [r["mfu"] / r["tokens_per_sec"] for r in records]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)
    assert runs["A_result"]["step"] == STEPS
    assert runs["A_result"]["loss"] == pytest.approx(records[-1]["loss"])


def read_events_with_tensorflow(directory):
    import tensorflow as tf

    values = {}
    for name in sorted(os.listdir(directory)):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(directory, name)):
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    values.setdefault(value.tag, {})[event.step] = value.simple_value
    return values


def read_events_with_tensorboard(directory):
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="tensorboard is not installed (a test extra: pip install -e .[test])")
    acc = accumulator.EventAccumulator(directory, size_guidance={accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("reader", [read_events_with_tensorflow, read_events_with_tensorboard],
                         ids=["tensorflow_reader", "tensorboard_reader"])
@pytest.mark.parametrize("name", ["A", "B"])
def test_tensorboard_scalars_equal_metrics_jsonl(runs, reader, name):
    values = reader(os.path.join(str(runs[name]), "tensorboard"))
    records = read_metrics(str(runs[name]))
    assert {"loss", "learning_rate", "tokens_per_sec", "mfu", "grad_norm"} <= set(values)
    for r in records:
        for tag, value in r.items():
            if tag == "step":
                continue
            # Event files store float32; later events of a step (the resumed run B re-logs
            # steps 5..8 after the kill) supersede earlier ones.
            assert values[tag][r["step"]] == pytest.approx(value, rel=1e-6, abs=1e-30), (tag, r)
    assert set(values["loss"]) == {r["step"] for r in records}


# ----------------------------------------------------------------------------------------------
# Parameters: annotation check, load
# ----------------------------------------------------------------------------------------------

class HalfAnnotatedLM(nn.Module):
    """One annotated projection and one plain `self.param` without logical axis names."""

    @nn.compact
    def __call__(self, tokens, *, deterministic=True):
        table = self.param("table", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("vocab", "embed")), (384, 8))
        plain = self.param("plain_scale", nn.initializers.ones, (8,))
        return jnp.take(table, tokens, axis=0) * plain @ table.T


gin.external_configurable(HalfAnnotatedLM, module="lexjax_tests")


def test_check_logical_axes_refuses_an_unannotated_parameter():
    boxed = state_lib.boxed_params(HalfAnnotatedLM(), jax.ShapeDtypeStruct((2, 8), jnp.int32))
    with pytest.raises(state_lib.UnannotatedParameterError) as info:
        check_logical_axes(boxed)
    assert "plain_scale" in str(info.value) and "'table'" not in str(info.value)
    # Every real model passes.
    model = Transformer(vocab_size=384, num_layers=2, embed_dim=32, num_heads=2, mlp_dim=64)
    check_logical_axes(state_lib.boxed_params(model, jax.ShapeDtypeStruct((2, 8), jnp.int32)))


def test_trainer_refuses_a_model_with_an_unannotated_parameter(corpus, tmp_path):
    with pytest.raises(state_lib.UnannotatedParameterError, match="plain_scale"):
        run(tmp_path / "run", corpus, MODEL="@lexjax_tests.HalfAnnotatedLM()")
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_load_returns_the_trained_model_and_parameters(runs):
    model, variables = lexjax.load(str(runs["A"]))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 259, size=(2, 24)), jnp.int32)
    got = np.asarray(jax.jit(model.apply)(variables, tokens))
    trained = runs["A_state"]
    assert int(trained.step) == STEPS
    expected = np.asarray(jax.jit(runs["A_model"].apply)({"params": trained.params}, tokens))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert_trees_close(variables["params"], trained.params, rtol=0, atol=0)
    # An earlier step on request.
    _, early = lexjax.load(str(runs["A"]), step=4)
    assert not np.allclose(np.asarray(jax.jit(model.apply)(early, tokens)), expected)


# ----------------------------------------------------------------------------------------------
# FLOP accounting for MFU
# ----------------------------------------------------------------------------------------------

def hand_flops_per_token(*, layers, embed, heads, kv_heads, head_dim, mlp, vocab, keys,
                         swiglu=False):
    """2 FLOPs per multiply-add: q/k/v/out projections, MLP, q.k and p.v over `keys` keys,
    tied output logits."""
    macs = layers * (embed * heads * head_dim + 2 * embed * kv_heads * head_dim
                     + heads * head_dim * embed + (3 if swiglu else 2) * embed * mlp
                     + 2 * heads * head_dim * keys) + embed * vocab
    return 2.0 * macs


@pytest.mark.parametrize("kwargs,keys", [
    (dict(mask=MaskSpec(causal=False)), 64),
    (dict(), (64 + 1) / 2),
    (dict(num_kv_heads=1, mlp_activation="swiglu"), (64 + 1) / 2),
    (dict(mask=MaskSpec(window=8)), (8 * 57 + sum(range(1, 8))) / 64),  # brute-force mean
])
def test_flops_per_token_against_hand_count(kwargs, keys):
    model = Transformer(vocab_size=384, num_layers=3, embed_dim=64, num_heads=4, mlp_dim=96,
                        **kwargs)
    expected = hand_flops_per_token(
        layers=3, embed=64, heads=4, kv_heads=kwargs.get("num_kv_heads", 4), head_dim=16,
        mlp=96, vocab=384, keys=keys, swiglu=kwargs.get("mlp_activation") == "swiglu")
    assert model.flops_per_token(64) == pytest.approx(expected, rel=1e-12)


def test_analytic_flops_agree_with_xla_cost_analysis():
    """`flops_per_token` counts matmuls only; XLA's cost analysis counts every HLO op. So XLA
    must be >= the analytic count and exceed it only by the non-matmul work. The shape is chosen
    so that each matmul group (projections, MLP, attention, logits) is >= 10% of the total, so
    dropping or double-counting any of them moves the ratio out of the bounds below:

    * forward, non-causal (every key counted by both): measured XLA/analytic = 1.03 (softmax,
      RMSNorm, GELU, residual adds, scaling); bound [1.0, 1.08].
    * train step, non-causal: XLA/(3 x forward) = 1.05: the backward's elementwise ops, the
      AdamW update and global-norm clipping (~50-100 FLOPs per parameter) on top; bound
      [1.0, 1.12]. (The 3x rule itself is exact for the matmuls: one in the forward, two in the
      backward.)
    * causal: XLA computes the masked half of q.k and p.v too, so its count matches the
      non-causal analytic count (same bounds), while the analytic causal count is lower by
      exactly the masked half.
    """
    batch, length = 2, 128
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def model(causal):
        return Transformer(vocab_size=384, num_layers=2, embed_dim=64, num_heads=2, mlp_dim=128,
                           position=NoPE(), mask=MaskSpec(causal=causal),
                           attention_impl="reference")

    full, causal = model(False), model(True)
    params = abstract_params(full, length)
    analytic_full = full.flops_per_token(length) * batch * length
    analytic_causal = causal.flops_per_token(length) * batch * length
    masked_half = 2 * 2 * (2 * 64 * (length - (length + 1) / 2)) * batch * length
    assert analytic_full - analytic_causal == pytest.approx(masked_half, rel=1e-12)

    for m in (full, causal):
        forward = jax.jit(lambda p, t: m.apply({"params": p}, t)).lower(params, tokens).compile()
        assert 1.0 <= xla_flops(forward) / analytic_full <= 1.08, type(m.mask)

    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-3), total_steps=10)
    state = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                                opt_state=optimizer.init(p)), params)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    example = {"targets": tokens, "segment_ids": tokens}
    step = jax.jit(make_train_step(full, optimizer, schedule)).lower(state, example,
                                                                     key).compile()
    ratio = xla_flops(step) / (3 * analytic_full)
    assert 1.0 <= ratio <= 1.12, ratio
    from lexjax.training.flops import training_flops_per_step
    assert training_flops_per_step(full, batch, length) == pytest.approx(3 * analytic_full)


def test_matmul_peak_compiles_its_chain_once():
    """Repeated peak measurements (the benchmark takes one per round) reuse one compiled chain;
    its FLOP count is 2 n^3 per matmul."""
    from lexjax.training import flops
    run, chain_flops = flops.matmul_chain(32, 3)
    assert flops.matmul_chain(32, 3)[0] is run
    assert chain_flops == 2 * 32 ** 3 * 3
    assert flops.measured_matmul_peak(32, 3) > 0
    devices = tuple(jax.devices()[:2])
    assert flops.matmul_chain(32, 3, devices)[1] == 2 * 2 * 32 ** 3 * 3  # a matrix per device
    assert flops.measured_matmul_peak(32, 3, devices) > 0


def test_mfu_never_exceeds_one_against_a_measured_peak():
    """A CPU peak measured while the machine was busy rises to the run's own rate; a
    specification peak (TPU, GPU) does not, so a wrong FLOP count still shows."""
    from lexjax.training.flops import utilization
    assert utilization(50.0, 100.0, "measured cpu f32 matmul rate") == (0.5, 100.0)
    assert utilization(150.0, 100.0, "measured cpu f32 matmul rate") == (1.0, 150.0)
    assert utilization(150.0, 100.0, "TPU v5 lite bf16 peak") == (1.5, 100.0)


# ----------------------------------------------------------------------------------------------
# Models that carry state across steps (Block-Recurrent Transformer, Transformer-XL)
# ----------------------------------------------------------------------------------------------

RECURRENT = dict(CHUNK_SIZE=8, NUM_STATES=4, NUM_LAYERS=2, NUM_HEADS=2)
RECURRENT_FILES = GIN_FILES + ["configs/models/block_recurrent.gin"]


def tiny_recurrent_model():
    return build_model(["configs/models/block_recurrent.gin"],
                       ["NUM_LAYERS=2", "EMBED_DIM=32", "NUM_HEADS=2", "MLP_DIM=64",
                        "CHUNK_SIZE=8", "NUM_STATES=4", "VOCAB_SIZE=64"])


def test_train_step_carries_the_stream_across_segments():
    """With a frozen model (learning rate 0), the loss of step k equals the loss of segment k
    inside one call on the whole stream (the model's carry and the previous segment's last token
    are handed over), and the carry restarts every `segments_per_stream` steps."""
    import optax

    model = tiny_recurrent_model()
    stream = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 4 * LENGTH)), jnp.int32)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), stream[:, :LENGTH])["params"])
    frozen = optax.sgd(0.0)
    carry = nn.unbox(state_lib.initial_carry(model, 2))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=frozen.init(params), carry=carry)
    step = jax.jit(make_train_step(model, frozen, lambda s: 0.0, segments_per_stream=3))
    whole = np.asarray(jax.jit(model.apply)({"params": params},
                                            jnp.pad(stream, ((0, 0), (1, 0)))[:, :-1]))
    for k in range(4):
        segment = stream[:, k * LENGTH:(k + 1) * LENGTH]
        state, metrics = step(state, {"targets": segment}, jax.random.PRNGKey(1))
        if k < 3:  # segments 0-2 continue one stream
            logits = whole[:, k * LENGTH:(k + 1) * LENGTH]
        else:  # step 3 restarts the stream: segment 3 is read as if it began the stream
            logits = np.asarray(model.apply({"params": params},
                                            jnp.pad(segment, ((0, 0), (1, 0)))[:, :-1]))
        log_z = jax.nn.logsumexp(logits, axis=-1)
        picked = np.take_along_axis(logits, np.asarray(segment)[..., None], axis=-1)[..., 0]
        assert float(metrics["loss"]) == pytest.approx(float(np.mean(log_z - picked)),
                                                       rel=1e-5), k
    assert int(state.carry["model"].position) == LENGTH  # one segment since the restart


@pytest.fixture(scope="module")
def recurrent_runs(corpus, tmp_path_factory):
    """Block-Recurrent runs: A straight for 8 steps, B killed while saving step 8 and resumed
    from step 4 (its carry restored from the checkpoint)."""
    root = tmp_path_factory.mktemp("recurrent")
    out = {"A": root / "A", "B": root / "B"}

    def recurrent_run(model_dir):
        return run(model_dir, corpus, gin_files=RECURRENT_FILES, **RECURRENT)

    recurrent_run(out["A"])
    original_save = Checkpointer.save

    def killed_at_8(self, step, params, opt_state, meta, carry=None):
        if step == 8:
            raise Killed("killed while saving step 8")
        return original_save(self, step, params, opt_state, meta, carry)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Checkpointer, "save", killed_at_8)
        with pytest.raises(Killed):
            recurrent_run(out["B"])
    recurrent_run(out["B"])
    return out


def test_recurrent_resume_restores_the_carry(recurrent_runs):
    straight = read_metrics(str(recurrent_runs["A"]))
    resumed = read_metrics(str(recurrent_runs["B"]))
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(straight, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
    carry = Checkpointer(str(recurrent_runs["A"]), read_only=True).restore_carry(
        None, STEPS)
    assert int(carry["model"]["position"]) == STEPS * LENGTH
    assert np.abs(np.asarray(carry["model"]["states"])).max() > 0


# ----------------------------------------------------------------------------------------------
# The run config: validation intervals, checks, run directories of earlier versions
# ----------------------------------------------------------------------------------------------

def test_validation_lands_every_eval_every_steps_whatever_log_every_is(corpus, tmp_path):
    run(tmp_path / "run", corpus, LOG_EVERY=3, EVAL_EVERY=2, TRAIN_STEPS=8,
        **{"lexjax.training.TrainConfig.eval_windows": 4})
    records = read_metrics(str(tmp_path / "run"))
    assert [r["step"] for r in records if "validation_loss" in r] == [2, 4, 6, 8]
    assert [r["step"] for r in records if "loss" in r] == [3, 6, 8]  # and the last step
    assert all(math.isfinite(r["validation_loss"]) for r in records if "validation_loss" in r)


@pytest.mark.parametrize("binding,words", [
    ("TRAIN_STEPS = 0", "TRAIN_STEPS"), ("TRAIN_STEPS = 30.5", "TRAIN_STEPS (train_steps) must "
                                                              "be an integer"),
    ("BATCH_SIZE = -2", "BATCH_SIZE"), ("TRAIN_LENGTH = 'abc'", "TRAIN_LENGTH"),
    ("LOG_EVERY = 0", "LOG_EVERY"), ("CHECKPOINT_EVERY = 0", "CHECKPOINT_EVERY"),
    ("EVAL_EVERY = -1", "EVAL_EVERY"), ("LEARNING_RATE = 'abc'", "LEARNING_RATE"),
    ("LEARNING_RATE = 0", "LEARNING_RATE"), ("MESH = 3", "MESH"),
])
def test_train_config_refuses_bad_values_in_one_line(corpus, binding, words):
    parse_gin(GIN_FILES, bindings(corpus) + [binding])
    try:
        with pytest.raises(lexjax.ConfigError) as info:
            configured_training()
    finally:
        gin.clear_config()
    message = str(info.value)
    assert words in message and "\n" not in message.split("\n  In call to configurable")[0]


LEGACY_CONFIG = """\
MODEL = @lexjax.models.Transformer()
POSITION = @lexjax.positions.ALiBi()
configured_model.model = %MODEL
make_optimizer.learning_rate = 0.002
make_optimizer.warmup_steps = 80
train.batch_size = 4
train.checkpoint_every = 4
train.eval_every = 0
train.log_every = 1
train.mesh = ''
train.seed = 0
train.task = 'lexjax.text_files'
train.train_length = 16
train.train_steps = 8
text_files_glob.pattern = {glob!r}
Transformer.embed_dim = 32
Transformer.mlp_dim = 64
Transformer.num_heads = 2
Transformer.num_layers = 1
Transformer.position = %POSITION
Transformer.vocab_size = 384
"""


def test_a_run_directory_from_before_the_train_config_still_loads(corpus, tmp_path):
    """config.gin as lexjax wrote it before TrainConfig (short names, `configured_model`,
    `train.task`, `make_optimizer`, the gin-bound glob); the parameter layout is unchanged, so
    its checkpoint loads, with the run's settings upgraded."""
    from lexjax.runs import is_legacy_config, load_run, upgrade_legacy_config

    text = LEGACY_CONFIG.format(glob=corpus)
    assert is_legacy_config(text) and not is_legacy_config(upgrade_legacy_config(text))
    model = Transformer(vocab_size=384, num_layers=1, embed_dim=32, num_heads=2, mlp_dim=64,
                        position=lexjax.positions.ALiBi())
    params = nn.unbox(model.init(jax.random.PRNGKey(3), jnp.ones((1, 8), jnp.int32))["params"])
    model_dir = tmp_path / "old_run"
    model_dir.mkdir()
    (model_dir / "config.gin").write_text(text)
    checkpointer = Checkpointer(str(model_dir))
    meta = {"model": "Transformer", "fingerprint": state_lib.params_fingerprint(params),
            "train_length": 16, "task": TASK, "step": 8}
    opt_state = make_optimizer(OptimizerConfig(), 8)[0].init(params)
    checkpointer.save(8, params, opt_state, meta)
    checkpointer.close()
    run_ = load_run(str(model_dir))
    assert run_.config.train_steps == 8 and run_.config.train_length == 16
    assert run_.config.data.text_files_glob == corpus and run_.config.data.task == TASK
    assert run_.config.optimizer.learning_rate == 0.002
    assert_trees_close(run_.variables["params"], params, rtol=0, atol=0)
    assert isinstance(run_.model.position, lexjax.positions.ALiBi) and run_.step == 8


def test_a_checkpoint_of_another_parameter_layout_is_refused_in_one_line(runs, tmp_path):
    from lexjax.runs import load_run

    model_dir = tmp_path / "copy"
    shutil.copytree(runs["A"], model_dir)
    config = (model_dir / "config.gin").read_text()
    (model_dir / "config.gin").write_text(config.replace("EMBED_DIM = 32", "EMBED_DIM = 48"))
    with pytest.raises(CheckpointError, match="parameter layout changed") as info:
        load_run(str(model_dir))
    assert "\n" not in str(info.value)


def test_legacy_upgrade_keeps_the_bound_model_and_every_data_setting():
    from lexjax.runs import upgrade_legacy_config

    text = ("configured_model.model = @lexjax.models.GSS()\n"
            "lexjax.training.make_optimizer.total_steps = 100\n"
            "stdlib_corpus.include_test_suites = False\n"
            "vocabulary.kind = 'byte'\n")
    lines = upgrade_legacy_config(text).splitlines()
    assert "lexjax.training.train.model = @lexjax.models.GSS()" in lines
    assert "lexjax.data.DataConfig.include_test_suites = False" in lines
    assert "lexjax.data.DataConfig.vocabulary = 'byte'" in lines
    assert not any("total_steps" in line or "configured_model" in line for line in lines)


def test_unusable_model_dirs_are_refused_naming_the_path(tmp_path):
    from lexjax.run_dir import RunDirectoryError, check_writable
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(RunDirectoryError, match="is a file"):
        check_writable(str(a_file))
    with pytest.raises(RunDirectoryError, match=f"lies under the file {a_file}"):
        check_writable(str(a_file / "run"))
    check_writable(str(tmp_path / "new" / "run"))
    assert (tmp_path / "new" / "run").is_dir() and not list((tmp_path / "new" / "run").iterdir())


def test_progress_lines_for_logs_that_are_not_a_terminal():
    from lexjax.training.metrics import format_seconds, progress_line
    record = {"step": 20, "loss": 2.34512, "tokens_per_sec": 5120.4, "mfu": 0.5012,
              "validation_loss": 2.5}
    assert progress_line(record, 600, 200.0) == (
        "step 20/600: loss 2.3451, validation loss 2.5000, 5,120 tokens/s, MFU 50.1%, ETA 3m20s")
    assert progress_line({"step": 1, "loss": 1.0}, 2, None) == "step 1/2: loss 1.0000"
    assert progress_line({"step": 3, "loss": 2.0, "masked_accuracy": 0.4125}, 9, None) == (
        "step 3/9: loss 2.0000, masked accuracy 41.2%")
    assert [format_seconds(s) for s in (4.4, 75.2, 4000)] == ["4s", "1m15s", "1h06m"]


@pytest.mark.parametrize("config,low,high", [
    ("luna", 0.85, 1.15), ("luna_encoder", 0.95, 1.15), ("kernelized_rpe", 0.95, 1.2),
    ("yoso_encoder", 0.95, 1.15),
    # the FFT's analytic estimate (5 log2(2n) per channel and token) is below XLA's FFT cost
    ("kernelized_rpe_encoder", 1.0, 2.5)])
def test_linear_attention_flops_track_xla_cost_analysis(config, low, high):
    """The linear-time models' `flops_per_token` (their mixing written out: nested attention,
    random features and Toeplitz products, hashing) against XLA's count of the compiled forward
    pass (measured 0.92, 1.03, 1.07, 1.02 and 1.90 at these shapes): a dropped or doubled term
    moves the ratio out of its bounds."""
    batch, length = 2, 256
    model = build_model([f"configs/models/{config}.gin"], [
        "NUM_LAYERS=2", "EMBED_DIM=64", "NUM_HEADS=2", "MLP_DIM=128", "CHUNK_SIZE=64",
        "NUM_FEATURES=32", "MAX_DISTANCE=64"])
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    params = abstract_params(model, length)
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t)).lower(params, tokens).compile()
    ratio = xla_flops(forward) / (model.flops_per_token(length) * batch * length)
    assert low <= ratio <= high, ratio
