"""Run directories given as URIs (`gs://bucket/run`) go through `etils.epath` everywhere: training
(config.gin, metrics.jsonl, TensorBoard events, orbax checkpoints), resume, `--init_from`,
`lexjax.load`, evaluation reports and the bench's report.

Offline: `etils.epath.testing.mock_epath` redirects every epath operation on `gs://bucket/...` to
a local directory (`fake_gcs`), and orbax's TensorStore spec for a GCS path is pointed at the
file driver there (orbax writes array data through TensorStore, not epath; this patch lives in
this test only). The working directory is an empty tmp dir throughout, so a path that bypasses
epath (`os.path.abspath("gs://bucket/run")` is `./gs:/bucket/run`) shows up as a local `gs:`
directory, which the tests refuse.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil

import gin
import jax
import numpy as np
import pytest
from etils.epath import gpath, testing
from orbax.checkpoint._src.path import gcs_utils

import lexjax
from helpers import write_corpus
from lexjax.config import parse_gin
from lexjax.paths import is_remote, run_path
from lexjax.run_dir import RunLock
from lexjax.runs import configured_training
from lexjax.training import Checkpointer, train
from lexjax.training.checkpoints import checkpoint_dir
from lexjax.training.metrics import read_metrics

GIN_FILES = ["configs/runs/quickstart.gin", "configs/data/text_files.gin"]
RUN, FINETUNE = "gs://bucket/run", "gs://bucket/ft"
STEPS = 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeGcs:
    """`gs://X` <-> `root/X`, and the `mock_epath` functions that apply it."""

    def __init__(self, root: str):
        self.root = root

    def local(self, path) -> str:
        path = os.fspath(path)
        return os.path.join(self.root, path[len("gs://"):]) if path.startswith("gs://") else path

    def remote(self, path) -> str:
        path, prefix = os.fspath(path), self.root + os.sep
        return "gs://" + path[len(prefix):] if path.startswith(prefix) else path

    def mocks(self) -> dict:
        def one(original, path, *args, **kwargs):
            return original(self.local(path), *args, **kwargs)

        def two(original, source, target, **kwargs):
            return original(self.local(source), self.local(target), **kwargs)

        def glob(original, pattern):
            return [self.remote(p) for p in original(self.local(pattern))]

        def walk(original, top, **kwargs):
            for root, dirs, files in original(self.local(top), **kwargs):
                yield self.remote(root), dirs, files

        names = ("exists", "isdir", "listdir", "makedirs", "mkdir", "open", "remove", "rmtree",
                 "stat")
        return {**{name: one for name in names}, "copy": two, "rename": two, "replace": two,
                "glob": glob, "walk": walk}


@pytest.fixture(scope="module")
def fake_gcs(tmp_path_factory):
    """A `FakeGcs` in force for the module, in an empty working directory; afterwards, no local
    `gs:` path anywhere under the module's tmp dirs."""
    fake = FakeGcs(str(tmp_path_factory.mktemp("gcs")))
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpath, "_is_tf_installed", lambda: False)  # else gs:// -> tf.io.gfile
        mp.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
        mp.setattr(gcs_utils, "get_kvstore_for_gcs",
                   lambda path: {"driver": "file", "path": fake.local(path)})
        mp.setenv("LEXJAX_DATA_CACHE", str(tmp_path_factory.mktemp("data_cache")))
        mp.chdir(cwd)
        with testing.mock_epath(**fake.mocks()):
            yield fake
    gin.clear_config()
    assert not local_gs_paths(str(cwd)) and not local_gs_paths(fake.root)


def local_gs_paths(top: str) -> list[str]:
    """Paths under `top` with a `gs:` component: a `gs://` URI taken for a local path."""
    return [os.path.join(d, n) for d, dirs, files in os.walk(top) for n in dirs + files
            if n == "gs:" or "gs:" in d.split(os.sep)]


def run(model_dir: str, glob: str, init_from=None, **overrides) -> dict:
    """A tiny run (1 layer, 32 wide), configured as `python -m lexjax.train` configures it."""
    values = dict(NUM_LAYERS=1, EMBED_DIM=32, NUM_HEADS=2, MLP_DIM=64, TRAIN_STEPS=STEPS,
                  BATCH_SIZE=4, TRAIN_LENGTH=16, CHECKPOINT_EVERY=2, LOG_EVERY=1, EVAL_EVERY=0,
                  WARMUP_STEPS=2, MIXTURE_OR_TASK_NAME=repr("lexjax.text_files"),
                  TEXT_FILES_GLOB=repr(glob))
    values.update(overrides)
    with contextlib.chdir(REPO):  # gin finds the run gins' relative includes from there
        parse_gin(GIN_FILES, [f"{k} = {v}" for k, v in values.items()])
    try:
        return train(*configured_training(), model_dir, init_from, progress=False)
    finally:
        gin.clear_config()


@pytest.fixture(scope="module")
def runs(fake_gcs, tmp_path_factory):
    """`RUN`: 4 steps into gs://, then resumed to 6; `FINETUNE`: 2 steps from `RUN`'s parameters
    (`--init_from`) at a learning rate too small to move them."""
    glob = write_corpus(str(tmp_path_factory.mktemp("corpus")))
    first = run(RUN, glob)
    resumed = run(RUN, glob, TRAIN_STEPS=STEPS + 2)
    finetuned = run(FINETUNE, glob, init_from=RUN, TRAIN_STEPS=2, LEARNING_RATE=1e-30)
    return {"first": first, "resumed": resumed, "finetuned": finetuned}


def test_run_path_resolves_local_paths_and_leaves_uris_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(run_path("a/b")) == os.path.join(str(tmp_path), "a", "b")
    assert str(run_path("gs://bucket/run/")) == "gs://bucket/run"
    assert is_remote("gs://bucket/run") and not is_remote("a/gs/run")
    assert checkpoint_dir("gs://bucket/run") == "gs://bucket/run/checkpoints"
    assert checkpoint_dir("run") == os.path.join(str(tmp_path), "run", "checkpoints")
    assert RunLock("gs://bucket/run").path == "gs://bucket/run/.lock"
    assert RunLock("run").path == os.path.join(str(tmp_path), "run", ".lock")


def test_a_gs_run_writes_every_file_under_the_bucket(fake_gcs, runs):
    directory = fake_gcs.local(RUN)
    names = set(os.listdir(directory))
    assert {"config.gin", "operative_config.gin", "metrics.jsonl", "tensorboard",
            "checkpoints"} <= names
    assert not any(n.endswith(".tmp") for n in names)
    assert "TRAIN_STEPS = 6" in open(os.path.join(directory, "config.gin")).read()
    steps = sorted(int(s) for s in os.listdir(os.path.join(directory, "checkpoints")))
    assert steps == [2, 4, 6]
    assert Checkpointer(RUN, read_only=True).all_steps() == [2, 4, 6]
    assert not local_gs_paths(os.getcwd())


def test_metrics_of_a_resumed_gs_run_read_as_one_curve(fake_gcs, runs):
    records = read_metrics(RUN)
    assert [r["step"] for r in records] == list(range(1, STEPS + 3))
    with open(os.path.join(fake_gcs.local(RUN), "metrics.jsonl")) as f:
        assert [json.loads(line) for line in f] == records
    assert runs["resumed"]["step"] == STEPS + 2


def test_tensorboard_events_land_in_the_bucket_and_equal_metrics_jsonl(fake_gcs, runs):
    import tensorflow as tf

    directory = os.path.join(fake_gcs.local(RUN), "tensorboard")
    files = sorted(os.listdir(directory))
    assert len(files) == 2 and all(".tfevents." in name for name in files)  # one per (re)start
    losses = {}
    for name in files:
        for event in tf.compat.v1.train.summary_iterator(os.path.join(directory, name)):
            for value in event.summary.value:
                if value.tag == "loss":
                    losses[event.step] = value.simple_value
    assert losses == pytest.approx({r["step"]: r["loss"] for r in read_metrics(RUN)}, rel=1e-6)


def test_lexjax_load_reads_a_gs_run_as_its_local_copy_reads(fake_gcs, runs):
    model, variables = lexjax.load(RUN)
    _, local = lexjax.load(fake_gcs.local(RUN))
    assert type(model).__name__ == "Transformer"
    leaves = jax.tree_util.tree_leaves(variables)
    assert leaves and all(np.array_equal(a, b) for a, b in
                          zip(leaves, jax.tree_util.tree_leaves(local)))
    assert Checkpointer(RUN, read_only=True).meta()["step"] == STEPS + 2


def test_a_damaged_step_of_a_gs_run_is_set_aside_and_unfinished_saves_removed(fake_gcs, runs):
    copy = "gs://bucket/copy"
    shutil.copytree(fake_gcs.local(RUN), fake_gcs.local(copy))
    checkpoints = os.path.join(fake_gcs.local(copy), "checkpoints")
    os.makedirs(os.path.join(checkpoints, "8.orbax-checkpoint-tmp-123", "params"))
    checkpointer = Checkpointer(copy)
    try:
        assert checkpointer.set_aside(6) == f"{copy}/checkpoints/6.unreadable"
        assert checkpointer.latest_step() == 4
    finally:
        checkpointer.close()
    assert sorted(os.listdir(checkpoints)) == ["2", "4", "6.unreadable"]


def test_init_from_a_gs_run_starts_from_its_parameters(fake_gcs, runs):
    source = Checkpointer(RUN, read_only=True)
    tuned = Checkpointer(FINETUNE, read_only=True)
    assert tuned.all_steps() == [2]
    assert os.path.isdir(os.path.join(fake_gcs.local(FINETUNE), "checkpoints", "2"))
    start, end = source.restore_params(None), tuned.restore_params(None)
    # A learning rate of 1e-30 leaves float32 parameters where --init_from put them; a fresh
    # initialisation (what a missed --init_from gives) is ~1e-3 away after RUN's 6 steps.
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), start, end)


def test_evaluate_writes_its_report_into_the_gs_run(fake_gcs, runs):
    import lexjax.evaluate

    assert lexjax.evaluate.main([f"--model_dir={RUN}", "--lengths=16", "--max_tokens=32",
                                 "--batch_size=2", "--name=remote"]) == 0
    directory = os.path.join(fake_gcs.local(RUN), "eval")
    assert sorted(os.listdir(directory)) == [f"remote.{e}" for e in ("csv", "json", "md", "png")]
    with open(os.path.join(directory, "remote.json")) as f:
        report = json.load(f)
    assert report["title"] == "run: remote" and [r["length"] for r in report["rows"]] == [16]
    with open(os.path.join(directory, "remote.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(directory, "remote.csv"), newline="") as f:
        assert f.readline().startswith("length,x_train,loss")


def test_the_bench_report_goes_to_a_gs_out_dir(fake_gcs):
    from lexjax.benchmarking.report import write_bench

    rows = [{"mesh": "data:2", "mesh_shape": "{'data': 2}", "devices": 2,
             "compile_seconds": 1.5, "step_seconds": 0.1, "tokens_per_sec": 640.0, "mfu": 0.1,
             "loss": 5.0, "state_bytes_per_device": 2 ** 20, "param_bytes_per_device": 2 ** 19,
             "temp_bytes": 2 ** 18}]
    table = write_bench("gs://bucket/bench", rows, title="tiny", extra={"mode": "measured"})
    directory = fake_gcs.local("gs://bucket/bench")
    assert sorted(os.listdir(directory)) == [f"bench.{e}" for e in ("csv", "json", "md", "png")]
    with open(os.path.join(directory, "bench.json")) as f:
        assert json.load(f)["rows"] == rows
    with open(os.path.join(directory, "bench.md")) as f:
        assert f.read() == f"# tiny\n\n{table}"
